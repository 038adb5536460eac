"""The sink: exactly-once storage, partitions, dead letters, retention.

One api+sink server is shared by the module (own database and stream). Raw
messages are published straight to the stream's subject to play a producer that
is not our api.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import nats
import psycopg
import pytest

from pgmeter.config import Settings
from pgmeter.ingest import wire
from pgmeter.ingest.cloudevents import now_micros, parse_time
from pgmeter.sink import partitions, store
from tests.support.app import AppServer
from tests.support.faults import blocked_writers
from tests.support.ingest import dead_letters, isolated_settings, make_event, post_events, rfc3339
from tests.support.metrics import delta, scrape


@pytest.fixture(scope="module")
def module_settings(pg_server: Any, nats_server: Any) -> Iterator[Settings]:
    with isolated_settings(pg_server, nats_server.url) as settings:
        yield settings


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[AppServer]:
    with AppServer(module_settings, {"api", "sink"}) as running:
        yield running


@pytest.fixture
def client(server: AppServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def rows(settings: Settings, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres.url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def wait_for(check: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stored_ids(settings: Settings, source: str) -> list[tuple[Any, ...]]:
    return rows(settings, "SELECT id, time, data, tableoid::regclass::text FROM events WHERE source = %s "
                          "ORDER BY id, time", source)


def publish_raw(settings: Settings, payloads: list[bytes], subject: str | None = None) -> list[int]:
    """Publish bytes straight to the stream; returns their stream sequences."""
    async def run() -> list[int]:
        nc = await nats.connect(settings.nats.url)
        try:
            js = nc.jetstream()
            target = subject or f"{settings.nats.subject_prefix}.default"
            return [(await js.publish(target, payload)).seq for payload in payloads]
        finally:
            await nc.close()
    return asyncio.run(run())


def message(*events: Any) -> bytes:
    """A wire message holding these raw event arrays (valid or not)."""
    fragments = [json.dumps(event).encode() for event in events]
    return wire.build_message(now_micros(), fragments)


def ago(days: float = 0, **delta: float) -> datetime:
    """A time relative to now (event times must be within limits.eventMaxAge of it)."""
    return datetime.now(UTC) - timedelta(days=days, **delta)


def micros(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000 + when.microsecond


def wire_event(event_id: str, source: str, when: datetime | None = None, data: str | None = '{"v":1}') -> list[Any]:
    return [event_id, source, "api.call", "subject-1", micros(when or ago(hours=1)), data]


def daily(when: datetime | date) -> str:
    return f"events_p{when:%Y%m%d}"


def partition_names(settings: Settings) -> set[str]:
    return {r[0] for r in rows(settings, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                         "WHERE i.inhparent = 'events'::regclass")}


# -- dedup -----------------------------------------------------------------------------------


def test_duplicates_within_one_request_count_once_and_the_first_wins(client: httpx.Client,
                                                                      module_settings: Settings) -> None:
    first = make_event("dup-1", source="within", data={"copy": 1})
    batch = [first, {**first, "data": {"copy": 2}}, make_event("other", source="within"), {**first, "data": {"copy": 3}}]
    assert post_events(client, batch).status_code == 204
    found = wait_for(lambda: len(stored_ids(module_settings, "within")) == 2 and stored_ids(module_settings, "within"))
    assert {r[0]: r[2] for r in found}["dup-1"] == {"copy": 1}


def test_duplicates_across_requests_and_partitions_count_once(client: httpx.Client,
                                                               module_settings: Settings) -> None:
    first = ago(10).replace(hour=8, minute=0, second=0, microsecond=0)
    original = make_event("dup-2", source="across", time=first, data={"copy": "original"})
    assert post_events(client, original).status_code == 204
    wait_for(lambda: stored_ids(module_settings, "across"), what="the original")
    # A retry with the same time, then copies dated on other days (other partitions).
    for when in (first, first + timedelta(days=1), ago(200), ago(hours=-12)):
        assert post_events(client, {**original, "time": rfc3339(when), "data": {"copy": str(when)}}).status_code == 204
    marker = make_event("marker", source="across", time=ago(hours=-12))
    assert post_events(client, marker).status_code == 204
    found = wait_for(lambda: len(stored_ids(module_settings, "across")) == 2 and stored_ids(module_settings, "across"))
    by_id = {r[0]: r for r in found}
    assert by_id["dup-2"][1] == first
    assert by_id["dup-2"][2] == {"copy": "original"}
    assert by_id["dup-2"][3] == daily(first)
    key = store.dedup_key("default", "across", "dup-2")
    assert rows(module_settings, "SELECT count(*) FROM event_dedup WHERE key = %s::uuid", key) == [(1,)]


def test_same_id_from_another_source_is_another_event(client: httpx.Client, module_settings: Settings) -> None:
    events = [make_event("shared-id", source="source-a"), make_event("shared-id", source="source-b")]
    assert post_events(client, events).status_code == 204
    wait_for(lambda: rows(module_settings, "SELECT count(*) FROM events WHERE id = 'shared-id'") == [(2,)])


def test_dedup_key_in_python_equals_the_sql_expression(module_settings: Settings) -> None:
    cases = [("default", "src", "id-1"), ("ns-2", "https://example.com/x?y=1", "ünïcødé ✓"), ("a", "b", "")]
    for namespace, source, event_id in cases:
        [(sql_key,)] = rows(module_settings, f"SELECT replace(({store.DEDUP_KEY_SQL})::text, '-', '') FROM "
                                             "(SELECT %s::text AS namespace, %s::text AS source, %s::text AS id) t",
                            namespace, source, event_id)
        assert sql_key == store.dedup_key(namespace, source, event_id)


# -- partitions ------------------------------------------------------------------------------


def test_recent_days_get_daily_partitions_and_older_days_share_a_month(client: httpx.Client,
                                                                       module_settings: Settings) -> None:
    day = ago(3).replace(hour=0, minute=0, second=0, microsecond=0)
    old = ago(100)
    times = {"late-1": day - timedelta(microseconds=1), "late-2": day, "early": ago(hours=-20), "old": old}
    events = [make_event(event_id, source="partitions", time=when) for event_id, when in times.items()]
    assert post_events(client, events).status_code == 204
    found = wait_for(lambda: len(stored_ids(module_settings, "partitions")) == 4
                     and stored_ids(module_settings, "partitions"))
    by_id = {r[0]: r[3] for r in found}
    # The span of the old event: its calendar month (no other partition is that old here).
    first = old.date().replace(day=1)
    last = (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
    assert by_id == {"late-1": daily(day - timedelta(days=1)), "late-2": daily(day),
                     "early": daily(times["early"]), "old": f"events_p{first:%Y%m%d}_{last:%Y%m%d}"}
    bounds = dict(rows(module_settings, "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                                        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"))
    assert "DEFAULT" not in " ".join(bounds.values())
    with psycopg.connect(module_settings.postgres.url) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        expr = dict(conn.execute("SELECT relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_class c "
                                 "WHERE relname = ANY(%s)", ([by_id["late-2"], by_id["old"]],)).fetchall())
    assert expr == {
        by_id["late-2"]: f"FOR VALUES FROM ('{day:%Y-%m-%d} 00:00:00+00') TO "
                         f"('{day + timedelta(days=1):%Y-%m-%d} 00:00:00+00')",
        by_id["old"]: f"FOR VALUES FROM ('{first:%Y-%m-%d} 00:00:00+00') TO "
                      f"('{last + timedelta(days=1):%Y-%m-%d} 00:00:00+00')"}


def test_a_span_fills_only_the_gap_between_existing_partitions() -> None:
    today = partitions.today()
    # Days 10 and 20 of a month older than the daily range have daily partitions
    # (made while they were recent); a day between them gets exactly the gap.
    month = (partitions.EPOCH_DAY + timedelta(days=today - 120)).replace(day=1)
    d10, d20 = ((month.replace(day=n) - partitions.EPOCH_DAY).days for n in (10, 20))
    existing = [partitions.Span(d10, d10 + 1), partitions.Span(d20, d20 + 1)]
    assert partitions.span_for(d10 + 5, existing, today) == partitions.Span(d10 + 1, d20)
    month_start = (month - partitions.EPOCH_DAY).days
    assert partitions.span_for(d10 - 3, existing, today) == partitions.Span(month_start, d10)
    # A recent day always gets its own day; the month before the daily range is cut at it.
    assert partitions.span_for(today - 2, existing, today) == partitions.Span(today - 2, today - 1)
    edge = today - partitions.DAILY_DAYS - 1
    span = partitions.span_for(edge, [], today)
    assert span.hi == today - partitions.DAILY_DAYS and edge in span
    assert partitions.span_of_name(span.name) == span


def test_partitions_are_kept_ready_ahead(server: AppServer, module_settings: Settings) -> None:
    today = datetime.now(UTC).date()
    wanted = {f"events_p{today + timedelta(days=n):%Y%m%d}" for n in range(-1, module_settings.sink.partition_days_ahead + 1)}
    names = wait_for(lambda: (lambda found: wanted <= found and found)(
        {r[0] for r in rows(module_settings, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                             "WHERE i.inhparent = 'events'::regclass")}), what="partitions ahead")
    assert wanted <= names


def test_concurrent_creators_attach_a_partition_once(database_url: str) -> None:
    now = datetime(2025, 9, 12, 12, tzinfo=UTC)
    day = (date(2025, 9, 9) - partitions.EPOCH_DAY).days
    # Days of one old month, created concurrently: one span serves them all.
    old_days = [(date(2025, 3, n) - partitions.EPOCH_DAY).days for n in (2, 9, 17, 30, 31, 5)]

    async def run(days: list[int]) -> list[bool]:
        conns = [await asyncpg.connect(database_url) for _ in range(len(days))]
        try:
            return list(await asyncio.gather(*(partitions.create_partition(c, d, now=now)
                                               for c, d in zip(conns, days, strict=True))))
        finally:
            for c in conns:
                await c.close()

    assert sorted(asyncio.run(run([day] * 6))) == [False] * 5 + [True]
    assert sorted(asyncio.run(run(old_days))) == [False] * 5 + [True]
    with psycopg.connect(database_url) as conn:
        names = {r[0] for r in conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                            "WHERE i.inhparent = 'events'::regclass").fetchall()}
        assert names == {"events_p20250909", "events_p20250301_20250331"}
        # The CHECK that made the attach cheap is gone again; the bound does its job.
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname LIKE 'events_p%%_bound'"
                            ).fetchone() == (0,)


def test_retention_drops_old_partitions_and_their_dedup_rows(database_url: str) -> None:
    now = datetime(2025, 6, 30, 12, tzinfo=UTC)
    old_day, kept_day = date(2025, 5, 29), date(2025, 6, 25)
    # Spans: March, and May 1-25 (cut where the daily range begins, 35 days before now).
    # 45 days' retention (horizon May 16) drops March only; 30 days' drops May's span too.
    span_days = (date(2025, 3, 10), date(2025, 5, 3))

    async def run() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(database_url)
        try:
            await store.prepare(conn)
            for day in (old_day, kept_day, *span_days):
                await partitions.create_partition(conn, (day - partitions.EPOCH_DAY).days, now=now)
            assert await partitions.apply_retention(conn, retention_days=45, now=now) == ["events_p20250301_20250331"]
            keys, records = [], []
            for n, day in enumerate((old_day, old_day, kept_day)):
                micros = int(datetime(day.year, day.month, day.day, 6, tzinfo=UTC).timestamp()) * 1_000_000
                keys.append(store.dedup_key("default", "ret", f"e{n}"))
                records.append(("default", f"e{n}", "ret", "t", "s", micros, None, micros, 1))
            await store.write(conn, keys, records, [])
            dropped = await partitions.apply_retention(conn, retention_days=30, now=now)
            again = await partitions.apply_retention(conn, retention_days=30, now=now)
            return dropped, again
        finally:
            await conn.close()

    dropped, again = asyncio.run(run())
    assert dropped == ["events_p20250501_20250525", "events_p20250529"] and again == []
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('events_p20250529')").fetchone() == (None,)
        assert conn.execute("SELECT id FROM events").fetchall() == [("e2",)]
        assert conn.execute("SELECT count(*) FROM event_dedup").fetchone() == (1,)


def test_events_past_retention_are_dead_lettered(pg_server: Any, nats_server: Any) -> None:
    with isolated_settings(pg_server, nats_server.url, sink={"retentionDays": 10}) as settings, \
            AppServer(settings, {"api", "sink"}) as app, app.client() as http:
        recent = make_event(source="ret", time=datetime.now(UTC) - timedelta(days=2))
        old = make_event(source="ret", time=datetime.now(UTC) - timedelta(days=40))
        # The api refuses it at the door (limits.eventMaxAge, narrowed by retentionDays)...
        refused = post_events(http, [old, recent])
        assert refused.status_code == 400
        assert [(e["index"], e["field"]) for e in refused.json()["extensions"]["validationErrors"]] == [(0, "time")]
        assert post_events(http, recent).status_code == 204
        # ...and the sink dead-letters it when it reaches the stream some other way.
        publish_raw(settings, [message(wire_event(old["id"], "ret", when=ago(40)))])
        letters = wait_for(lambda: dead_letters(settings.postgres.url), what="a dead letter")
        assert [(d["item"], "retention" in d["reason"]) for d in letters] == [(0, True)]
        wait_for(lambda: rows(settings, "SELECT id FROM events") == [(recent["id"],)])


# -- dead letters ----------------------------------------------------------------------------


def test_garbage_is_dead_lettered_and_its_neighbours_land(server: AppServer, module_settings: Settings) -> None:
    before = len(dead_letters(module_settings.postgres.url))
    payloads = [
        message(wire_event("n-1", "garbage")),
        b"this is not json",
        message(wire_event("n-2", "garbage"), ["too", "short"], wire_event("n-3", "garbage"), 42),
        b'{"v": 2, "at": 1, "events": []}',
        b'{"v": 1, "at": "soon", "events": []}',
        message(wire_event("n-4", "garbage", data="not an object"), wire_event("n-5", "garbage", data=None)),
    ]
    seqs = publish_raw(module_settings, payloads)
    wait_for(lambda: len(stored_ids(module_settings, "garbage")) == 4, what="the good neighbours")
    assert [r[0] for r in stored_ids(module_settings, "garbage")] == ["n-1", "n-2", "n-3", "n-5"]
    letters = wait_for(lambda: (lambda d: len(d) - before >= 6 and d)(dead_letters(module_settings.postgres.url)))
    mine = {(d["stream_seq"], d["item"]): d for d in letters if d["stream_seq"] in seqs}
    assert sorted(mine) == sorted([(seqs[1], -1), (seqs[2], 1), (seqs[2], 3), (seqs[3], -1), (seqs[4], -1),
                                   (seqs[5], 0)])
    assert "not valid JSON" in mine[(seqs[1], -1)]["reason"]
    assert bytes(mine[(seqs[1], -1)]["payload"]) == b"this is not json"
    assert "v1" in mine[(seqs[3], -1)]["reason"]
    assert mine[(seqs[2], 1)]["subject"] == f"{module_settings.nats.subject_prefix}.default"


def test_what_postgres_rejects_is_isolated_to_the_event(server: AppServer, module_settings: Settings) -> None:
    payloads = [
        message(wire_event("p-1", "rejected"), wire_event("p-2", "rejected", data="{not json}"),
                wire_event("p-3", "rejected")),
        message(wire_event("p-4", "rejected")),
        (b'{"v":1,"at":%d,"events":[["\\ud800","rejected","t","s",%d,null],'
         b'["p-5","rejected","t","s",%d,"{\\"a\\":\\"\\\\u0000\\"}"],'
         b'["p-6","rejected","t","s",%d,null],'
         b'["p-7","rejected","t","s",%d,"{\\"a\\":\\"\\udc00\\"}"]]}') % (now_micros(), *[micros(ago(1))] * 4),
    ]
    seqs = publish_raw(module_settings, payloads)
    wait_for(lambda: len(stored_ids(module_settings, "rejected")) == 4, what="the good events")
    assert [r[0] for r in stored_ids(module_settings, "rejected")] == ["p-1", "p-3", "p-4", "p-6"]
    letters = wait_for(lambda: (lambda d: len(d) == 4 and d)(
        [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] in seqs]))
    assert sorted((d["stream_seq"], d["item"]) for d in letters) == [
        (seqs[0], 1), (seqs[2], 0), (seqs[2], 1), (seqs[2], 3)]
    reasons = {(d["stream_seq"], d["item"]): d["reason"] for d in letters}
    assert "JSON" in reasons[(seqs[0], 1)]
    assert "surrogate" in reasons[(seqs[2], 0)] and "surrogate" in reasons[(seqs[2], 3)]
    assert "NUL" in reasons[(seqs[2], 1)]


def test_events_at_or_before_1970_are_dead_lettered(server: AppServer, module_settings: Settings) -> None:
    [seq] = publish_raw(module_settings, [message(
        ["epoch", "epoch", "t", "s", 0, None], ["moon", "epoch", "t", "s", micros(datetime(1969, 7, 20, tzinfo=UTC)), None],
        wire_event("fine", "epoch"))])
    wait_for(lambda: stored_ids(module_settings, "epoch"), what="the good event")
    assert [r[0] for r in stored_ids(module_settings, "epoch")] == ["fine"]
    letters = wait_for(lambda: [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] == seq])
    assert sorted((d["item"], d["reason"]) for d in letters) == [
        (0, "time is at or before 1970-01-01T00:00:00Z"), (1, "time is at or before 1970-01-01T00:00:00Z")]


def test_a_subject_without_a_namespace_is_dead_lettered(server: AppServer, module_settings: Settings) -> None:
    [seq] = publish_raw(module_settings, [message(wire_event("x", "nowhere"))],
                        subject=f"{module_settings.nats.subject_prefix}.two.tokens")
    letters = wait_for(lambda: [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] == seq])
    assert letters[0]["item"] == -1 and "namespace" in letters[0]["reason"]


def test_the_same_batch_written_twice_stores_nothing_twice(module_settings: Settings, server: AppServer) -> None:
    """What a redelivery amounts to in the store: the same keys, events and dead letters again.

    This calls store.write directly; redeliveries through JetStream after a crash are
    in test_faults.py.
    """
    dead = [store.DeadLetter(999_999, 0, "s", "r", b"p")]
    micros = parse_time("2024-03-01T00:00:00Z")
    records = [("default", f"r{n}", "redelivered", "t", "s", micros, None, micros, 999_999) for n in range(3)]
    keys = [store.dedup_key(*r[:1], r[2], r[1]) for r in records]

    async def run() -> list[store.Outcome]:
        conn = await asyncpg.connect(module_settings.postgres.url)
        try:
            await store.prepare(conn)
            await partitions.PartitionMap().ensure(conn, {partitions.day_of(micros)})
            return [await store.write(conn, keys, records, dead), await store.write(conn, keys, records, dead)]
        finally:
            await conn.close()

    first, second = asyncio.run(run())
    assert first.stored["default"] == 3 and second.stored["default"] == 0 and second.duplicates["default"] == 3
    assert rows(module_settings, "SELECT count(*) FROM events WHERE source = 'redelivered'") == [(3,)]
    assert rows(module_settings, "SELECT count(*) FROM dead_letters WHERE stream_seq = 999999") == [(1,)]


def test_sink_metrics(client: httpx.Client, module_settings: Settings) -> None:
    """Two new events and one repeat: processed grows by exactly 2, duplicates by exactly 1."""
    before = scrape(client)
    event = make_event(source="metrics")
    assert post_events(client, [event, event, make_event(source="metrics")]).status_code == 204
    wait_for(lambda: rows(module_settings, "SELECT count(*) FROM events WHERE source = 'metrics'") == [(2,)])
    # The counters move after COMMIT; give them the moment between COMMIT and increment.
    wait_for(lambda: delta(before, scrape(client), "openmeter_events_processed_total") >= 2
             and delta(before, scrape(client), "pgmeter_events_duplicate_total") >= 1)
    after = scrape(client)
    assert delta(before, after, "openmeter_events_processed_total") == 2
    assert delta(before, after, "pgmeter_events_duplicate_total") == 1
    assert delta(before, after, "pgmeter_dead_letters_total") == 0
    assert {name for name, _, _ in after} >= {"pgmeter_sink_pending_messages", "pgmeter_dead_letters_total"}


class _FakeMsg:
    def __init__(self) -> None:
        self.acked = asyncio.Event()

    async def ack(self) -> None:
        self.acked.set()

    async def in_progress(self) -> None:
        pass


def test_two_writers_keep_the_first_copy_by_stream_order(module_settings: Settings) -> None:
    """A batch sharing a key with an earlier, still uncommitted batch waits for it in the sink.

    The interleaving is forced: an open transaction of ours has claimed the key of
    batch 1's first event, so writer 1 blocks inside its COPY before it reaches the
    shared key ``a``. Writer 2, holding batch 2 (``a`` again), must not go to Postgres
    meanwhile: if it did, it would claim ``a`` first and its copy would win.
    """
    from types import SimpleNamespace

    from pgmeter.sink import worker

    settings = module_settings.model_copy(update={"sink": module_settings.sink.model_copy(
        update={"max_events_per_tx": 2})})
    url = module_settings.postgres.url
    micros = parse_time("2024-04-01T00:00:00Z")

    def pending(seq: int, *events: tuple[str, str]) -> worker.Pending:
        item = worker.Pending(_FakeMsg(), seq, "s", 0.0)  # type: ignore[arg-type]
        for event_id, data in events:
            item.keys.append(store.dedup_key("default", "order", event_id))
            item.records.append(("default", event_id, "order", "t", "s", micros, data, micros, seq))
            item.indexes.append(len(item.indexes))
            item.days.add(partitions.day_of(micros))
        return item

    first = pending(1, ("x", '{"copy":1}'), ("a", '{"copy":1}'))
    second = pending(2, ("a", '{"copy":2}'), ("c", '{"copy":2}'))

    async def run() -> None:
        sink = worker.Sink(SimpleNamespace(settings=settings, js=None, pool=None, post_commit=[]))  # type: ignore[arg-type]
        assert len(sink.slots) == 2
        holder = psycopg.connect(url)
        holder.execute("INSERT INTO event_dedup (key, event_time) VALUES (%s, '2024-04-01T00:00:00Z')",
                       (store.dedup_key("default", "order", "x"),))  # uncommitted: writer 1 waits on it
        writers = [asyncio.ensure_future(worker._run_writer(sink, slot)) for slot in sink.slots]
        try:
            for item in (first, second):
                sink.queue.append(item)
                sink.buffered += item.weight
            sink._has_data.set()
            holder_pid = holder.info.backend_pid
            deadline = time.monotonic() + 30
            while len(sink._writing) < 2 or await asyncio.to_thread(blocked_writers, url, holder_pid) == 0:
                assert time.monotonic() < deadline, "writer 1 never blocked with writer 2 holding batch 2"
                await asyncio.sleep(0.02)
            # Both writers hold a batch and writer 1 is stuck in its transaction. Given a
            # second, writer 2 would have committed if it did not wait for writer 1.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(second.msg.acked.wait(), 1.0)  # type: ignore[attr-defined]
            assert sum(slot.conn is not None for slot in sink.slots) == 1, "writer 2 went to Postgres"
            assert await asyncio.to_thread(blocked_writers, url, holder_pid) == 1
            holder.rollback()  # writer 1 proceeds, commits, then writer 2 runs
            await asyncio.wait_for(asyncio.gather(*(item.msg.acked.wait() for item in (first, second))), 30)  # type: ignore[attr-defined]
        finally:
            holder.close()
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)

    asyncio.run(run())
    found = dict(rows(module_settings, "SELECT id, data->>'copy' FROM events WHERE source = 'order'"))
    assert found == {"x": "1", "a": "1", "c": "2"}


# -- hostile messages published straight to the stream (issue 10) --------------------------


def test_oversized_fields_are_dead_lettered_and_other_tenants_land(server: AppServer,
                                                                   module_settings: Settings) -> None:
    prefix = module_settings.nats.subject_prefix
    huge = base64.b64encode(os.urandom(6000)).decode()  # past the btree row limit, incompressible
    hostile = message(wire_event("a-1", "hostile"), ["a-2", "hostile", huge, "s", micros(ago(1)), None],
                      ["a-3", "hostile", "t", huge, micros(ago(1)), None],
                      ["a-4" * 100, "hostile", "t", "s", micros(ago(1)), None],
                      ["a-5", "x" * 100_000, "t", "s", micros(ago(1)), None], wire_event("a-6", "hostile"))
    calm = [message(*(wire_event(f"b-{n}-{m}", "calm") for m in range(10))) for n in range(5)]
    seqs = publish_raw(module_settings, [hostile, hostile], subject=f"{prefix}.tenant-a")
    publish_raw(module_settings, calm, subject=f"{prefix}.tenant-b")
    wait_for(lambda: rows(module_settings, "SELECT count(*) FROM events WHERE namespace = 'tenant-b'") == [(50,)],
             timeout=15, what="tenant B's events")
    wait_for(lambda: [r[0] for r in stored_ids(module_settings, "hostile")] == ["a-1", "a-6"], what="A's good events")
    letters = wait_for(lambda: (lambda d: len(d) == 8 and d)(
        [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] in seqs]))
    reasons = {(d["stream_seq"], d["item"]): d["reason"] for d in letters}
    limits = module_settings.limits
    for seq in seqs:
        assert reasons[(seq, 1)] == f"type must be at most {limits.event_type_bytes} bytes (UTF-8)"
        assert reasons[(seq, 2)] == f"subject must be at most {limits.event_subject_bytes} bytes (UTF-8)"
        assert reasons[(seq, 3)] == f"id must be at most {limits.event_id_bytes} bytes (UTF-8)"
        assert reasons[(seq, 4)] == f"source must be at most {limits.event_source_bytes} bytes (UTF-8)"


def test_times_outside_the_window_are_dead_lettered_against_the_messages_at(server: AppServer,
                                                                            module_settings: Settings) -> None:
    before = partition_names(module_settings)
    at = now_micros()
    day = 86_400_000_000
    events = [["w-old", "window", "t", "s", at - 401 * day, None], ["w-ahead", "window", "t", "s", at + 2 * day, None],
              ["w-far", "window", "t", "s", micros(datetime(9999, 12, 31, tzinfo=UTC)), None],
              ["w-1971", "window", "t", "s", micros(datetime(1971, 1, 1, tzinfo=UTC)), None],
              ["w-ok", "window", "t", "s", at - 2 * 3_600_000_000, None]]
    payloads = [wire.build_message(at, [json.dumps(e).encode() for e in events]),
                # "at" itself is checked against the broker's clock: a forged one dead-letters the message.
                wire.build_message(at - 30 * day, [json.dumps(["w-forged", "window", "t", "s", at - 31 * day, None])
                                                   .encode()])]
    seqs = publish_raw(module_settings, payloads)
    wait_for(lambda: [r[0] for r in stored_ids(module_settings, "window")] == ["w-ok"], what="the good event")
    letters = wait_for(lambda: (lambda d: len(d) == 5 and d)(
        [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] in seqs]))
    reasons = {(d["stream_seq"], d["item"]): d["reason"] for d in letters}
    assert reasons[(seqs[0], 0)].startswith("time is more than 400 days before the time it was received")
    assert reasons[(seqs[0], 1)].startswith("time is more than 24 hours after the time it was received")
    assert reasons[(seqs[0], 2)].startswith("time is more than 24 hours after")
    assert reasons[(seqs[0], 3)].startswith("time is more than 400 days before")
    assert reasons[(seqs[1], -1)] == 'message time "at" is more than an hour away from when the broker stored the message'
    assert partition_names(module_settings) == before


def test_only_subjects_our_api_could_publish_name_a_namespace(server: AppServer, module_settings: Settings) -> None:
    prefix = module_settings.nats.subject_prefix
    bad = [f"{prefix}.{'n' * 65}", f"{prefix}.tenänt", f"{prefix}.two.tokens", f"{prefix}.a+b"]
    seqs = [publish_raw(module_settings, [message(wire_event(f"ns-{n}", "subjects"))], subject=subject)[0]
            for n, subject in enumerate(bad)]
    [good] = publish_raw(module_settings, [message(wire_event("ns-ok", "subjects"))], subject=f"{prefix}.{'n' * 64}")
    wait_for(lambda: stored_ids(module_settings, "subjects"), what="the good subject")
    assert rows(module_settings, "SELECT namespace, id FROM events WHERE source = 'subjects'") == [("n" * 64, "ns-ok")]
    letters = wait_for(lambda: (lambda d: len(d) == 4 and d)(
        [d for d in dead_letters(module_settings.postgres.url) if d["stream_seq"] in seqs]))
    assert all(d["item"] == -1 and "does not name a valid namespace" in d["reason"] for d in letters)
    assert good not in {d["stream_seq"] for d in letters}
    # The same rule as the configuration's (namespace and authTokens' namespaces).
    Settings(namespace="n" * 64)
    with pytest.raises(ValueError, match="1 to 64"):
        Settings(namespace="n" * 65)


def test_one_event_per_day_for_400_days_makes_a_bounded_number_of_partitions(pg_server: Any,
                                                                              nats_server: Any) -> None:
    with isolated_settings(pg_server, nats_server.url) as settings, AppServer(settings, {"sink"}):
        at = now_micros()
        day = 86_400_000_000
        events = [[f"d-{n}", "bomb", "t", "s", at - n * day + 60_000_000, None] for n in range(400)]
        far = [[f"f-{n}", "bomb", "t", "s", when, None] for n, when in enumerate(
            [1, at - 5000 * day, at + 30 * day, micros(datetime(9999, 12, 31, tzinfo=UTC)),
             micros(datetime(1999, 1, 1, tzinfo=UTC))])]
        publish_raw(settings, [wire.build_message(at, [json.dumps(e).encode() for e in events[i:i + 100]])
                               for i in range(0, 400, 100)] + [wire.build_message(at, [json.dumps(e).encode() for e in far])])
        wait_for(lambda: rows(settings, "SELECT count(*) FROM events") == [(400,)], timeout=60, what="400 days")
        wait_for(lambda: len(dead_letters(settings.postgres.url)) == 5, what="the far events' dead letters")
        names = partition_names(settings)
    today = datetime.fromtimestamp(at / 1e6, UTC).date()
    ahead = settings.sink.partition_days_ahead
    # Independently: one daily partition per day from DAILY_DAYS back to `ahead` days
    # ahead, and one span per calendar month of the older days.
    dailies = {daily(today + timedelta(days=n)) for n in range(-partitions.DAILY_DAYS, ahead + 1)}
    months = {(today - timedelta(days=n)).strftime("%Y%m") for n in range(partitions.DAILY_DAYS + 1, 400)}
    assert {name for name in names if "_" not in name.removeprefix("events_p")} == dailies
    assert {name[8:14] for name in names if "_" in name.removeprefix("events_p")} == months
    assert len(names) == len(dailies) + len(months) <= 60


def test_events_postgres_refuses_are_isolated_without_stalling_either_writer(module_settings: Settings) -> None:
    """Past every check in the sink (limits raised here), a type over the btree row limit
    makes Postgres fail the batch (SQLSTATE 54000): one such event per writer, each in a
    batch with another tenant's events. Both batches commit their good events promptly."""
    from types import SimpleNamespace

    from pgmeter.sink import worker

    settings = module_settings.model_copy(update={"sink": module_settings.sink.model_copy(
        update={"max_events_per_tx": 40})})
    when = micros(ago(1))
    huge = [base64.b64encode(os.urandom(6000)).decode() for _ in range(2)]

    def pending(seq: int) -> worker.Pending:
        item = worker.Pending(_FakeMsg(), seq, "s", 0.0)  # type: ignore[arg-type]
        for n in range(40):
            namespace, event_type = ("tenant-a", huge[seq - 1]) if n == 17 else ("tenant-b", "t")
            item.keys.append(store.dedup_key(namespace, "refused", f"{seq}-{n}"))
            item.records.append((namespace, f"{seq}-{n}", "refused", event_type, "s", when, None, when, seq))
            item.indexes.append(n)
            item.days.add(partitions.day_of(when))
        return item

    batches = [pending(1), pending(2)]

    async def run() -> float:
        sink = worker.Sink(SimpleNamespace(settings=settings, js=None, pool=None, post_commit=[]))  # type: ignore[arg-type]
        writers = [asyncio.ensure_future(worker._run_writer(sink, slot)) for slot in sink.slots]
        started = time.monotonic()
        for item in batches:
            sink.queue.append(item)
            sink.buffered += item.weight
        sink._has_data.set()
        try:
            await asyncio.wait_for(asyncio.gather(*(item.msg.acked.wait() for item in batches)), 30)
            assert all(slot.conn is not None for slot in sink.slots), "both writers took a batch"
            return time.monotonic() - started
        finally:
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)

    asyncio.run(run())
    assert rows(module_settings, "SELECT namespace, count(*) FROM events WHERE source = 'refused' GROUP BY 1") == [
        ("tenant-b", 78)]
    letters = rows(module_settings, "SELECT stream_seq, item, reason FROM dead_letters WHERE stream_seq IN (1, 2) "
                                    "AND reason LIKE 'PostgreSQL rejected%%' ORDER BY 1")
    assert [(seq, item) for seq, item, _ in letters] == [(1, 17), (2, 17)]
    assert all("index row" in reason for _, _, reason in letters)


def test_poison_is_told_from_outages_by_sqlstate_class() -> None:
    assert store.is_poison(asyncpg.ProgramLimitExceededError("index row size 6032 exceeds btree maximum"))
    assert store.is_poison(asyncpg.UntranslatableCharacterError("\\u0000 cannot be converted to text"))
    assert store.is_poison(asyncpg.NotNullViolationError("null value"))
    assert store.is_poison(asyncpg.NumericValueOutOfRangeError("out of range"))
    assert store.is_poison(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert not store.is_poison(asyncpg.CheckViolationError('no partition of relation "events" found for row'))
    assert not store.is_poison(asyncpg.ConnectionDoesNotExistError("closed"))
    assert not store.is_poison(asyncpg.CannotConnectNowError("starting up"))
    assert not store.is_poison(asyncpg.AdminShutdownError("terminating connection"))
    assert not store.is_poison(asyncpg.DiskFullError("no space"))
    assert not store.is_poison(asyncpg.DeadlockDetectedError("deadlock"))
    assert not store.is_poison(TimeoutError())
    assert not store.is_poison(OSError("connection refused"))


def test_an_idle_stream_is_waiting_not_a_failed_fetch(pg_server: Any, nats_server: Any,
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull that ends with no messages is the sink waiting: no warning and no backoff.
    nats-py ends it with its own TimeoutError or a bare asyncio one, depending on when
    the server's 408 lands against the client's deadline (both were seen at `pgmeter dev`
    start; about one pull in ten here, so forty short pulls make both happen, most runs)."""
    from pgmeter.sink import worker

    monkeypatch.setattr(worker, "FETCH_TIMEOUT", 0.1)
    with isolated_settings(pg_server, nats_server.url) as settings, \
            caplog.at_level(logging.INFO, logger="pgmeter.sink.worker"), AppServer(settings, {"sink"}):
        time.sleep(4.0)
    assert [r.getMessage() for r in caplog.records if r.name == "pgmeter.sink.worker"] == []
