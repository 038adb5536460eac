"""``python -m bench.entitlements``: the cost of an entitlement value against its meter query.

Starts its own embedded PostgreSQL, loads a year of events server-side (default
10M over 200 subjects, one heavy TPP among them), merges them into the meter's
rollups, and gives that TPP a metered entitlement (monthly period, anchored a year
ago) with 10 grants of mixed priorities and expiries. Then it measures, in one run:

- the first value read, which replays every monthly period since measureUsageFrom
  and leaves a snapshot behind;
- steady value reads (``pgmeter.entitlements.balance.metered_value``, no Valkey):
  p50/p99, against the meter query the value is built on (the TPP's usage in the
  current period through ``run_query``), as a ratio.

Every figure is measured on this machine in this run; nothing here is a test.
``--events`` scales the size, ``--quick`` is a small smoke run. Before the timings it
lists the statements of one steady value read (the round trips a read costs) with
their times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.entitlements import balance, service
from pgmeter.entitlements import store as entitlement_store
from pgmeter.entitlements.service import EntitlementInput, GrantInput
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams
from pgmeter.rollup.refresher import Refresher

METER = MeterSpec(slug="api_calls", aggregation="COUNT", eventType="api.call")
ROWS = """
INSERT INTO events (namespace, id, source, type, subject, time, data, ingested_at, batch_seq)
SELECT 'default', 'e' || g, 'bench', 'api.call',
       CASE WHEN random() < 0.2 THEN 'tpp-heavy' ELSE 'tpp-' || floor(random() * $3)::int END,
       $1::timestamptz + random() * $4::interval, NULL, now(), 0
  FROM generate_series(1, $2) g
"""


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(total: int, subjects: int, reads: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-ent-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    proc, url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
    try:
        migrate(url)
        pool = await create_pool(url, size=4)
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        start = now - timedelta(days=365)
        async with pool.acquire() as conn:
            meter = await store.create(conn, "default", METER)
            await conn.execute(f"CREATE TABLE events_year PARTITION OF events FOR VALUES FROM "
                               f"('{start.isoformat()}') TO ('{(now + timedelta(days=1)).isoformat()}')")
            await conn.execute("SET synchronous_commit = off")
            loaded = time.perf_counter()
            await conn.execute(ROWS, start, total, subjects, now - start)
            await conn.execute("ANALYZE events")
        print(f"pgmeter entitlement benchmark: {total:,} events over 365 days, {subjects} subjects "
              f"(20% from tpp-heavy); load {time.perf_counter() - loaded:.1f} s", flush=True)
        refresher = Refresher(pool, max_batch=500_000)
        while True:
            await refresher.run_cycle()
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT min(last_seq) = pg_sequence_last_value('events_seq') "
                                       "FROM meter_rollups"):
                    break
        async with pool.acquire() as conn:
            customer = await service.create_customer(conn, "default", {
                "key": "tpp-heavy", "name": "Heavy TPP", "description": None, "primary_email": None,
                "currency": None, "billing_address": None, "metadata": None}, ["tpp-heavy"])
            await service.create_feature(conn, "default", "api_calls", "API calls", "api_calls", None, None)
            # The current month began 10 days ago: its usage and burns are what a read computes.
            anchor = now - timedelta(days=10)
            ent = await service.create_entitlement(conn, "default", customer, EntitlementInput(
                type="metered", feature_id=None, feature_key="api_calls", usage_interval="MONTH",
                usage_anchor=anchor, measure_usage_from=start))
            period = balance.Timeline.of(ent, []).period_at(now)
            for i in range(10):
                await service.create_grant(conn, ent, GrantInput(
                    amount=Decimal(100_000 * (i + 1)), priority=1 + i % 3, effective_at=period[0] + timedelta(hours=i),
                    expiration_duration="DAY" if i % 2 else "MONTH", expiration_count=i + 1,
                    min_rollover=Decimal(0), max_rollover=Decimal(0), recurrence_interval=None,
                    recurrence_anchor=None, metadata=None))
        grace = timedelta(hours=1)
        started = time.perf_counter()
        value, _ = await balance.metered_value(pool, ent, now, grace=grace)
        first = time.perf_counter() - started
        print(f"  first value read (replays every monthly period): {first * 1000:.0f} ms; usage {value.usage}, "
              f"balance {value.balance}", flush=True)
        await profile(url, ent, now, grace)
        value_times, query_times = [], []
        params = QueryParams(from_=period[0], to=now + timedelta(minutes=1), subjects=("tpp-heavy",))
        for _ in range(reads):
            started = time.perf_counter()
            await balance.metered_value(pool, ent, now, grace=grace)
            value_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            await run_query(pool, meter, params)
            query_times.append(time.perf_counter() - started)
        v50, v99 = percentile(value_times, 50) * 1000, percentile(value_times, 99) * 1000
        q50, q99 = percentile(query_times, 50) * 1000, percentile(query_times, 99) * 1000
        print(f"  value (10 grants, snapshot at the period start): p50 {v50:.1f} ms, p99 {v99:.1f} ms", flush=True)
        print(f"  meter query it is built on (current period):     p50 {q50:.1f} ms, p99 {q99:.1f} ms", flush=True)
        print(f"  ratio value/query: p50 {v50 / q50:.1f}x, p99 {v99 / q99:.1f}x", flush=True)
        await pool.close()
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # 5 GB at 10M events


async def profile(url: str, ent: entitlement_store.Entitlement, now: datetime, grace: timedelta) -> None:
    """Print every statement of one steady value read, on a connection of its own."""
    logged: list[tuple[str, float]] = []
    pool = await create_pool(url, size=1)
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: logged.append((record.query, record.elapsed)))
        await balance.metered_value(pool, ent, now, grace=grace)  # prepares the statements
        logged.clear()
        started = time.perf_counter()
        await balance.metered_value(pool, ent, now, grace=grace)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0)  # the logger is called soon after each statement
    finally:
        await pool.close()
    print(f"  one steady value read: {len(logged)} statements (one round trip each), {elapsed * 1000:.1f} ms",
          flush=True)
    for query, seconds in logged:
        print(f"    {seconds * 1000:6.2f} ms  {' '.join(query.split())[:96]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.entitlements", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events over the year (default 10M)")
    parser.add_argument("--subjects", type=int, default=200, help="distinct subjects (default 200)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (200k events)")
    args = parser.parse_args(argv)
    total, reads = (200_000, 50) if args.quick else (args.events, 300)
    asyncio.run(run(total, args.subjects, reads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
