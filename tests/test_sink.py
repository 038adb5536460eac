"""The sink: exactly-once storage, partitions, dead letters, retention.

One api+sink server is shared by the module (own database and stream). Raw
messages are published straight to the stream's subject to play a producer that
is not our api.
"""

from __future__ import annotations

import asyncio
import json
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
from tests.support.ingest import dead_letters, isolated_settings, make_event, post_events
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


def wire_event(event_id: str, source: str, when: str = "2024-03-01T12:00:00Z", data: str | None = '{"v":1}') -> list[Any]:
    return [event_id, source, "api.call", "subject-1", parse_time(when), data]


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
    original = make_event("dup-2", source="across", time="2024-02-10T08:00:00Z", data={"copy": "original"})
    assert post_events(client, original).status_code == 204
    wait_for(lambda: stored_ids(module_settings, "across"), what="the original")
    # A retry with the same time, then copies dated on other days (other partitions).
    for when in ("2024-02-10T08:00:00Z", "2024-02-11T08:00:00Z", "2023-12-25T00:00:00Z", "2031-01-01T00:00:00Z"):
        assert post_events(client, {**original, "time": when, "data": {"copy": when}}).status_code == 204
    marker = make_event("marker", source="across", time="2031-01-01T00:00:00Z")
    assert post_events(client, marker).status_code == 204
    found = wait_for(lambda: len(stored_ids(module_settings, "across")) == 2 and stored_ids(module_settings, "across"))
    by_id = {r[0]: r for r in found}
    assert by_id["dup-2"][1] == datetime(2024, 2, 10, 8, tzinfo=UTC)
    assert by_id["dup-2"][2] == {"copy": "original"}
    assert by_id["dup-2"][3] == "events_p20240210"
    key = store.dedup_key("default", "across", "dup-2")
    assert rows(module_settings, "SELECT count(*) FROM event_dedup WHERE key = %s::uuid", key) == [(1,)]


def test_same_id_from_another_source_is_another_event(client: httpx.Client, module_settings: Settings) -> None:
    events = [make_event("shared-id", source="source-a"), make_event("shared-id", source="source-b")]
    assert post_events(client, events).status_code == 204
    wait_for(lambda: rows(module_settings, "SELECT count(*) FROM events WHERE id = 'shared-id'") == [(2,)])


def test_dedup_key_in_python_equals_the_sql_expression(module_settings: Settings) -> None:
    cases = [("default", "src", "id-1"), ("ns-2", "https://example.com/x?y=1", "ünïcødé ✓"), ("a", "b", "")]
    for namespace, source, event_id in cases:
        [(sql_key,)] = rows(module_settings, f"SELECT replace(({partitions.DEDUP_KEY_SQL})::text, '-', '') FROM "
                                             "(SELECT %s::text AS namespace, %s::text AS source, %s::text AS id) t",
                            namespace, source, event_id)
        assert sql_key == store.dedup_key(namespace, source, event_id)


# -- partitions ------------------------------------------------------------------------------


def test_late_and_early_events_land_in_their_day_partitions(client: httpx.Client, module_settings: Settings) -> None:
    times = {"late-1": "2019-03-04T23:59:59.999999Z", "late-2": "2019-03-05T00:00:00Z",
             "early": "2031-07-08T12:00:00+14:00", "epoch-next": "1970-01-01T00:00:00.000001Z"}
    events = [make_event(event_id, source="partitions", time=when) for event_id, when in times.items()]
    assert post_events(client, events).status_code == 204
    found = wait_for(lambda: len(stored_ids(module_settings, "partitions")) == 4
                     and stored_ids(module_settings, "partitions"))
    assert {r[0]: r[3] for r in found} == {"late-1": "events_p20190304", "late-2": "events_p20190305",
                                           "early": "events_p20310707", "epoch-next": "events_p19700101"}
    bounds = dict(rows(module_settings, "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                                        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"))
    assert "DEFAULT" not in " ".join(bounds.values())
    with psycopg.connect(module_settings.postgres.url) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        expr = conn.execute("SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c "
                            "WHERE relname = 'events_p20190304'").fetchone()
    assert expr == ("FOR VALUES FROM ('2019-03-04 00:00:00+00') TO ('2019-03-05 00:00:00+00')",)


def test_partitions_are_kept_ready_ahead(server: AppServer, module_settings: Settings) -> None:
    today = datetime.now(UTC).date()
    wanted = {f"events_p{today + timedelta(days=n):%Y%m%d}" for n in range(-1, module_settings.sink.partition_days_ahead + 1)}
    names = wait_for(lambda: (lambda found: wanted <= found and found)(
        {r[0] for r in rows(module_settings, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                             "WHERE i.inhparent = 'events'::regclass")}), what="partitions ahead")
    assert wanted <= names


def test_concurrent_creators_attach_a_partition_once(database_url: str) -> None:
    day = (date(2025, 9, 9) - partitions.EPOCH_DAY).days

    async def run() -> list[bool]:
        conns = [await asyncpg.connect(database_url) for _ in range(6)]
        try:
            return list(await asyncio.gather(*(partitions.create_partition(c, day) for c in conns)))
        finally:
            for c in conns:
                await c.close()

    results = asyncio.run(run())
    assert sorted(results) == [False] * 5 + [True]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                            "WHERE c.relname = 'events_p20250909'").fetchone() == (1,)
        # The CHECK that made the attach cheap is gone again; the bound does its job.
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'events_p20250909_bound'"
                            ).fetchone() == (0,)


def test_retention_drops_old_partitions_and_their_dedup_rows(database_url: str) -> None:
    now = datetime(2025, 6, 30, 12, tzinfo=UTC)
    old_day, kept_day = date(2025, 5, 20), date(2025, 6, 25)

    async def run() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(database_url)
        try:
            await store.prepare(conn)
            for day in (old_day, kept_day):
                await partitions.create_partition(conn, (day - partitions.EPOCH_DAY).days)
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
    assert dropped == ["events_p20250520"] and again == []
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('events_p20250520')").fetchone() == (None,)
        assert conn.execute("SELECT id FROM events").fetchall() == [("e2",)]
        assert conn.execute("SELECT count(*) FROM event_dedup").fetchone() == (1,)


def test_events_past_retention_are_dead_lettered(pg_server: Any, nats_server: Any) -> None:
    with isolated_settings(pg_server, nats_server.url, sink={"retentionDays": 10}) as settings, \
            AppServer(settings, {"api", "sink"}) as app, app.client() as http:
        recent = make_event(source="ret", time=datetime.now(UTC) - timedelta(days=2))
        old = make_event(source="ret", time=datetime.now(UTC) - timedelta(days=40))
        assert post_events(http, [old, recent]).status_code == 204
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
        b'{"v":1,"at":5,"events":[["\\ud800","rejected","t","s",1709294400000000,null],'
        b'["p-5","rejected","t","s",1709294400000000,"{\\"a\\":\\"\\\\u0000\\"}"],'
        b'["p-6","rejected","t","s",1709294400000000,null],'
        b'["p-7","rejected","t","s",1709294400000000,"{\\"a\\":\\"\\udc00\\"}"]]}',
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


def test_events_at_or_before_1970_are_dead_lettered(client: httpx.Client, module_settings: Settings) -> None:
    events = [make_event("epoch", source="epoch", time="1970-01-01T00:00:00Z"),
              make_event("moon", source="epoch", time="1969-07-20T20:17:40Z"),
              make_event("fine", source="epoch", time="2024-01-01T00:00:00Z")]
    assert post_events(client, events).status_code == 204  # OpenMeter answers 204 too
    wait_for(lambda: stored_ids(module_settings, "epoch"), what="the good event")
    assert [r[0] for r in stored_ids(module_settings, "epoch")] == ["fine"]
    letters = wait_for(lambda: [d for d in dead_letters(module_settings.postgres.url) if b'"epoch"' in d["payload"]
                                and "1970" in d["reason"]])
    assert len(letters) == 2 and sorted(d["item"] for d in letters) == [0, 1]


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
        sink = worker.Sink(SimpleNamespace(settings=settings, js=None, pool=None))  # type: ignore[arg-type]
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
