"""Prometheus source against a real Prometheus: one event per series per instant, replicas
and restarts counted once, missed instants caught up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.collect import CollectorServer, collector_config, wait_for
from tests.support.prometheus import start_prometheus

CALLS = 'label_replace(vector(3), "tpp", "tpp-1", "", "") or label_replace(vector(4), "tpp", "tpp-2", "", "")'
MAPPING = '{type: .name, subject: (.metric.tpp // .metric.job), time: .time, data: {value: .value}}'


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_prometheus(tmp_path_factory.mktemp("prometheus"))
    yield url
    process.stop()


def pipeline(prometheus: str, to: str) -> dict[str, Any]:
    return {"name": "prom", "source": {"type": "prometheus", "url": prometheus, "interval": "1s", "offset": "500ms",
                                       "queries": {"calls": CALLS, "up": "sum by (job) (up)"}},
            "mapping": MAPPING, "eventSource": "prometheus", "to": {"url": to, "linger": "10ms"}}


def stored_at(url: str, event_type: str, at: datetime) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE type = %s AND time = %s", (event_type, at)).fetchone()
    return int(row[0]) if row else 0


def rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT type, subject, time, data->'value', count(*) OVER (PARTITION BY type, subject, time)"
                            " FROM events ORDER BY type, time, subject").fetchall()


def test_replicas_and_a_restart_count_every_series_once_per_instant(
        settings: Settings, tmp_path: Path, prometheus_url: str) -> None:
    to = f"http://{settings.address}"
    a = collector_config(tmp_path / "a", [pipeline(prometheus_url, to)])
    b = collector_config(tmp_path / "b", [pipeline(prometheus_url, to)])
    with AppServer(settings, {"api", "sink"}):
        with CollectorServer(a), CollectorServer(b):
            time.sleep(3.2)
        time.sleep(2.5)  # nobody is collecting: these instants must be caught up
        with CollectorServer(b) as again:
            buffer = again.collector.pipelines[0].buffer
            wait_for(lambda: buffer.get_state("prometheus:calls") is not None
                     and int(buffer.get_state("prometheus:calls") or 0) >= (time.time() - 1.5) * 1000 - 1000,
                     what="caught up")
            wait_for(lambda: buffer.stats().events == 0, what="drained")
            # The sink has committed the last instant of each query (delivered in order).
            for name, series in (("calls", 2), ("up", 1)):
                last = datetime.fromtimestamp(int(buffer.get_state(f"prometheus:{name}") or 0) / 1000, UTC)
                wait_for(lambda name=name, last=last, series=series: stored_at(  # type: ignore[misc]
                    settings.postgres.url, name, last) == series, what=f"{name} at {last} stored")
    found = rows(settings.postgres.url)
    assert found and all(r[4] == 1 for r in found)  # each series once per instant
    calls = [r for r in found if r[0] == "calls"]
    instants = sorted({r[2] for r in calls})
    assert len(instants) >= 6
    # No gap across the time nobody ran: every second from the first instant to the last.
    assert instants == [instants[0] + timedelta(seconds=i) for i in range(len(instants))]
    assert all(t.microsecond == 0 for t in instants)
    assert [(r[1], r[3]) for r in calls] == [("tpp-1", 3), ("tpp-2", 4)] * len(instants)
    ups = [r for r in found if r[0] == "up"]
    assert {r[1] for r in ups} == {"prometheus"} and {r[3] for r in ups} == {1}
