"""``python -m bench.writes``: what one event costs the primary, and dedup at size.

One command (embedded PostgreSQL in a temporary directory; defaults take about
three minutes and 2 GB of disk on two cores) measures:

- **dedup insert cost vs table size**: ``event_dedup`` is filled server-side to each
  size in ``--sizes`` (default 1M and 10M keys: md5 keys, random as real ones),
  then batches of 1,000 new keys are COPYed into it as the sink does; the median
  microseconds per key at each size, the index size, and whether it still fits in
  shared_buffers. The btree on random 16-byte keys touches one random leaf per
  insert: flat while the index is cached, one read per key once it is not.
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

NOW = datetime(2026, 6, 1, tzinfo=UTC)
LSN = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"  # bytes of WAL so far


async def fill_dedup(conn: asyncpg.Connection, upto: int, have: int) -> None:
    """Keys ``have+1 .. upto`` (md5 of a counter: uniformly random in the keyspace)."""
    step = 2_000_000
    for start in range(have, upto, step):
        await conn.execute(
            "INSERT INTO event_dedup (key, event_time) SELECT md5('k' || g)::uuid, now() "
            "FROM generate_series($1::bigint, $2::bigint) g", start + 1, min(upto, start + step))


async def dedup_cost(conn: asyncpg.Connection, batches: int) -> float:
    """Median microseconds per key of a 1,000-key COPY, in its own transaction."""
    per_key = []
    for _ in range(batches):
        keys = [(uuid.uuid4(), NOW) for _ in range(1000)]
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("event_dedup", records=keys, columns=("key", "event_time"))
        per_key.append((time.perf_counter() - started) / 1000 * 1e6)
        # The keys stay: the table grows by batches x 1000, negligible next to its size.
    return statistics.median(per_key)


async def wal_per_event(pool: asyncpg.Pool, rounds: int, subjects: int) -> tuple[float, float, float, float]:
    """(ingest bytes/event steady, after a checkpoint, merge bytes/event steady, after a checkpoint)."""
    async with pool.acquire() as conn:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS events_w{NOW:%Y%m%d} PARTITION OF events FOR VALUES FROM "
            f"('{(NOW - timedelta(days=1)).isoformat()}') TO ('{NOW.isoformat()}')")
    ingest, merge = [], []
    for round_ in range(rounds):
        async with pool.acquire() as conn:
            if round_ == 0:
                await conn.execute("CHECKPOINT")
            before = await conn.fetchval(LSN)
            async with conn.transaction():
                # The sink's transaction: claim the keys, then the events (trigger included).
                await conn.execute(
                    "INSERT INTO event_dedup (key, event_time) SELECT md5('w' || $1::text || g)::uuid, now() "
                    "FROM generate_series(1, 1000) g", str(round_))
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


async def run(sizes: list[int], batches: int, rounds: int, subjects: int) -> None:
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
            for size in sizes:
                started = time.perf_counter()
                await fill_dedup(conn, size, have)
                have = size
                await conn.execute("VACUUM ANALYZE event_dedup")
                fill = time.perf_counter() - started
                index = await conn.fetchval("SELECT pg_relation_size('event_dedup_pkey')")
                costs[size] = await dedup_cost(conn, batches)
                say(f"  dedup at {size:,} keys (filled in {fill:.0f} s; index {index / 2**20:,.0f} MiB, "
                    f"{'within' if index <= shared else 'beyond'} shared_buffers): "
                    f"{costs[size]:.2f} us per key (median of {batches} COPYs of 1,000)")
        if len(sizes) > 1:
            say(f"  dedup cost {sizes[-1]:,} vs {sizes[0]:,} keys: {costs[sizes[-1]] / costs[sizes[0]]:.2f}x")
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
    args = parser.parse_args(argv)
    asyncio.run(run([int(s) for s in args.sizes.split(",")], args.batches, args.rounds, args.subjects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
