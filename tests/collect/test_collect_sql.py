"""SQL source against real Postgres: incremental, persisted cursor, replicas counted once."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from pgmeter.collect.ids import event_id
from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, stored_ids, wait_for
from tests.support.ingest import stored_count, wait_until_stored

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
# Row -> CloudEvent. The id is left to the collector (derived from the row key).
MAPPING = '{type: "api.call", subject: .customer, time: .at, data: {tokens: .tokens}}'


def make_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE usage_rows (row_id bigint PRIMARY KEY, customer text, tokens int, "
                     "at timestamptz NOT NULL)")


def insert_rows(url: str, first: int, count: int, customer: str | None = "c-1") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO usage_rows VALUES (%s, %s, %s, %s)",
            [(i, customer, i, BASE + timedelta(seconds=i)) for i in range(first, first + count)])


def sql_pipeline(name: str, db_url: str, to: str, **source: object) -> dict[str, Any]:
    return {"name": name, "source": {"type": "sql", "url": db_url, "table": "public.usage_rows",
                                     "key": "row_id", "interval": "50ms", "batch": 40, **source},
            "mapping": MAPPING, "eventSource": "billing-db", "to": {"url": to, "linger": "10ms"}}


def test_rows_are_read_once_across_restarts_and_bad_rows_are_dead_lettered(
        database_url: str, tmp_path: Path) -> None:
    make_table(database_url)
    insert_rows(database_url, 1, 100)
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [sql_pipeline("rows", database_url, endpoint.url)])
        with CollectorServer(config):
            wait_for(lambda: len(endpoint.accepted) == 100, what="first 100 rows")
        insert_rows(database_url, 101, 30)
        insert_rows(database_url, 131, 2, customer=None)  # subject null: invalid after mapping
        insert_rows(database_url, 133, 20)
        with CollectorServer(config) as collector:
            wait_for(lambda: len(endpoint.accepted) == 150, what="the new rows")
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: len(buffer.dead_letters()) == 2, what="dead letters")
            dead = buffer.dead_letters()
            position = buffer.get_state("sql:public.usage_rows:row_id:row_id")
    ids = [e["id"] for e in endpoint.accepted]
    assert len(set(ids)) == 150  # nothing re-read after the restart
    expected_rows = [*range(1, 131), *range(133, 153)]
    assert ids == [event_id("billing-db", "sql", "public.usage_rows", str(i)) for i in expected_rows]
    first = endpoint.accepted[0]
    assert (first["source"], first["subject"], first["data"], first["specversion"]) == \
        ("billing-db", "c-1", {"tokens": 1}, "1.0")
    assert datetime.fromisoformat(first["time"]) == BASE + timedelta(seconds=1)
    assert [json.loads(d["payload"])["id"] for d in dead] == \
        [event_id("billing-db", "sql", "public.usage_rows", str(i)) for i in (131, 132)]
    assert dead[0]["reason"] == "invalid event: subject is required"  # the api's words for null
    assert json.loads(position or "null") == ["152", "152"]


def test_two_replicas_on_the_same_table_count_each_row_once(settings: Settings, tmp_path: Path) -> None:
    url = settings.postgres.url
    make_table(url)
    insert_rows(url, 1, 120)
    to = f"http://{settings.address}"
    one = collector_config(tmp_path / "a", [sql_pipeline("rows", url, to)])
    two = collector_config(tmp_path / "b", [sql_pipeline("rows", url, to)])
    with AppServer(settings, {"api", "sink"}), CollectorServer(one) as a, CollectorServer(two) as b:
        insert_rows(url, 121, 80)
        for replica in (a, b):
            wait_for(lambda r=replica: r.collector.pipelines[0].buffer.get_state(  # type: ignore[misc]
                "sql:public.usage_rows:row_id:row_id") == '["200", "200"]', what="replica caught up")
            wait_for(lambda r=replica: r.collector.pipelines[0].buffer.stats().events == 0,  # type: ignore[misc]
                     what="replica drained")
        wait_until_stored(url, 200)
    assert stored_count(url) == 200
    assert len(set(stored_ids(url))) == 200


def test_a_full_buffer_holds_the_source_back_without_skipping_a_row(database_url: str, tmp_path: Path) -> None:
    """The documented policy for pull sources: wait (cursor unchanged), then go on - nothing dropped."""
    make_table(database_url)
    insert_rows(database_url, 1, 100)
    endpoint_up = False

    def answer(batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        return (204, {}, b"") if endpoint_up else (503, {"Retry-After": "0.05"}, b"")

    with RecordingEndpoint(answer) as endpoint:
        pipeline = {**sql_pipeline("held", database_url, endpoint.url), "bufferMaxBytes": 2048}
        config = collector_config(tmp_path / "buf", [pipeline])
        with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: 'pgmeter_collect_refused_total{pipeline="held"}' in client.get("/metrics").text,
                     what="the source refused by the full buffer")
            # The first batch (40 rows, more than the bound) went into the empty buffer;
            # the second waits, and the committed cursor stays after row 40.
            assert buffer.stats().events == 40
            assert buffer.get_state("sql:public.usage_rows:row_id:row_id") == '["40", "40"]'
            assert endpoint.accepted == []
            endpoint_up = True
            wait_for(lambda: len(endpoint.accepted) == 100, what="every row once the endpoint is back")
            wait_for(lambda: buffer.stats().events == 0, what="drained")
    assert [e["id"] for e in endpoint.accepted] == [
        event_id("billing-db", "sql", "public.usage_rows", str(i)) for i in range(1, 101)]
