"""``python -m bench.writes``: what one event costs the primary, and dedup at size.

One command (embedded PostgreSQL in a temporary directory; defaults take about
three minutes and 2 GB of disk on two cores) measures:

- **dedup insert cost vs table size**: ``event_dedup`` (partitioned by event day,
  sql/014) and, beside it, the single btree it replaced are filled server-side to
  each size in ``--sizes`` (default 1M and 10M keys: md5 keys, random as real ones,
  their event days spread over ``--days``, default 365), then batches of 1,000 new
  keys of today's events are COPYed into each as the sink does, alternating; the
  median microseconds per key at each size and the index sizes. A btree on random
  16-byte keys touches one random leaf per insert: the single one grows with every
  key (one read per key once it is beyond memory), today's partition only with
  today's keys.
- **the event_floor trigger's cost**: 1,000-event insert transactions with the
  trigger enabled and disabled, alternating;
- **WAL bytes per event** (the write rate that limits a single primary and its
  replicas): events written as the sink writes them (COPY into ``events`` plus the
  dedup claim, in one transaction of 1,000), and the refresher's merge of them into
  a SUM meter with one group-by key, from ``pg_current_wal_lsn()`` differences,
  after a CHECKPOINT so full-page images are counted as in a steady state of
  ``checkpoint_timeout`` (the first touch of a page after a checkpoint writes the
  whole page: the WAL after a checkpoint is higher, reported separately).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.query import COLUMNS, EVENT_ROWS, METER, say
from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.meters import store
from pgmeter.rollup.refresher import Refresher
from pgmeter.sink import partitions

NOW = datetime(2026, 6, 1, tzinfo=UTC)
LSN = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"  # bytes of WAL so far


TODAY = (NOW.date() - partitions.EPOCH_DAY).days - 1  # the day the new events fall in (NOW - 1 hour)


async def fill_dedup(conn: asyncpg.Connection, upto: int, have: int, days: int) -> None:
    """Keys ``have+1 .. upto`` (md5 of a counter: uniformly random in the keyspace),
    their event days spread evenly over the ``days`` days before today, into both
    layouts: ``event_dedup`` (by event day) and ``flat_dedup`` (one btree, as before
    sql/014)."""
    step = 2_000_000
    for start in range(have, upto, step):
        lo, hi = start + 1, min(upto, start + step)
        await conn.execute("INSERT INTO event_dedup (key, day) SELECT md5('k' || g)::uuid, $3 - g % $4 "
                           "FROM generate_series($1::bigint, $2::bigint) g", lo, hi, TODAY, days)
        await conn.execute("INSERT INTO flat_dedup (key) SELECT md5('k' || g)::uuid "
                           "FROM generate_series($1::bigint, $2::bigint) g", lo, hi)


async def dedup_cost(conn: asyncpg.Connection, batches: int) -> tuple[float, float]:
    """Median microseconds per key of a 1,000-key COPY of today's events, in its own
    transaction, by day and flat, alternating."""
    by_day, flat = [], []
    for _ in range(batches):
        keys = [uuid.uuid4() for _ in range(1000)]
        for table, records, times in (("event_dedup", [(k, TODAY) for k in keys], by_day),
                                      ("flat_dedup", [(k,) for k in keys], flat)):
            started = time.perf_counter()
            async with conn.transaction():
                await conn.copy_records_to_table(table, records=records, columns=("key", "day")[:len(records[0])])
            times.append((time.perf_counter() - started) / 1000 * 1e6)
        # The keys stay: the tables grow by batches x 1000, negligible next to their size.
    return statistics.median(by_day), statistics.median(flat)


async def wal_per_event(pool: asyncpg.Pool, rounds: int, subjects: int) -> tuple[float, float, float, float]:
    """(ingest bytes/event steady, after a checkpoint, merge bytes/event steady, after a checkpoint)."""
    async with pool.acquire() as conn:
        await partitions.create_partition(conn, TODAY, now=NOW)  # with its dedup twin
    ingest, merge = [], []
    for round_ in range(rounds):
        async with pool.acquire() as conn:
            if round_ == 0:
                await conn.execute("CHECKPOINT")
            before = await conn.fetchval(LSN)
            async with conn.transaction():
                # The sink's transaction: claim the keys, then the events (trigger included).
                await conn.execute(
                    "INSERT INTO event_dedup (key, day) SELECT md5('w' || $1::text || g)::uuid, $2 "
                    "FROM generate_series(1, 1000) g", str(round_), TODAY)
                await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS}", NOW - timedelta(hours=1), 1000,
                                   subjects, f"w{round_}-", timedelta(hours=1))
            after = await conn.fetchval(LSN) - before
            ingest.append(float(after) / 1000)
            before = await conn.fetchval(LSN)
        await Refresher(pool, max_batch=200_000).run_cycle()
        async with pool.acquire() as conn:
            after = await conn.fetchval(LSN) - before
            merge.append(float(after) / 1000)
    return statistics.median(ingest[1:]), ingest[0], statistics.median(merge[1:]), merge[0]


async def trigger_cost(pool: asyncpg.Pool, rounds: int, subjects: int) -> tuple[float, float]:
    """Median microseconds per event of 1,000-event INSERT transactions into ``events``
    with and without the event_floor trigger (alternating, same table)."""
    on, off = [], []
    async with pool.acquire() as conn:
        for round_ in range(rounds):
            for enabled, sink in ((True, on), (False, off)):
                if not enabled:
                    await conn.execute("ALTER TABLE events DISABLE TRIGGER events_floor")
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS}", NOW - timedelta(hours=2), 1000,
                                       subjects, f"t{round_}{enabled}-", timedelta(hours=1))
                sink.append((time.perf_counter() - started) / 1000 * 1e6)
                if not enabled:
                    await conn.execute("ALTER TABLE events ENABLE TRIGGER events_floor")
    return statistics.median(on), statistics.median(off)


async def run(sizes: list[int], batches: int, rounds: int, subjects: int, days: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-writes-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    proc, url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
    try:
        migrate(url)
        pool = await create_pool(url, size=3)
        async with pool.acquire() as conn:
            await store.create(conn, "default", METER)
            version = await conn.fetchval("SHOW server_version")
            shared = await conn.fetchval("SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'")
        say(f"pgmeter write costs: PostgreSQL {version}, shared_buffers {shared / 2**20:.0f} MiB, "
            f"{os.cpu_count()} CPUs")
        steady_in, first_in, steady_merge, first_merge = await wal_per_event(pool, rounds, subjects)
        say(f"  WAL per event, ingest (events + dedup claim, batches of 1,000): {steady_in:,.0f} bytes "
            f"({first_in:,.0f} right after a checkpoint)")
        say(f"  WAL per event, merge into a SUM meter with one group-by key: {steady_merge:,.0f} bytes "
            f"({first_merge:,.0f} right after a checkpoint)")
        with_trigger, without = await trigger_cost(pool, 4 * rounds, subjects)
        say(f"  insert per event, 1,000-event transactions, with / without the event_floor trigger (and its "
            f"NOTIFY): {with_trigger:.1f} / {without:.1f} us ({with_trigger / without:.2f}x)")
        have = 0
        costs = {}
        async with pool.acquire() as conn:
            # The partitions of a year of event days (daily for the last 35, months before).
            for day in range(TODAY - days, TODAY + 1):
                await partitions.create_partition(conn, day, now=NOW)
            await conn.execute("CREATE TABLE flat_dedup (key uuid PRIMARY KEY)")
            for size in sizes:
                started = time.perf_counter()
                await fill_dedup(conn, size, have, days)
                have = size
                await conn.execute("VACUUM ANALYZE event_dedup, flat_dedup")
                fill = time.perf_counter() - started
                today_index = await conn.fetchval(
                    "SELECT pg_relation_size(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                    "WHERE c.relname = $1", partitions.dedup_name(partitions.partition_name(TODAY)))
                flat_index = await conn.fetchval("SELECT pg_relation_size('flat_dedup_pkey')")
                costs[size] = await dedup_cost(conn, batches)
                say(f"  dedup at {size:,} keys over {days} days (filled in {fill:.0f} s): by event day "
                    f"{costs[size][0]:.2f} us per key (today's index {today_index / 2**20:,.1f} MiB), one btree "
                    f"{costs[size][1]:.2f} us per key (index {flat_index / 2**20:,.0f} MiB, "
                    f"{'within' if flat_index <= shared else 'beyond'} shared_buffers); median of {batches} "
                    f"COPYs of 1,000")
        if len(sizes) > 1:
            first, last = costs[sizes[0]], costs[sizes[-1]]
            say(f"  dedup cost {sizes[-1]:,} vs {sizes[0]:,} keys: by event day {last[0] / first[0]:.2f}x "
                f"(target <= 1.5x), one btree {last[1] / first[1]:.2f}x")
        await pool.close()
    finally:
        proc.stop()
        services.remove_tree(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000",
                        help="comma-separated dedup table sizes in keys (default 1M,10M)")
    parser.add_argument("--batches", type=int, default=30, help="COPYs of 1,000 new keys per size (default 30)")
    parser.add_argument("--rounds", type=int, default=6, help="ingest + merge rounds for the WAL figures")
    parser.add_argument("--subjects", type=int, default=1000, help="distinct subjects (default 1000)")
    parser.add_argument("--days", type=int, default=365, help="event days the dedup keys spread over (default 365)")
    args = parser.parse_args(argv)
    asyncio.run(run([int(s) for s in args.sizes.split(",")], args.batches, args.rounds, args.subjects, args.days))
    return 0


if __name__ == "__main__":
    sys.exit(main())
