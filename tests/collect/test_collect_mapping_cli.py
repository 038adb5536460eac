"""jq mappings, and the command line (flags, config file, usage errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pgmeter.collect.buffer import Rejected
from pgmeter.collect.mapping import Mapping, MappingError
from pgmeter.config import LimitsConfig
from pgmeter.devstack.process import free_port
from tests.support.collect import RecordingEndpoint, wait_for
from tests.support.ingest import make_event, post_events

NOW = 1_750_000_000_000_000  # 2025-06-15T15:06:40Z in microseconds


def mapping(program: str | None) -> Mapping:
    from pgmeter.collect.app import event_limits

    return Mapping(program, "src-default", event_limits(LimitsConfig()))


def test_a_program_may_emit_several_events_or_none_and_defaults_are_filled() -> None:
    m = mapping('.items[] | {type: "t", subject: .who, time: "2025-06-15T00:00:00Z", data: {n: .n}}')
    out = m.apply({"items": [{"who": "a", "n": 1}, {"who": "b", "n": 2}]}, "rid", NOW)
    assert out.rejected == []
    assert [json.loads(e) for e in out.events] == [
        {"type": "t", "subject": "a", "time": "2025-06-15T00:00:00Z", "data": {"n": 1}, "specversion": "1.0",
         "id": "rid", "source": "src-default"},
        {"type": "t", "subject": "b", "time": "2025-06-15T00:00:00Z", "data": {"n": 2}, "specversion": "1.0",
         "id": "rid-1", "source": "src-default"}]
    assert m.apply({"items": []}, "rid", NOW).events == []
    # $id is the record's deterministic id; an event without a time gets the moment it was mapped.
    one = m.__class__('{id: ("x-" + $id), type: "t", subject: "s"}', "src", m.limits).apply({}, "rid", NOW)
    assert json.loads(one.events[0]) == {"id": "x-rid", "type": "t", "subject": "s", "specversion": "1.0",
                                         "source": "src", "time": "2025-06-15T15:06:40.000000Z"}


def test_failures_are_dead_letter_reasons_not_exceptions() -> None:
    out = mapping('if .bad then error("no good") else . end').apply({"bad": True}, "rid", NOW)
    # Each keeps the source record and its id: a replay maps it again (pgmeter.collect.dead_letters).
    assert out.events == [] and out.rejected == [
        Rejected('{"bad": true}', "mapping failed: no good", '{"bad": true}', "rid")]
    out = mapping(".n").apply({"n": 5}, "rid", NOW)
    assert out.rejected == [Rejected("5", "invalid event: an event must be a JSON object, not a number",
                                     '{"n": 5}', "rid")]
    out = mapping('{type: "t", subject: "s", time: "later"}').apply({}, "rid", NOW)
    assert out.rejected[0][1] == "invalid event: time must be an RFC 3339 date-time, e.g. 2024-01-01T00:00:00Z"
    with pytest.raises(MappingError, match="mapping does not compile"):
        mapping("{type: ")


def test_flags_run_one_http_pipeline_with_the_token_from_the_environment(tmp_path: Path) -> None:
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        listen = f"127.0.0.1:{free_port()}"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PGMETER_")},
               "PGMETER_COLLECT_TOKEN": "env-token-0123456789"}
        with open(tmp_path / "log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "pgmeter", "collect", "--listen", listen,
                                        "--to", endpoint.url, "--buffer", str(tmp_path / "buf")],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: _ready(listen), timeout=30, what="collector up")
            assert post_events(httpx.Client(base_url=f"http://{listen}"), make_event("flag-1")).status_code == 204
            wait_for(lambda: len(endpoint.accepted) == 1, what="delivery")
        finally:
            process.terminate()
            process.wait(20)
    assert endpoint.accepted[0]["id"] == "flag-1"
    assert endpoint.attempts[0][3] == "Bearer env-token-0123456789"
    assert (tmp_path / "buf" / "http.sqlite").exists()
    # JSON logs, one object per line.
    lines = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line.startswith("{")]
    assert any(entry["message"] == "collector started" for entry in lines)


def _ready(listen: str) -> bool:
    try:
        return httpx.get(f"http://{listen}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("args, message", [
    (["--listen", "127.0.0.1:1"], "pgmeter: collect: --to, --buffer required (or --config FILE)\n"),
    (["--config", "CONFIG"], "pgmeter: pipeline p: mapping does not compile: jq: error: syntax error"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    config = tmp_path / "collector.yaml"
    config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{free_port()}", "buffer": str(tmp_path / "b"),
                                      "pipelines": [{"name": "p", "source": {"type": "http"}, "mapping": "{",
                                                     "to": {"url": "http://127.0.0.1:1"}}]}))
    args = [str(config) if a == "CONFIG" else a for a in args]
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pgmeter", "collect", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert time.monotonic() - started < 60
