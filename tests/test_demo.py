"""``pgmeter demo`` against a real api, sink and refresher: what it says it sent is stored."""

from __future__ import annotations

import io
import time
from datetime import timedelta

import pytest

from pgmeter import cli, demo
from pgmeter.config import Settings
from tests.support.app import AppServer


def stored_count(server: AppServer) -> float:
    with server.client() as client:
        data = client.get("/api/v1/meters/api_calls/query").json()["data"]
    return data[0]["value"] if data else 0


def test_demo_traffic_is_stored_once_with_its_duplicates_dropped(settings: Settings,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with AppServer(settings, {"api", "sink", "refresher"}) as server:
        with server.client() as client:
            assert client.post("/api/v1/meters", json={
                "slug": "api_calls", "eventType": "api.call", "aggregation": "COUNT",
                "groupBy": {"endpoint": "$.endpoint", "method": "$.method"}}).status_code == 201
        progress = io.StringIO()
        summary = demo.run(server.base_url, None, 700, rate=1e6, span=timedelta(hours=6), seed=7, out=progress)
        assert progress.getvalue().split("\r")[-1].strip().startswith(f"[{'#' * 30}] 700/700 events")
        assert summary.sent == 700 and sum(summary.per_tpp.values()) == 700
        assert summary.duplicates > 0 and summary.late > 0  # seed 7 sends some of each
        assert set(summary.per_tpp) <= set(demo.TPPS)

        # The command line: same traffic engine, a summary on stdout.
        assert cli.main(["demo", "--url", server.base_url, "--events", "150", "--rate", "1000000",
                         "--seed", "8"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("sent 150 events in ")
        cli_duplicates = int(out.split(" distinct, ")[1].split(" duplicates")[0])

        expected = 700 - summary.duplicates + 150 - cli_duplicates
        deadline = time.monotonic() + 60
        while stored_count(server) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stored_count(server) == expected


def test_demo_says_why_when_the_api_refuses(settings: Settings) -> None:
    settings.auth_tokens = {"demo-test-token-0123": "default"}
    with AppServer(settings, {"api"}) as server:
        with pytest.raises(demo.DemoError, match="401"):
            demo.run(server.base_url, "wrong-token", 10, rate=1e6, span=timedelta(hours=1), seed=1, out=io.StringIO())
    assert cli.main(["demo", "--url", "http://127.0.0.1:9", "--events", "5"]) == 1
