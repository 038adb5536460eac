"""Valkey query cache: never staler than Postgres, and never in the way.

Every answer through ``Scenario.query`` is compared with an in-memory count of the
events sent and, byte for byte, with the same query answered by an api without
Valkey. Cache hits are counted as deltas of the process's counters around the
queries that should (or should not) hit.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import valkey as valkey_sync
from prometheus_client import REGISTRY

from pgmeter.config import Settings
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

METER = {"slug": "calls", "eventType": "api.call", "aggregation": "COUNT", "groupBy": {"endpoint": "$.endpoint"}}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Scenario:
    def __init__(self, app: AppServer, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.events: list[dict[str, Any]] = []
        self.client = app.client()
        assert self.client.post("/api/v1/meters", json=METER).status_code == 201
        # The same database through an api with no cache at all: the reference answers.
        self.uncached = AppServer(settings.model_copy(update={
            "address": f"127.0.0.1:{free_port()}",
            "valkey": settings.valkey.model_copy(update={"url": None})}), {"api"}).start()
        self.uncached_client = self.uncached.client()

    def close(self) -> None:
        self.client.close()
        self.uncached_client.close()
        self.uncached.stop()

    def send(self, times: list[datetime], subject: str = "tpp-1") -> None:
        batch = [make_event(type="api.call", subject=subject, time=t, data={"endpoint": "/a"}) for t in times]
        assert post_events(self.client, batch).status_code == 204
        self.events += batch
        wait_until_stored(self.settings.postgres.url, len(self.events))

    def get(self, params: dict[str, str], **headers: str) -> httpx.Response:
        """The cached answer, checked against the uncached one."""
        response = self.client.get("/api/v1/meters/calls/query", params=params, headers=headers)
        reference = self.uncached_client.get("/api/v1/meters/calls/query", params=params, headers=headers)
        assert response.status_code == reference.status_code == 200, response.text
        assert response.content == reference.content
        return response

    def query(self, **params: str) -> list[dict[str, Any]]:
        return self.get({"windowSize": "DAY", **params}).json()["data"]

    def expected_days(self, start: datetime) -> dict[str, int]:
        days: Tally[str] = Tally()
        for event in self.events:
            at = datetime.fromisoformat(event["time"])
            if at >= start:
                days[at.strftime("%Y-%m-%dT00:00:00Z")] += 1
        return dict(days)


def as_days(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {row["windowStart"]: row["value"] for row in rows}


@pytest.fixture
def scenario(settings: Settings) -> Iterator[Scenario]:
    with AppServer(settings, {"api", "sink", "refresher"}) as app:
        scene = Scenario(app, settings)
        yield scene
        scene.close()


def midnight(days_ago: int) -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days_ago)


def test_settled_windows_are_cached_and_late_events_invalidate(scenario: Scenario) -> None:
    start = midnight(6)
    scenario.send([start + timedelta(days=d, hours=h) for d in range(5) for h in (1, 5, 9)])
    hits = metric("pgmeter_cache_hits_total")
    first = scenario.query(**{"from": start.isoformat()})
    assert as_days(first) == scenario.expected_days(start)
    second = scenario.query(**{"from": start.isoformat()})
    assert second == first
    assert metric("pgmeter_cache_hits_total") == hits + 1  # the settled days came from Valkey

    # A late event into a cached day: the next answer includes it.
    scenario.send([start + timedelta(days=1, hours=2)])
    third = scenario.query(**{"from": start.isoformat()})
    assert as_days(third) == scenario.expected_days(start)
    assert as_days(third) != as_days(first)


def test_the_live_window_is_always_fresh(scenario: Scenario) -> None:
    start = midnight(2)
    now = datetime.now(UTC).replace(microsecond=0)
    scenario.send([start + timedelta(hours=3), now - timedelta(seconds=30)])
    assert as_days(scenario.query(**{"from": start.isoformat()})) == scenario.expected_days(start)
    scenario.send([now - timedelta(seconds=10), now - timedelta(seconds=5)])
    assert as_days(scenario.query(**{"from": start.isoformat()})) == scenario.expected_days(start)


def test_totals_over_settled_time_are_cached_and_invalidated(scenario: Scenario) -> None:
    start, end = midnight(5), midnight(3)
    scenario.send([start + timedelta(hours=h) for h in range(0, 40, 4)])
    params = {"from": start.isoformat(), "to": end.isoformat(), "windowSize": ""}
    expected = sum(scenario.expected_days(start).get(d, 0) for d in scenario.expected_days(start)
                   if d < end.strftime("%Y-%m-%dT00:00:00Z"))

    def total() -> int:
        return scenario.get({k: v for k, v in params.items() if v}).json()["data"][0]["value"]

    hits = metric("pgmeter_cache_hits_total")
    assert total() == expected and total() == expected
    assert metric("pgmeter_cache_hits_total") == hits + 1
    scenario.send([start + timedelta(hours=1, minutes=1)])
    assert total() == expected + 1


def test_valkey_down_or_slow_never_fails_a_query(settings: Settings, server_dir: Path) -> None:
    port = free_port()
    valkey, url = services.start_valkey(server_dir / "valkey", port, log_path=server_dir / "valkey.log")
    settings.valkey.url = url
    try:
        with AppServer(settings, {"api", "sink"}) as app:
            scene = Scenario(app, settings)
            start = midnight(4)
            scene.send([start + timedelta(hours=h) for h in range(0, 48, 6)])
            expected = scene.expected_days(start)
            assert as_days(scene.query(**{"from": start.isoformat()})) == expected

            errors = metric("pgmeter_cache_bypass_total", reason="error")
            valkey.stop()
            assert as_days(scene.query(**{"from": start.isoformat()})) == expected
            assert metric("pgmeter_cache_bypass_total", reason="error") > errors

            valkey, _ = services.start_valkey(server_dir / "valkey", port, log_path=server_dir / "valkey.log")
            # Until the api uses Valkey again (its back-off after the failure is over).
            deadline = time.monotonic() + 30
            while True:
                used = metric("pgmeter_cache_requests_total", result="hit") + metric(
                    "pgmeter_cache_requests_total", result="miss")
                assert as_days(scene.query(**{"from": start.isoformat()})) == expected
                if metric("pgmeter_cache_requests_total", result="hit") + metric(
                        "pgmeter_cache_requests_total", result="miss") > used:
                    break
                assert time.monotonic() < deadline, "the api never went back to Valkey"
                time.sleep(0.1)
            # Valkey that hangs (all clients paused for 10 s) is waited for only briefly:
            # the answer comes long before the pause ends (a generous bound, not a target;
            # the api's own wait is 2 x valkey.timeout, 0.1 s).
            pauser = valkey_sync.Valkey(host="127.0.0.1", port=port)
            timeouts = metric("pgmeter_cache_bypass_total", reason="timeout")
            pauser.execute_command("CLIENT", "PAUSE", 10_000, "ALL")
            started = time.monotonic()
            assert as_days(scene.query(**{"from": start.isoformat()})) == expected
            assert time.monotonic() - started < 6
            assert metric("pgmeter_cache_bypass_total", reason="timeout") == timeouts + 1
            pauser.close()  # (an UNPAUSE would itself wait for the pause to end)
            scene.close()
    finally:
        valkey.stop()


def test_settled_answers_are_cached_per_format(scenario: Scenario) -> None:
    start, end = midnight(6), midnight(2)
    scenario.send([start + timedelta(days=d, hours=3) for d in range(4)])
    params = {"from": start.isoformat(), "to": end.isoformat(), "windowSize": "DAY", "groupBy": "subject"}
    hits = metric("pgmeter_cache_hits_total")
    as_json = [scenario.get(params) for _ in range(2)]
    as_csv = [scenario.get(params, accept="text/csv") for _ in range(2)]
    assert metric("pgmeter_cache_hits_total") == hits + 2  # the second of each format
    assert as_json[0].content == as_json[1].content and as_csv[0].content == as_csv[1].content
    assert as_json[1].headers["content-type"] == "application/json"
    assert as_csv[1].headers["content-type"].startswith("text/csv")
    assert as_csv[1].text.startswith("window_start,window_end,subject,value\n")
    rows = as_json[1].json()["data"]
    assert {r["windowStart"]: r["value"] for r in rows} == {
        day: count for day, count in scenario.expected_days(start).items() if day < end.strftime("%Y-%m-%dT")}
    # A late event into the cached range: both formats answer fresh.
    scenario.send([start + timedelta(days=1, hours=5)])
    fresh = scenario.get(params).json()["data"]
    assert sum(r["value"] for r in fresh) == sum(r["value"] for r in rows) + 1
    fresh_csv = scenario.get(params, accept="text/csv")
    assert fresh_csv.text != as_csv[1].text
