"""``python -m bench.partitions``: the same work with 31 and with 365 daily partitions.

A year of history must not slow down what only touches the last days. One run
(embedded PostgreSQL in a temporary directory; the default size takes about two
minutes and 1 GB of disk) loads ``--events`` over the last 31 days, merges them,
and measures; then adds 334 older daily partitions holding ``--old-per-day``
events each (merged too) and measures the same things again:

- the meter query "30 days x DAY x group by subject" in UTC, Europe/Berlin (h1
  level) and Asia/Kolkata (q15), with 10k events left unmerged (the tail);
- a refresh cycle merging 10k new events (1% of them two days late);
- the tail statement alone (``seq > last_seq`` with and without the exact time
  floor of sql/011_event_floor.sql): planning and execution time from
  EXPLAIN ANALYZE, and how many partitions the plan keeps.

Targets (issue 15): 365-partition time within 1.5x of the 31-partition time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.query import COLUMNS, EVENT_ROWS, METER, percentile, say
from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.meters import store
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams, WindowSize
from pgmeter.rollup import floor
from pgmeter.rollup.refresher import Refresher

RECENT_DAYS = 31
OLD_DAYS = 334
NOW = datetime(2026, 6, 1, tzinfo=UTC)  # the recent days end here
ZONES = ("UTC", "Europe/Berlin", "Asia/Kolkata")


@dataclass
class Figures:
    partitions: int
    query_p50: dict[str, float]
    query_p99: dict[str, float]
    refresh: float
    tail_plan: float  # ms, with the floor
    tail_exec: float
    tail_kept: int  # partitions in the plan
    bare_plan: float  # ms, seq only (as before the floor)
    bare_exec: float
    bare_kept: int


async def add_partition(conn: asyncpg.Connection, day: datetime) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS events_b{day:%Y%m%d} PARTITION OF events FOR VALUES FROM "
        f"('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')")


async def load(pool: asyncpg.Pool, first_day: datetime, days: int, per_day: int, subjects: int, tag: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute("SET synchronous_commit = off")
        for n in range(days):
            day = first_day + timedelta(days=n)
            await add_partition(conn, day)
            await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS} ORDER BY 6",
                               day, per_day, subjects, f"{tag}{n}-", timedelta(days=1))
        await conn.execute("ANALYZE events")


async def merge_all(pool: asyncpg.Pool) -> None:
    while True:
        await Refresher(pool, max_batch=200_000).run_cycle()
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT min(last_seq) = pg_sequence_last_value('events_seq') FROM meter_rollups"):
                await conn.execute("VACUUM ANALYZE event_floor")
                return


async def add_new(pool: asyncpg.Pool, count: int, round_: int, subjects: int) -> None:
    """``count`` new events: 99% in the last hour before NOW, 1% up to two days late."""
    late = count // 100
    async with pool.acquire() as conn, conn.transaction():
        for start, span, n, tag in ((NOW - timedelta(hours=1), timedelta(hours=1), count - late, "n"),
                                    (NOW - timedelta(days=2), timedelta(days=2), late, "l")):
            await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS}", start, n, subjects,
                               f"{tag}{round_}-{time.monotonic_ns()}-", span)


async def explain(conn: asyncpg.Connection, text: str, *args: object) -> tuple[float, float, int]:
    plan = (await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {text}", *args))
    if isinstance(plan, str):
        import json
        plan = json.loads(plan)
    top = plan[0]
    kept = str(top["Plan"]).count("'Relation Name': 'events_b")
    return top["Planning Time"], top["Execution Time"], kept


async def measure(pool: asyncpg.Pool, meter: store.Meter, subjects: int, runs: int) -> Figures:
    refreshes = []
    for round_ in range(3):
        await add_new(pool, 10_000, round_, subjects)
        started = time.perf_counter()
        await Refresher(pool, max_batch=200_000).run_cycle()
        refreshes.append(time.perf_counter() - started)
    await add_new(pool, 10_000, 99, subjects)  # left unmerged: the tail
    p50, p99 = {}, {}
    for zone in ZONES:
        params = QueryParams(from_=NOW - timedelta(days=30), to=NOW, window_size=WindowSize.DAY,
                             window_time_zone=zone, group_by=("subject",))
        for _ in range(3):
            await run_query(pool, meter, params)
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            await run_query(pool, meter, params)
            samples.append(time.perf_counter() - started)
        p50[zone], p99[zone] = percentile(samples, 50), percentile(samples, 99)
    async with pool.acquire() as conn:
        last_seq = await conn.fetchval("SELECT min(last_seq) FROM meter_rollups")
        time_floor = await floor.time_floor(conn, "default", "api.call", last_seq)
        tail = ("SELECT count(*) FROM events WHERE namespace = 'default' AND type = 'api.call' AND seq > $1")
        bare = [await explain(conn, tail, last_seq) for _ in range(5)]
        floored = [await explain(conn, tail + " AND time >= $2", last_seq, time_floor) for _ in range(5)]
        partitions = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass")
    return Figures(
        partitions=partitions, query_p50=p50, query_p99=p99, refresh=statistics.median(refreshes),
        tail_plan=statistics.median(f[0] for f in floored), tail_exec=statistics.median(f[1] for f in floored),
        tail_kept=floored[0][2],
        bare_plan=statistics.median(f[0] for f in bare), bare_exec=statistics.median(f[1] for f in bare),
        bare_kept=bare[0][2])


def report(f: Figures) -> None:
    say(f"  {f.partitions} partitions:")
    for zone in ZONES:
        say(f"    meter query 30 days x DAY x subject, {zone}: p50 {f.query_p50[zone] * 1000:.1f} ms, "
            f"p99 {f.query_p99[zone] * 1000:.1f} ms")
    say(f"    refresh of 10k new events: median {f.refresh * 1000:.0f} ms")
    say(f"    tail with the time floor: planning {f.tail_plan:.2f} ms, execution {f.tail_exec:.2f} ms, "
        f"{f.tail_kept} partitions kept")
    say(f"    tail by seq only (before):  planning {f.bare_plan:.2f} ms, execution {f.bare_exec:.2f} ms, "
        f"{f.bare_kept} partitions kept")


async def run(events: int, old_per_day: int, subjects: int, runs: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-partitions-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    proc, url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
    try:
        migrate(url)
        pool = await create_pool(url, size=4)
        async with pool.acquire() as conn:
            meter = await store.create(conn, "default", METER)
            version = await conn.fetchval("SHOW server_version")
        say(f"pgmeter partition sweep: {events:,} events over {RECENT_DAYS} days, then {OLD_DAYS} older days of "
            f"{old_per_day:,} events; {subjects} subjects; PostgreSQL {version}, {os.cpu_count()} CPUs")
        started = time.perf_counter()
        await load(pool, NOW - timedelta(days=RECENT_DAYS), RECENT_DAYS + 1, events // RECENT_DAYS, subjects, "r")
        await merge_all(pool)
        say(f"  load and merge: {time.perf_counter() - started:.1f} s")
        small = await measure(pool, meter, subjects, runs)
        report(small)
        started = time.perf_counter()
        await load(pool, NOW - timedelta(days=RECENT_DAYS + OLD_DAYS), OLD_DAYS, old_per_day, subjects, "o")
        await merge_all(pool)
        say(f"  + {OLD_DAYS} older partitions, load and merge: {time.perf_counter() - started:.1f} s")
        large = await measure(pool, meter, subjects, runs)
        report(large)
        say("")
        say("summary (365 vs 31 partitions; target <= 1.5x)")
        for zone in ZONES:
            ratio = large.query_p50[zone] / small.query_p50[zone]
            say(f"  meter query {zone}: p50 {ratio:.2f}x, p99 {large.query_p99[zone] / small.query_p99[zone]:.2f}x "
                f"{'ok' if ratio <= 1.5 else 'MISSED'}")
        ratio = large.refresh / small.refresh
        say(f"  refresh 10k: {ratio:.2f}x {'ok' if ratio <= 1.5 else 'MISSED'}")
        ratio = (large.tail_plan + large.tail_exec) / (small.tail_plan + small.tail_exec)
        say(f"  tail planning + execution with the floor: {ratio:.2f}x {'ok' if ratio <= 1.5 else 'MISSED'}; "
            f"by seq only: {(large.bare_plan + large.bare_exec) / (small.bare_plan + small.bare_exec):.2f}x")
        await pool.close()
    finally:
        proc.stop()
        services.remove_tree(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.partitions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events over the recent 31 days (default 1M)")
    parser.add_argument("--old-per-day", type=int, default=3_000, help="events per older day (default 3000)")
    parser.add_argument("--subjects", type=int, default=200, help="distinct subjects (default 200)")
    parser.add_argument("--runs", type=int, default=50, help="queries per zone and size (default 50)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.events, args.old_per_day, args.subjects, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
