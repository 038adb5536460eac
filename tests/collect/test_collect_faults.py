"""Faults: the endpoint goes away under a steady source; the collector is killed with -9."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from pgmeter.collect.ids import event_id
from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.collect import (
    CollectorProcess,
    CollectorServer,
    RecordingEndpoint,
    collector_config,
    stored_ids,
    wait_for,
)
from tests.support.ingest import make_event, post_events, stored_count, wait_until_stored


def pipeline(url: str, **to: object) -> dict[str, object]:
    return {"name": "p", "source": {"type": "http"},
            "to": {"url": url, "linger": "20ms", "backoffInitial": "50ms", "backoffMax": "500ms", **to}}


class SteadyProducer(threading.Thread):
    """Posts one small batch every ``period`` seconds until stopped; keeps the ids accepted."""

    def __init__(self, base_url: str, period: float = 0.02, per_request: int = 5) -> None:
        super().__init__(daemon=True)
        self.base_url, self.period, self.per_request = base_url, period, per_request
        self.accepted: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.halt.is_set():
                batch = [make_event(f"s-{n + i:06d}") for i in range(self.per_request)]
                n += self.per_request
                if post_events(client, batch).status_code == 204:
                    self.accepted.extend(e["id"] for e in batch)
                time.sleep(self.period)


def test_endpoint_down_for_a_while_then_back_every_event_once(settings: Settings, tmp_path: Path) -> None:
    config = collector_config(tmp_path / "buf", [pipeline(f"http://{settings.address}")])
    with CollectorServer(config) as collector:
        producer = SteadyProducer(collector.base_url)
        with AppServer(settings, {"api", "sink"}):
            producer.start()
            wait_until_stored(settings.postgres.url, 50)
        # The endpoint is down; the source keeps producing into the buffer.
        down_at = len(producer.accepted)
        wait_for(lambda: len(producer.accepted) >= down_at + 300, what="events while the endpoint is down")
        buffer = collector.collector.pipelines[0].buffer
        assert buffer.stats().events > 0
        with AppServer(settings, {"api", "sink"}):
            time.sleep(1.0)
            producer.halt.set()
            producer.join(10)
            wait_for(lambda: buffer.stats().events == 0, what="buffer drained")
            wait_until_stored(settings.postgres.url, len(producer.accepted))
    assert stored_ids(settings.postgres.url) == sorted(producer.accepted)


def test_kill_9_mid_delivery_then_restart_every_event_once(settings: Settings, tmp_path: Path) -> None:
    total = 2000
    forwarded: list[int] = []

    def slow_pgmeter(batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        # A far endpoint: pgmeter behind 100 ms of latency, so a kill lands mid-delivery.
        time.sleep(0.1)
        answer = httpx.post(f"http://{settings.address}/api/v1/events", content=json.dumps(batch),
                            headers={"content-type": "application/cloudevents-batch+json"}, timeout=30)
        forwarded.append(answer.status_code)
        return answer.status_code, {}, answer.content

    with AppServer(settings, {"api", "sink"}), RecordingEndpoint(slow_pgmeter) as endpoint:
        config = collector_config(tmp_path / "buf", [pipeline(endpoint.url, batchSize=100)])
        collector = CollectorProcess(config, tmp_path)
        collector.start()
        try:
            ids = [f"k-{i:05d}" for i in range(total)]
            with httpx.Client(base_url=collector.base_url, timeout=10) as client:
                for start in range(0, total, 500):
                    assert post_events(client, [make_event(i) for i in ids[start:start + 500]]).status_code == 204
            wait_for(lambda: 204 in forwarded, what="a first delivered batch")
            collector.kill()
            # Killed mid-way: events were still waiting in the buffer file.
            with sqlite3.connect(tmp_path / "buf" / "p.sqlite") as db:
                assert db.execute("SELECT count(*) FROM events").fetchone()[0] > 0
            collector.start()
            wait_until_stored(settings.postgres.url, total)
            wait_for(lambda: httpx.get(f"{collector.base_url}/readyz").json()["pipelines"]["p"]["buffered"] == 0,
                     what="buffer drained after restart")
        finally:
            collector.stop()
    assert stored_ids(settings.postgres.url) == ids


def test_kill_9_of_an_sql_collector_mid_read_then_restart_every_row_once(settings: Settings, tmp_path: Path) -> None:
    url = settings.postgres.url
    total = 3000
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE calls (id bigint PRIMARY KEY, tpp text NOT NULL)")
        conn.execute("INSERT INTO calls SELECT g, 'tpp-' || (g %% 7) FROM generate_series(1, %s) g", (total,))
    config = collector_config(tmp_path / "buf", [{
        "name": "rows", "source": {"type": "sql", "url": url, "table": "calls", "key": "id", "batch": 50,
                                   "interval": "50ms"},
        "mapping": '{type: "api.call", subject: .tpp}', "eventSource": "calls-db",
        "to": {"url": f"http://{settings.address}", "linger": "10ms", "batchSize": 100}}])
    collector = CollectorProcess(config, tmp_path)
    with AppServer(settings, {"api", "sink"}):
        collector.start()
        try:
            wait_for(lambda: stored_count(url) > 0, what="first rows delivered")
            collector.kill()
            with sqlite3.connect(tmp_path / "buf" / "rows.sqlite") as db:
                row = db.execute("SELECT value FROM state").fetchone()
            assert row is not None and int(json.loads(row[0])[0]) < total  # killed mid-read
            collector.start()
            wait_until_stored(url, total)
            wait_for(lambda: httpx.get(f"{collector.base_url}/readyz").json()["pipelines"]["rows"]["buffered"] == 0,
                     what="drained after restart")
        finally:
            collector.stop()
    assert stored_count(url) == total
    expected = sorted(event_id("calls-db", "sql", "calls", str(i)) for i in range(1, total + 1))
    assert stored_ids(url) == expected
