"""``python -m bench.many_meters``: what many meters in one namespace cost the refresher.

Starts its own embedded PostgreSQL, creates ``--meters`` meters (default 200) in
one namespace, each for its own event type and with a group-by key (the widest
set of rollup objects), backfills a few events of every type, and then measures
the refresh cycle that follows one new event of one type: every meter must end
up at the new watermark, but only one has anything to merge. Also reports the
relations the meters added. Nothing here is a test; numbers are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.rollup.refresher import Refresher

AGGREGATIONS = ("SUM", "COUNT", "MAX", "UNIQUE_COUNT", "AVG")
COLUMNS = "(namespace, id, source, type, subject, time, data, ingested_at, batch_seq)"


def say(text: str) -> None:
    print(text, flush=True)


async def run(meters: int, rounds: int, days: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-meters-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    proc, url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
    try:
        migrate(url)
        pool = await create_pool(url, size=4)
        now = datetime.now(UTC).replace(microsecond=0)
        async with pool.acquire() as conn:
            for day in range(-days + 1, 2):  # daily partitions, as the sink keeps them
                start = (now + timedelta(days=day)).replace(hour=0, minute=0, second=0)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS events_bench_{day + days} PARTITION OF events "
                    f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')")
            before = await conn.fetchval("SELECT count(*) FROM pg_class")
            for i in range(meters):
                aggregation = AGGREGATIONS[i % len(AGGREGATIONS)]
                await store.create(conn, "big", MeterSpec.model_validate({
                    "slug": f"m{i:03d}", "aggregation": aggregation, "eventType": f"type{i}",
                    **({} if aggregation == "COUNT" else {"valueProperty": "$.n"}),
                    "groupBy": {"k": "$.k"}}))
            after = await conn.fetchval("SELECT count(*) FROM pg_class")
            # A little history for every type, merged before the measurement.
            await conn.execute(
                f"INSERT INTO events {COLUMNS} SELECT 'big', 'seed' || g, 'bench', 'type' || (g % $1), "
                f"'s' || (g % 7), $2::timestamptz - (g % 1000) * interval '1 minute', "
                f"jsonb_build_object('n', g % 13, 'k', 'k' || (g % 3)), now(), 0 "
                f"FROM generate_series(1, $1 * 20) g", meters, now)
        say(f"{meters} meters in one namespace: {after - before:,} relations "
            f"({(after - before) / meters:.1f} per meter)")
        refresher = Refresher(pool, max_batch=100_000)
        started = time.perf_counter()
        await refresher.run_cycle()
        say(f"  backfill of {meters * 20:,} events into every meter: {time.perf_counter() - started:.2f} s")
        samples = []
        for r in range(rounds):
            async with pool.acquire() as conn:
                await conn.execute(
                    f"INSERT INTO events {COLUMNS} VALUES ('big', $1, 'bench', 'type0', 's1', $2, "
                    f"'{{\"n\": 1, \"k\": \"x\"}}', now(), 0)", f"one{r}", now)
            started = time.perf_counter()
            report = await refresher.run_cycle()
            samples.append(time.perf_counter() - started)
            async with pool.acquire() as conn:
                behind = await conn.fetchval(
                    "SELECT count(*) FROM meter_rollups WHERE last_seq < pg_sequence_last_value('events_seq')")
            assert behind == 0, f"{behind} meters behind after a cycle"
            say(f"  cycle after one new event: {samples[-1] * 1000:.0f} ms "
                f"({len(report.batches)} merge batches, {report.events} events merged)")
        say(f"summary: one event, {meters} meters: median cycle {statistics.median(samples) * 1000:.0f} ms, "
            f"max {max(samples) * 1000:.0f} ms; {after - before:,} relations")
        await pool.close()
    finally:
        proc.stop()
        services.remove_tree(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--days", type=int, default=30, help="daily partitions of events")
    args = parser.parse_args()
    asyncio.run(run(args.meters, args.rounds, args.days))


if __name__ == "__main__":
    main()
