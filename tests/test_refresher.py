"""The refresher merges every event exactly once: in-flight writers, concurrent
ingest, aborted transactions, late events and two refreshers at once."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import psycopg
import pytest
from prometheus_client import REGISTRY

from pgmeter.config import Settings
from pgmeter.db.pool import create_pool
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams, WindowSize
from pgmeter.rollup import floor
from pgmeter.rollup import refresher as refresher_module
from pgmeter.rollup.refresher import Refresher
from tests.support import events_sql, metrics, oracle
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.support.meter_env import query_string

T0 = datetime(2024, 6, 1, tzinfo=UTC)
METERS = [
    {"slug": "total", "aggregation": "SUM", "eventType": "call", "valueProperty": "$.n", "groupBy": {"k": "$.k"}},
    {"slug": "users", "aggregation": "UNIQUE_COUNT", "eventType": "call", "valueProperty": "$.u"},
    {"slug": "last", "aggregation": "LATEST", "eventType": "call", "valueProperty": "$.n"},
    {"slug": "calls", "aggregation": "COUNT", "eventType": "call"},
]


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    async def setup() -> None:
        pool = await create_pool(settings.postgres.url, size=1)
        async with pool.acquire() as conn:
            for body in METERS:
                await store.create(conn, "default", MeterSpec.model_validate(body))
        await pool.close()

    asyncio.run(setup())
    with psycopg.connect(settings.postgres.url, autocommit=True) as conn:
        events_sql.ensure_partitions(conn, {(T0 + timedelta(days=d)).date() for d in range(-3, 4)})
    yield settings.postgres.url


def event(rng: random.Random, at: datetime | None = None) -> Event:
    return Event(f"s{rng.randrange(30)}", at or T0 + timedelta(seconds=rng.uniform(-2 * 86400, 2 * 86400)),
                 {"n": rng.choice([1, 2, "3", None, "x"]), "k": rng.choice(["a", "b"]), "u": rng.randrange(50)},
                 type="call")


def rollup_totals(url: str) -> dict[str, tuple[int, int, int]]:
    """Per meter: events counted in m1, q15, h1 and d1 (each must equal the raw count)."""
    out = {}
    with psycopg.connect(url) as conn:
        for meter_id, version, slug in conn.execute(
                "SELECT r.meter_id, r.version, m.slug FROM meter_rollups r JOIN meters m ON m.id = r.meter_id"):
            sums = []
            for level in ("m1", "q15", "h1", "d1"):
                table = f"rollup.{level}_{meter_id.lower()}_v{version}"
                sums.append(conn.execute(f"SELECT coalesce(sum(cnt), 0) FROM {table}").fetchone()[0])
            out[slug] = tuple(sums)
    return out


def head_and_watermarks(url: str) -> tuple[int, list[int]]:
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT pg_sequence_last_value('events_seq')").fetchone()[0]
        return head, [r[0] for r in conn.execute("SELECT last_seq FROM meter_rollups")]


def stored_events(url: str) -> list[oracle.Stored]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT seq, type, subject, time, data FROM events ORDER BY seq").fetchall()
    return [oracle.Stored(*row) for row in rows]


def test_an_in_flight_writer_holds_the_watermark_back(url: str) -> None:
    rng = random.Random(1)

    async def run() -> None:
        pool = await create_pool(url, size=4)
        refresher = Refresher(pool, max_batch=1000, lock_timeout_ms=100, writer_wait_s=0.3)
        slow = psycopg.connect(url)
        try:
            events_sql.insert(slow, [event(rng)], bump_cache=False)  # seq 1, not committed
            events_sql.insert_committed(url, [event(rng)])  # seq 2, committed
            # seq 2 is visible but seq 1 may still commit: nothing may be merged yet.
            await refresher.run_cycle()
            assert refresher.watermark == 0
            assert head_and_watermarks(url)[1] == [0] * len(METERS)
            # With the writer committing while the refresher waits, both are merged.
            waiting = asyncio.ensure_future(Refresher(pool, max_batch=1000).run_cycle())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            slow.commit()
            report = await waiting
            assert report.watermark == 2 and report.events == 2 * len(METERS)
        finally:
            slow.close()
            await pool.close()

    asyncio.run(run())
    assert set(rollup_totals(url).values()) == {(2, 2, 2, 2)}


def test_vacuum_on_a_partition_neither_stalls_nor_is_cancelled_by_the_refresher(url: str) -> None:
    """VACUUM/ANALYZE hold SHARE UPDATE EXCLUSIVE, which the SHARE request waits for.
    The refresher must still advance (waiting for the writers only) and leave the
    vacuum alone."""
    rng = random.Random(4)

    async def run() -> None:
        pool = await create_pool(url, size=4)
        vacuum = psycopg.connect(url)
        writer = psycopg.connect(url)
        try:
            vacuum.execute(f"LOCK TABLE {events_sql.partition_name(T0.date())} IN SHARE UPDATE EXCLUSIVE MODE")
            events_sql.insert_committed(url, [event(rng)])
            report = await Refresher(pool, max_batch=1000).run_cycle()
            assert report.watermark == 1 and report.events == len(METERS)
            # With a writer in flight as well, the refresher waits for the writer only.
            events_sql.insert(writer, [event(rng)], bump_cache=False)
            waiting = asyncio.ensure_future(Refresher(pool, max_batch=1000).run_cycle())
            await asyncio.sleep(0.5)
            assert not waiting.done()
            events_sql.insert_committed(url, [event(rng)])  # other writers are not blocked
            writer.commit()
            report = await asyncio.wait_for(waiting, 10)
            assert report.watermark == 2 and report.events == len(METERS)  # seq 3 came after W was read
            report = await Refresher(pool, max_batch=1000).run_cycle()
            assert report.watermark == 3 and report.events == len(METERS)
            assert vacuum.execute("SELECT 1").fetchone() == (1,)  # still there, not cancelled
        finally:
            writer.close()
            vacuum.close()
            await pool.close()

    asyncio.run(run())


def test_batches_are_bounded_and_progress_is_logged(url: str, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(2)
    events_sql.insert_committed(url, [event(rng) for _ in range(35)])
    monkeypatch.setattr(refresher_module, "PROGRESS_EVERY", 0.0)

    async def run() -> list[tuple[str, int, int]]:
        pool = await create_pool(url, size=2)
        try:
            report = await Refresher(pool, max_batch=10).run_cycle()
            return [(b.slug, b.lo, b.hi) for b in report.batches]
        finally:
            await pool.close()

    with caplog.at_level(logging.INFO, logger="pgmeter.rollup.refresher"):
        batches = asyncio.run(run())
    for meter in METERS:
        assert [(lo, hi) for slug, lo, hi in batches if slug == meter["slug"]] == [(0, 10), (10, 20), (20, 30), (30, 35)]
    # Meters take turns: each round of len(METERS) batches serves every meter once, so no
    # meter gets a second batch while another still waits for its first.
    slugs = [slug for slug, _, _ in batches]
    assert len(slugs) == 4 * len(METERS)
    for start in range(0, len(slugs), len(METERS)):
        assert sorted(slugs[start:start + len(METERS)]) == sorted(m["slug"] for m in METERS), slugs
    messages = [r.getMessage() for r in caplog.records]
    assert "backfilling meter" in messages and "meter caught up" in messages
    assert set(rollup_totals(url).values()) == {(35, 35, 35, 35)}


def test_concurrent_ingest_and_two_refreshers_merge_exactly_once(url: str, settings: Settings) -> None:
    """Writers commit out of seq order (some sleep inside their transaction, some roll
    back) while two refreshers loop with small batches. At the end the rollups alone
    hold every committed event exactly once."""
    stop = threading.Event()
    committed = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(url) as conn:
            for _ in range(25):
                batch = [event(rng) for _ in range(rng.randrange(1, 30))]
                aborted = rng.random() < 0.1
                with conn.transaction():
                    events_sql.insert(conn, batch, bump_cache=False)
                    time.sleep(rng.choice([0, 0, 0.01, 0.05]))  # commit out of seq order
                    if aborted:
                        raise psycopg.Rollback()  # leaves a gap in seq
                if not aborted:
                    with lock:
                        committed.extend(batch)

    async def refresh_loop(refresher: Refresher, reports: list[int]) -> None:
        while not stop.is_set():
            reports.append((await refresher.run_cycle()).events)
            await asyncio.sleep(0.01)

    async def run() -> int:
        pool = await create_pool(url, size=8)
        reports: list[int] = []
        try:
            loops = [asyncio.ensure_future(refresh_loop(Refresher(pool, max_batch=37, lock_timeout_ms=20,
                                                                  writer_wait_s=0.2), reports))
                     for _ in range(2)]
            threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
            for thread in threads:
                thread.start()
            await asyncio.to_thread(lambda: [t.join() for t in threads])
            stop.set()
            await asyncio.gather(*loops)
            final = await Refresher(pool, max_batch=37).run_cycle()
            return sum(reports) + final.events
        finally:
            await pool.close()

    merged = asyncio.run(run())
    count = len(committed)
    assert count > 300
    head, watermarks = head_and_watermarks(url)
    assert watermarks == [head] * len(METERS)
    assert merged == count * len(METERS)  # no batch merged twice
    assert set(rollup_totals(url).values()) == {(count, count, count, count)}
    # And the answers (now from rollups only) equal the oracle's.
    stored = stored_events(url)
    assert len(stored) == count
    with AppServer(settings, {"api"}) as server, server.client() as client:
        for body in METERS:
            meter = oracle.MeterDef(body["slug"], body["aggregation"], "call", body.get("valueProperty"),
                                    body.get("groupBy", {}))
            for query in (oracle.Query(group_by=("subject",)),
                          oracle.Query(window_size="HOUR", zone="Asia/Kolkata"),
                          oracle.Query(from_=T0 - timedelta(hours=7, seconds=1), to=T0 + timedelta(minutes=3),
                                       window_size="DAY", zone="Europe/Berlin")):
                got = client.get(f"/api/v1/meters/{meter.slug}/query", params=query_string(query)).json()["data"]
                want = oracle.answer(meter, stored, query)
                assert [(r["value"], r["subject"], r["windowStart"]) for r in got] == [
                    (float(w.value), w.subject, iso_in(w.window_start, query.zone if query.window_size else None))
                    for w in want]


def iso_in(t: datetime, zone: str | None) -> str:
    text = t.astimezone(ZoneInfo(zone) if zone else UTC).isoformat()
    return text.replace("+00:00", "Z")


def test_the_refresher_role_runs_on_its_schedule(settings: Settings, url: str) -> None:
    rng = random.Random(3)
    # Tenant labels on, so each meter's merges are counted under its own name.
    fast = settings.model_copy(update={
        "refresher": settings.refresher.model_copy(update={"interval": timedelta(milliseconds=200)}),
        "metrics": settings.metrics.model_copy(update={"tenant_labels": True})})
    with AppServer(fast, {"api", "refresher"}) as server, server.client() as client:
        before = metrics.scrape(client)
        events_sql.insert_committed(url, [event(rng) for _ in range(50)])
        deadline = time.monotonic() + 20
        while True:
            head, watermarks = head_and_watermarks(url)
            if watermarks == [head] * len(METERS) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert watermarks == [head] * len(METERS)
        after = metrics.scrape(client)
    # Every meter merged each of the 50 events once (all are of the meters' type).
    for body in METERS:
        assert metrics.delta(before, after, "pgmeter_meter_events_merged_total", meter=body["slug"]) == 50


def m1_table(url: str, slug: str) -> str:
    with psycopg.connect(url) as conn:
        meter_id, version = conn.execute(
            "SELECT r.meter_id, r.version FROM meter_rollups r JOIN meters m ON m.id = r.meter_id "
            "WHERE m.slug = %s", (slug,)).fetchone()
    return f"rollup.m1_{meter_id.lower()}_v{version}"


def progress(url: str, slug: str) -> dict[str, object]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT r.last_seq, r.failures, r.failure_reason, r.next_attempt - r.merged_at "
            "FROM meter_rollups r JOIN meters m ON m.id = r.meter_id WHERE m.slug = %s", (slug,)).fetchone()
    return dict(zip(("last_seq", "failures", "reason", "backoff"), row, strict=True))


def retry_now(url: str) -> None:
    """Time passes: every set-aside meter's next attempt is due."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE meter_rollups SET next_attempt = now() WHERE next_attempt IS NOT NULL")


def test_a_failing_meter_is_set_aside_while_the_others_merge_and_recovers(url: str, settings: Settings) -> None:
    """A real failure: someone holds a lock on the meter's rollup table. The merge
    gives up after the lock timeout, the meter is set aside with backoff and a
    visible reason, every other meter merges in the same cycle, its answers stay
    exact (read raw), and once the lock is gone it catches up exactly."""
    rng = random.Random(5)
    first = [event(rng) for _ in range(40)]
    events_sql.insert_committed(url, first)
    others = [m["slug"] for m in METERS if m["slug"] != "total"]
    blocker = psycopg.connect(url)
    blocker.execute(f"LOCK TABLE {m1_table(url, 'total')} IN ACCESS EXCLUSIVE MODE")  # held: no commit

    async def cycle() -> refresher_module.CycleReport:
        pool = await create_pool(url, size=2)
        try:
            return await Refresher(pool, max_batch=1000, merge_lock_timeout_ms=100, backoff_min_s=60,
                                   backoff_max_s=100).run_cycle()
        finally:
            await pool.close()

    def failing_gauge() -> float | None:
        return REGISTRY.get_sample_value("pgmeter_refresher_meters_failing")

    try:
        report = asyncio.run(cycle())
        assert sorted((b.slug, b.events) for b in report.batches if b.failure is None) == [
            (s, 40) for s in sorted(others)]
        assert [b.slug for b in report.failures] == ["total"]
        assert "LockNotAvailable" in (report.failures[0].failure or "")
        state = progress(url, "total")
        assert state["last_seq"] == 0 and state["failures"] == 1 and state["backoff"] == timedelta(seconds=60)
        assert "lock timeout" in str(state["reason"])
        assert failing_gauge() == 1
        assert head_and_watermarks(url)[1].count(40) == len(others)

        # Set aside: the next cycles merge the others' new events and leave it alone.
        second = [event(rng) for _ in range(7)]
        events_sql.insert_committed(url, second)
        report = asyncio.run(cycle())
        assert sorted(b.slug for b in report.batches) == sorted(others) and report.failures == []
        # Still failing when retried: the backoff doubles (60 s, then 120 s capped at 100 s).
        retry_now(url)
        report = asyncio.run(cycle())
        assert [b.slug for b in report.failures] == ["total"]
        assert progress(url, "total")["failures"] == 2
        assert progress(url, "total")["backoff"] == timedelta(seconds=100)

        with AppServer(settings, {"api"}) as server, server.client() as client:
            meter = client.get("/api/v1/meters/total").json()
            assert meter["pgmeterState"]["status"] == "failing"
            assert "lock timeout" in meter["pgmeterState"]["reason"]
            assert meter["pgmeterState"]["failures"] == 2
            since = datetime.fromisoformat(meter["pgmeterState"]["since"])
            assert since < datetime.fromisoformat(meter["pgmeterState"]["nextAttempt"])
            assert all("pgmeterState" not in client.get(f"/api/v1/meters/{s}").json() for s in others)
            assert [m["slug"] for m in client.get("/api/v1/meters").json() if "pgmeterState" in m] == ["total"]
            # Its answers stay exact meanwhile (everything read raw).
            stored = stored_events(url)
            got = client.get("/api/v1/meters/total/query", params={"groupBy": ["subject", "k"]}).json()["data"]
            meter_def = oracle.MeterDef("total", "SUM", "call", "$.n", {"k": "$.k"})
            want = oracle.answer(meter_def, stored, oracle.Query(group_by=("subject", "k")))
            assert [(r["value"], r["subject"], r["groupBy"]["k"]) for r in got] == [
                (float(w.value), w.subject, dict(w.group_by)["k"]) for w in want]
    finally:
        blocker.close()  # the lock goes away

    retry_now(url)
    report = asyncio.run(cycle())
    assert [(b.slug, b.lo, b.events) for b in report.batches] == [("total", 0, 47)]
    assert progress(url, "total") == {"last_seq": 47, "failures": 0, "reason": None, "backoff": None}
    assert failing_gauge() == 0
    assert set(rollup_totals(url).values()) == {(47, 47, 47, 47)}
    with AppServer(settings, {"api"}) as server, server.client() as client:
        assert "pgmeterState" not in client.get("/api/v1/meters/total").json()


def test_meters_without_new_events_of_their_type_are_advanced_without_a_merge(url: str) -> None:
    rng = random.Random(6)

    async def run() -> list[refresher_module.CycleReport]:
        pool = await create_pool(url, size=2)
        try:
            async with pool.acquire() as conn:
                await store.create(conn, "other", MeterSpec.model_validate(
                    {"slug": "calls", "aggregation": "COUNT", "eventType": "call"}))
                await store.create(conn, "default", MeterSpec.model_validate(
                    {"slug": "pings", "aggregation": "COUNT", "eventType": "ping"}))
            reports = []
            refresher = Refresher(pool, max_batch=1000)
            events_sql.insert_committed(url, [event(rng) for _ in range(5)])
            reports.append(await refresher.run_cycle())
            events_sql.insert_committed(url, [Event("s1", T0, {}, type="ping")])
            reports.append(await refresher.run_cycle())
            reports.append(await refresher.run_cycle())  # nothing new at all
            return reports
        finally:
            await pool.close()

    calls, ping, idle = asyncio.run(run())
    # Only the namespace and type of the new events decide who merges.
    assert sorted(b.slug for b in calls.batches) == sorted(m["slug"] for m in METERS)
    assert calls.advanced == 2 and calls.events == 5 * len(METERS)
    assert [(b.slug, b.events) for b in ping.batches] == [("pings", 1)]
    assert ping.advanced == len(METERS) + 1
    assert idle.batches == [] and idle.advanced == 0
    head, watermarks = head_and_watermarks(url)
    assert watermarks == [head] * (len(METERS) + 2)


def test_only_the_meters_own_errors_set_it_aside() -> None:
    """Errors of the connection or the server abort the cycle (the next one retries);
    anything else is the meter's own and sets only that meter aside."""
    assert refresher_module.blames_meter(asyncpg.LockNotAvailableError("lock timeout"))
    assert refresher_module.blames_meter(asyncpg.ProgramLimitExceededError("index row size exceeds"))
    assert refresher_module.blames_meter(asyncpg.UndefinedTableError("relation does not exist"))
    assert refresher_module.blames_meter(asyncpg.QueryCanceledError("statement timeout"))
    assert not refresher_module.blames_meter(asyncpg.AdminShutdownError("terminating connection"))
    assert not refresher_module.blames_meter(asyncpg.DiskFullError("no space left"))
    assert refresher_module.blames_meter(asyncpg.OutOfMemoryError("out of memory"))
    assert not refresher_module.blames_meter(asyncpg.ConnectionFailureError("lost"))
    assert not refresher_module.blames_meter(ConnectionResetError())


async def scanned_partitions(conn: asyncpg.Connection, text: str, *args: object) -> set[str]:
    """The events partitions a statement's plan reads (pruned ones are absent)."""
    plan = str(await conn.fetchval("EXPLAIN (FORMAT JSON) " + text, *args))
    return set(re.findall(r"Relation Name['\"]: ['\"](events_t\d+)", plan))


def test_the_time_floor_is_exact_for_late_events_and_prunes_partitions(url: str) -> None:
    """The tail's bound is the least time of the unmerged events, late ones included,
    so merges and queries read only the partitions that can hold them."""
    rng = random.Random(21)
    today = [event(rng, T0 + timedelta(hours=1, minutes=i)) for i in range(5)]
    events_sql.insert_committed(url, today)

    async def run() -> None:
        pool = await create_pool(url, size=2)
        try:
            await Refresher(pool, max_batch=1000).run_cycle()
            async with pool.acquire() as conn:
                caught_up = max(e.seq for e in today)
                assert await floor.time_floor(conn, "default", "call", caught_up) is None
                # A late event (three days old) and a fresh one, not merged yet.
                late = [event(rng, T0 - timedelta(days=3) + timedelta(minutes=7)), event(rng, T0 + timedelta(hours=2))]
                events_sql.insert_committed(url, late)
                assert await floor.time_floor(conn, "default", "call", caught_up) == late[0].time
                assert await floor.time_floor(conn, "default", "other", caught_up) is None
                # Only the late event's and today's partitions are read by the tail.
                tail = "SELECT count(*) FROM events WHERE seq > $1 AND time >= $2"
                floor_time = await floor.time_floor(conn, "default", "call", caught_up)
                assert await scanned_partitions(conn, tail, caught_up, floor_time) == {
                    events_sql.partition_name((T0 - timedelta(days=3)).date()),
                    events_sql.partition_name((T0 - timedelta(days=2)).date()),
                    events_sql.partition_name((T0 - timedelta(days=1)).date()),
                    events_sql.partition_name(T0.date()),
                    events_sql.partition_name((T0 + timedelta(days=1)).date()),
                    events_sql.partition_name((T0 + timedelta(days=2)).date()),
                    events_sql.partition_name((T0 + timedelta(days=3)).date())}
                fresh_floor = T0 + timedelta(hours=2)
                assert await scanned_partitions(conn, tail, caught_up, fresh_floor) == {
                    events_sql.partition_name(d.date()) for d in (T0, T0 + timedelta(days=1), T0 + timedelta(days=2),
                                                                  T0 + timedelta(days=3))}
            await Refresher(pool, max_batch=1000).run_cycle()
            async with pool.acquire() as conn:
                head = max(e.seq for e in late)
                assert await floor.time_floor(conn, "default", "call", head) is None
                # Compaction left one row per pair, at every meter's last_seq, holding
                # the least time of all: a meter created now (last_seq 0) sees it.
                rows = await conn.fetch("SELECT namespace, type, hi_seq, min_time FROM event_floor")
                assert [tuple(r) for r in rows] == [("default", "call", head, late[0].time)]
                assert await floor.time_floor(conn, "default", "call", 0) == late[0].time
        finally:
            await pool.close()

    asyncio.run(run())
    # Every event merged exactly once into every level.
    assert set(rollup_totals(url).values()) == {(7, 7, 7, 7)}


def test_the_seed_row_bounds_nothing_until_every_meter_is_past_it(url: str) -> None:
    """Events written before the floor existed: the seed row (NULL pair, -infinity)
    makes the floor unbounded (exact) for every reader behind it."""
    rng = random.Random(22)
    old = [event(rng, T0 - timedelta(days=2)), event(rng, T0)]
    events_sql.insert_committed(url, old)
    with psycopg.connect(url) as conn:  # as if these had been written before migration 011
        conn.execute("DELETE FROM event_floor")
        conn.execute("INSERT INTO event_floor (namespace, type, hi_seq, min_time) "
                     "SELECT NULL, NULL, last_value, '-infinity' FROM events_seq WHERE is_called")

    async def run() -> None:
        pool = await create_pool(url, size=2)
        try:
            async with pool.acquire() as conn:
                assert await floor.time_floor(conn, "default", "call", 0) == floor.EARLIEST
                assert await floor.time_floor(conn, "default", "call", old[-1].seq) is None
            report = await Refresher(pool, max_batch=1000).run_cycle()
            assert report.events == 2 * len(METERS)
        finally:
            await pool.close()

    asyncio.run(run())
    assert set(rollup_totals(url).values()) == {(2, 2, 2, 2)}


def test_a_commit_wakes_the_refresher_long_before_its_interval(settings: Settings, url: str) -> None:
    """The events trigger notifies pgmeter_events at commit; the refresher LISTENs and
    merges at once. With a 120 s interval only the wake-up can merge within 30 s."""
    rng = random.Random(23)
    slow = settings.model_copy(update={
        "refresher": settings.refresher.model_copy(update={"interval": timedelta(seconds=120)})})
    with AppServer(slow, {"refresher"}):
        deadline = time.monotonic() + 30
        # The first cycle (at start) is over once the meters are at the head (0).
        for round_ in range(2):
            events_sql.insert_committed(url, [event(rng) for _ in range(10)])
            while True:
                head, watermarks = head_and_watermarks(url)
                if watermarks == [head] * len(METERS) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert watermarks == [head] * len(METERS), round_
    assert set(rollup_totals(url).values()) == {(20, 20, 20, 20)}


def test_a_meter_from_before_the_hourly_level_merges_and_answers_without_it(url: str) -> None:
    """Meters created before sql/010 have no h1 tables (hourly = false): their merges
    skip h1 and their queries go from q15 to d1, with the same answers."""
    rng = random.Random(24)
    events = [event(rng) for _ in range(120)]
    events_sql.insert_committed(url, events[:60])
    queries = [QueryParams(from_=T0 - timedelta(days=2), to=T0 + timedelta(days=2), window_size=window,
                           window_time_zone=zone, group_by=group_by)
               for window in (WindowSize.HOUR, WindowSize.DAY) for zone in ("UTC", "Europe/Berlin", "Asia/Kolkata")
               for group_by in ((), ("subject",), ("k",))]

    async def answers(pool: asyncpg.Pool, slug: str) -> list[list[tuple[object, ...]]]:
        async with pool.acquire() as conn:
            meter = await store.get(conn, "default", slug)
        assert meter is not None
        out = []
        for params in queries:
            result = await run_query(pool, meter, params)
            out.append(sorted((str(r.window_start), r.subject, tuple(sorted(r.group_by.items())), r.value)
                              for r in result.rows))
        return out

    async def run() -> None:
        pool = await create_pool(url, size=2)
        try:
            await Refresher(pool, max_batch=1000).run_cycle()
            with_h1 = await answers(pool, "total")
            async with pool.acquire() as conn:
                meter_id, version = await conn.fetchrow(
                    "SELECT r.meter_id, r.version FROM meter_rollups r JOIN meters m ON m.id = r.meter_id "
                    "WHERE m.slug = 'total'")
                for level in ("h1", "h1s"):
                    await conn.execute(f"DROP TABLE rollup.{level}_{meter_id.lower()}_v{version}")
                await conn.execute("UPDATE meter_rollups SET hourly = false WHERE meter_id = $1", meter_id)
            assert await answers(pool, "total") == with_h1
            events_sql.insert_committed(url, events[60:])
            report = await Refresher(pool, max_batch=1000).run_cycle()
            assert report.events == 60 * len(METERS)
            # Every event once, whichever levels answer: the total is the raw sum.
            async with pool.acquire() as conn:
                meter = await store.get(conn, "default", "total")
            assert meter is not None
            total = await run_query(pool, meter, QueryParams())
            expected = sum((float(e.data["n"]) for e in events
                            if isinstance(e.data["n"], int) or e.data["n"] == "3"), 0.0)
            assert [float(r.value) for r in total.rows] == [expected]
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_backfill_reports_rate_and_eta_and_queries_stay_exact(url: str, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A backfill in small batches: every progress line carries the remaining seqs, a
    rate and an ETA, the gauges follow it down to 0, and a query between any two
    batches equals the raw answer."""
    rng = random.Random(25)
    events = [event(rng) for _ in range(60)]
    events_sql.insert_committed(url, events)
    monkeypatch.setattr(refresher_module, "PROGRESS_EVERY", 0.0)
    expected = sum((float(e.data["n"]) for e in events if isinstance(e.data["n"], int) or e.data["n"] == "3"), 0.0)

    async def run() -> list[float]:
        pool = await create_pool(url, size=2)
        remaining = []
        try:
            async with pool.acquire() as conn:
                meter = await store.get(conn, "default", "total")
            assert meter is not None
            refresher = Refresher(pool, max_batch=10)
            await refresher.advance_watermark()
            while (batch := await refresher.merge_batch()) is not None:
                remaining.append(REGISTRY.get_sample_value("pgmeter_refresher_backfill_remaining_events") or 0)
                total = await run_query(pool, meter, QueryParams())
                assert [float(r.value) for r in total.rows] == [expected], batch
            assert REGISTRY.get_sample_value("pgmeter_refresher_backfill_remaining_events") == 0
            assert REGISTRY.get_sample_value("pgmeter_refresher_backfill_eta_seconds") == 0
        finally:
            await pool.close()
        return remaining

    with caplog.at_level(logging.INFO, logger="pgmeter.rollup.refresher"):
        remaining = asyncio.run(run())
    # Four meters, 50 seqs each to go after their first batch.
    assert remaining[-1] == 0 and max(remaining) == 4 * 50
    progress = [r for r in caplog.records if r.getMessage() == "backfilling meter" and r.meter == "total"]
    # After 10, 20, 30, 40 and 50 of 60 seqs (the batch that reaches 60 logs "caught up").
    assert [(r.seq, r.remaining) for r in progress] == [(10, 50), (20, 40), (30, 30), (40, 20), (50, 10)]
    assert all(r.rate is not None and r.rate > 0 and r.eta_seconds is not None for r in progress[1:])
    assert any(r.getMessage() == "meter caught up" and r.meter == "total" for r in caplog.records)
