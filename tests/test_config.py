"""Configuration: the file, environment overrides, and one-line errors with exit 2."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from pgmeter.cli import load
from pgmeter.config import ConfigError, load_settings
from pgmeter.meters.service import config_meters


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgmeter.yaml"
    path.write_text(text)
    return path


def test_file_values_and_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, """
address: 0.0.0.0:9000
namespace: bank
postgres: {url: "postgresql://file/db"}
nats: {url: "nats://file:4222"}
meters:
  - slug: api_calls
    eventType: api.call
    aggregation: COUNT
    windowSize: MINUTE   # retired OpenMeter key: ignored
    groupBy: {endpoint: $.endpoint}
""")
    monkeypatch.setenv("PGMETER_POSTGRES_URL", "postgresql://env/db")
    monkeypatch.setenv("PGMETER_VALKEY_URL", "redis://env:6379/0")
    monkeypatch.setenv("PGMETER_NAMESPACE", "tpp")
    settings = load_settings(path)
    assert settings.postgres.url == "postgresql://env/db"
    assert settings.nats.url == "nats://file:4222"
    assert settings.valkey.url == "redis://env:6379/0"
    assert settings.namespace == "tpp"
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 9000)
    assert config_meters(settings)[0].group_by == {"endpoint": "$.endpoint"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("address: nope\n", "address"),
        ("nats: {url: nats://x, bogus: 1}\n", "nats.bogus"),
        ("meters:\n  - {slug: Bad-Slug, eventType: t, aggregation: COUNT}\n", "meters.0.slug"),
        ("meters:\n  - {slug: c, eventType: t, aggregation: COUNT, valueProperty: $.x}\n",
         "value property is not allowed"),
        ("meters:\n  - {slug: s, eventType: t, aggregation: SUM}\n", "valueProperty is required"),
        ("meters:\n  - {slug: s, eventType: t, aggregation: SUM, valueProperty: '$..x'}\n", "invalid JSONPath"),
        ("meters:\n  - {slug: s, eventType: t, aggregation: MEDIAN, valueProperty: $.x}\n", "aggregation"),
        ("meters:\n  - {slug: s, eventType: t, aggregation: COUNT, groupBy: {subject: $.s}}\n", "reserved"),
        ("meters:\n  - {slug: a, eventType: t, aggregation: COUNT}\n  - {slug: a, eventType: u, aggregation: COUNT}\n",
         "duplicate slug a"),
        ("[1, 2]\n", "top level must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    """What the CLI loads (the settings, then the meters the meters package validates)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_cli_reports_bad_config_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "meters:\n  - {slug: x, eventType: t, aggregation: SUM}\n")
    result = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(path), "migrate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgmeter: ") and str(path) in lines[0] and "valueProperty" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pgmeter", "--config", str(tmp_path / "nope.yaml"), "api"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "config file not found" in result.stderr


def test_help_lists_every_role() -> None:
    result = subprocess.run([sys.executable, "-m", "pgmeter", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for role in ("dev", "api", "sink", "refresher", "lago-sync", "migrate", "collect"):
        assert role in result.stdout


def test_durations_accept_go_style_iso_8601_and_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    path = write(tmp_path, "lago: {interval: 1h30m, grace: PT15M}\nnats: {maxAge: 768h}\ningest: {linger: 2ms}\n"
                           "refresher: {interval: 5}\n")
    settings = load_settings(path)
    assert settings.lago.interval == timedelta(hours=1, minutes=30)
    assert settings.lago.grace == timedelta(minutes=15)
    assert settings.nats.max_age == timedelta(hours=768)
    assert settings.ingest.linger == timedelta(milliseconds=2)
    assert settings.refresher.interval == timedelta(seconds=5)
    with pytest.raises(ConfigError, match="lago.interval"):
        load_settings(write(tmp_path, "lago: {interval: hourly}\n"))
    # Seconds as a string, in YAML and in the environment (once "day identifier" errors).
    assert load_settings(write(tmp_path, 'refresher: {interval: "90"}\n')).refresher.interval == timedelta(seconds=90)
    monkeypatch.setenv("PGMETER_REFRESHER_INTERVAL", "2.5")
    assert load_settings(write(tmp_path, "{}\n")).refresher.interval == timedelta(seconds=2.5)


def test_only_an_api_only_process_uses_the_pooler_url() -> None:
    from pgmeter.config import Settings
    from pgmeter.runtime import _dsn_for

    settings = Settings(postgres={"url": "postgresql://direct/db", "queryUrl": "postgresql://pooler/db"})
    assert _dsn_for(settings, frozenset({"api"})) == "postgresql://pooler/db"
    for roles in ({"sink"}, {"refresher"}, {"lago-sync"}, {"api", "sink", "refresher", "lago-sync"}):
        assert _dsn_for(settings, frozenset(roles)) == "postgresql://direct/db"
    assert _dsn_for(Settings(postgres={"url": "postgresql://direct/db"}), frozenset({"api"})) == "postgresql://direct/db"


def test_readme_meters_are_the_built_in_example() -> None:
    """The README's meters YAML and `make run`'s built-in meters are the same meters, so a
    newcomer who copies one into ./pgmeter.yaml never conflicts with data the other made."""
    import re
    from importlib import resources
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)]
    documented = next(block["meters"] for block in blocks if isinstance(block, dict) and "meters" in block)
    built_in = yaml.safe_load(resources.files("pgmeter.devstack").joinpath("example.yaml").read_text())["meters"]
    assert documented == built_in


def test_outage_bounds_server_deadlines_and_tenant_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings(write(tmp_path, "{}\n"))
    assert defaults.metrics.tenant_labels is False  # /metrics names no tenant unless asked
    assert (defaults.postgres.statement_timeout, defaults.postgres.connect_timeout) == (
        timedelta(seconds=10), timedelta(seconds=5))
    assert (defaults.server.header_timeout, defaults.server.body_timeout, defaults.server.keep_alive) == (
        timedelta(seconds=10), timedelta(seconds=30), timedelta(seconds=5))
    path = write(tmp_path, "postgres: {statementTimeout: 2s, acquireTimeout: 500ms}\n"
                           "server: {headerTimeout: 3s, bodyTimeout: 1m, keepAlive: 2s, limitConcurrency: 50}\n"
                           "metrics: {tenantLabels: true}\n")
    settings = load_settings(path)
    assert settings.postgres.statement_timeout == timedelta(seconds=2)
    assert settings.postgres.acquire_timeout == timedelta(milliseconds=500)
    assert settings.server.body_timeout == timedelta(minutes=1) and settings.server.limit_concurrency == 50
    assert settings.metrics.tenant_labels is True
    monkeypatch.setenv("PGMETER_METRICS_TENANT_LABELS", "true")
    assert load_settings(write(tmp_path, "{}\n")).metrics.tenant_labels is True
    with pytest.raises(ConfigError, match="server"):
        load_settings(write(tmp_path, "server: {headerTimeOut: 3s}\n"))
