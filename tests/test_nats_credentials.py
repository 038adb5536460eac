"""NATS credentials: pgmeter connects to a nats-server that requires them.

Each test starts its own private nats-server (from the same wheel as the shared
one) with authentication switched on, because the shared server has none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgmeter.config import ConfigError, NatsConfig, Settings, load_settings
from pgmeter.devstack import binaries
from pgmeter.devstack.process import ManagedProcess, free_port, port_open, wait_until
from pgmeter.runtime import connect_nats
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

USER = "pgmeter"
PASSWORD = "s3cret-nats-password"
TOKEN = "nats-token-0123456789abcdef"

# Server-side auth flags -> the NatsConfig fields that satisfy them.
AUTH = {
    "user": (["--user", USER, "--pass", PASSWORD], {"user": USER, "password": PASSWORD}),
    "token": (["--auth", TOKEN], {"token": TOKEN}),
}
WRONG = {
    "user": {"user": USER, "password": "not-the-password"},
    "token": {"token": "not-the-token-0123456789"},
}


@pytest.fixture(params=sorted(AUTH))
def secured_nats(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, url) of a private JetStream server that requires credentials of that kind."""
    kind = request.param
    port = free_port()
    proc = ManagedProcess(
        "nats-server",
        [str(binaries.nats_server()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"),
         *AUTH[kind][0]],
        log_path=tmp_path / "nats.log",
    )
    proc.start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nats-server", process=proc)
        yield kind, f"nats://127.0.0.1:{port}"
    finally:
        proc.stop()


def _with_nats(settings: Settings, url: str, credentials: dict[str, str]) -> Settings:
    settings.nats = NatsConfig(**{**settings.nats.model_dump(by_alias=True), "url": url, **credentials})
    return settings


def test_ingest_works_with_the_right_credentials(settings: Settings, secured_nats: tuple[str, str]) -> None:
    kind, url = secured_nats
    _with_nats(settings, url, AUTH[kind][1])
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    with AppServer(settings, {"api", "sink"}) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        events = [make_event(subject="tpp-1", time=at) for _ in range(25)]
        assert post_events(client, events).status_code == 204
        assert wait_until_stored(settings.postgres.url, 25) == 25


@pytest.mark.parametrize("credentials", ["wrong", "none"])
def test_wrong_or_missing_credentials_never_connect(settings: Settings, secured_nats: tuple[str, str],
                                                    tmp_path: Path, credentials: str) -> None:
    """The runtime's connection (which every role opens before it serves anything, so
    before /readyz can answer) keeps being refused: the pod never becomes ready."""
    kind, url = secured_nats
    _with_nats(settings, url, WRONG[kind] if credentials == "wrong" else {})

    async def attempt() -> None:
        nc = await connect_nats(settings.nats.url, **settings.nats.credentials())
        await nc.close()
        raise AssertionError("connected to NATS with wrong or missing credentials")

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(attempt(), timeout=3))
    # Refused by the server for the credentials, not unreachable.
    assert "authentication error" in (tmp_path / "nats.log").read_text()


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("USER", "PASSWORD", "TOKEN", "CREDS_FILE"):
        monkeypatch.delenv(f"PGMETER_NATS_{name}", raising=False)
    config = tmp_path / "pgmeter.yaml"
    config.write_text("nats: {url: 'nats://nats:4222'}\n")

    monkeypatch.setenv("PGMETER_NATS_USER", USER)
    monkeypatch.setenv("PGMETER_NATS_PASSWORD", PASSWORD)
    loaded = load_settings(config)
    assert loaded.nats.credentials() == {"user": USER, "password": PASSWORD}
    assert PASSWORD not in repr(loaded.nats)

    monkeypatch.delenv("PGMETER_NATS_USER")
    monkeypatch.delenv("PGMETER_NATS_PASSWORD")
    monkeypatch.setenv("PGMETER_NATS_TOKEN", TOKEN)
    assert load_settings(config).nats.credentials() == {"token": TOKEN}
    assert TOKEN not in repr(load_settings(config).nats)

    monkeypatch.delenv("PGMETER_NATS_TOKEN")
    monkeypatch.setenv("PGMETER_NATS_CREDS_FILE", "/etc/pgmeter-nats/nats.creds")
    assert load_settings(config).nats.credentials() == {"user_credentials": "/etc/pgmeter-nats/nats.creds"}

    monkeypatch.delenv("PGMETER_NATS_CREDS_FILE")
    assert load_settings(config).nats.credentials() == {}


@pytest.mark.parametrize(("env", "message"), [
    ({"PGMETER_NATS_USER": USER}, "nats.user and nats.password go together"),
    ({"PGMETER_NATS_PASSWORD": PASSWORD}, "nats.user and nats.password go together"),
    ({"PGMETER_NATS_TOKEN": TOKEN, "PGMETER_NATS_CREDS_FILE": "/x.creds"}, "one kind of credentials"),
    ({"PGMETER_NATS_USER": USER, "PGMETER_NATS_PASSWORD": PASSWORD, "PGMETER_NATS_TOKEN": TOKEN},
     "one kind of credentials"),
])
def test_ambiguous_credentials_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           env: dict[str, str], message: str) -> None:
    for name in ("USER", "PASSWORD", "TOKEN", "CREDS_FILE"):
        monkeypatch.delenv(f"PGMETER_NATS_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "pgmeter.yaml"
    config.write_text("{}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(config)
    for secret in (PASSWORD, TOKEN):
        assert secret not in str(caught.value)
