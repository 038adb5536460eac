"""``python -m bench.query``: incremental refresh and meter queries against baselines.

Starts its own embedded PostgreSQL in a temporary directory, generates events
server-side (INSERT ... SELECT generate_series, one partition per day over 30
days), and measures in one run:

- refresh of 10k new events (99% from the ten minutes before "now", which moves
  on with every batch, 1% up to two days late) with 1M events already merged, and
  again at the full size (default 10M): the cost should stay flat (ratio <= 1.5x);
- a full ``REFRESH MATERIALIZED VIEW`` of an equivalent plain materialized view
  (minute buckets per subject and group, the m1 level) at the full size: the
  baseline an incremental refresh must beat (>= 100x);
- the meter query "30 days, DAY windows, group by subject" through
  ``pgmeter.query.engine.run_query`` (rollups + unmerged tail) against the same
  answer computed by a raw GROUP BY over ``events`` (p99 <= 50 ms, >= 100x);
- a dashboard-like workload through the Valkey cache (an embedded valkey-server):
  the same panels over and over, a late event every 50 queries; latency of the
  cached answers (p99 <= 3 ms) and the hit ratio.

Every figure is measured on this machine in this run; nothing here is a test.
``--events`` scales the size (e.g. 100000000), ``--quick`` is a small smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import asyncpg
from prometheus_client import REGISTRY

from pgmeter.config import RefresherConfig
from pgmeter.db.migrate import migrate
from pgmeter.db.pool import create_pool
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams, WindowSize
from pgmeter.rollup.merge import merge_range
from pgmeter.rollup.objects import ROLLUP_COLUMNS, Rollup
from pgmeter.rollup.refresher import Refresher

DAYS = 30
START = datetime(2026, 1, 1, tzinfo=UTC)
ENDPOINTS = ["/accounts", "/balances", "/transactions", "/payments", "/consents", "/beneficiaries",
             "/standing-orders", "/direct-debits"]
METER = MeterSpec(slug="api_latency", aggregation="SUM", eventType="api.call", valueProperty="$.ms",
                  groupBy={"endpoint": "$.endpoint"})

# One event, server side: 90% of the meter's type; subjects skewed (a few TPPs send
# most calls); a few values the meter must skip. $1: first day, $2: count, $3:
# subjects, $4: id prefix, $5: span of time the events fall in.
EVENT_ROWS = """
SELECT 'default', $4 || g, 'bench',
       CASE WHEN random() < 0.9 THEN 'api.call' ELSE 'other' END,
       'tpp-' || lpad(floor(power(random(), 3) * $3)::int::text, 4, '0'),
       $1::timestamptz + random() * $5::interval,
       jsonb_build_object(
           'endpoint', (ARRAY{endpoints})[1 + floor(random() * {n_endpoints})::int],
           'method', CASE WHEN random() < 0.7 THEN 'GET' ELSE 'POST' END,
           'ms', CASE WHEN random() < 0.01 THEN to_jsonb('n/a'::text)
                      ELSE to_jsonb(floor(random() * 800)::int) END),
       now(), 0
  FROM generate_series(1, $2) g
""".format(endpoints="['" + "','".join(ENDPOINTS) + "']", n_endpoints=len(ENDPOINTS))
COLUMNS = "(namespace, id, source, type, subject, time, data, ingested_at, batch_seq)"


def say(text: str) -> None:
    print(text, flush=True)


def human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


@dataclass
class Bench:
    pool: asyncpg.Pool
    subjects: int
    days: int = DAYS  # daily partitions the events are spread over
    batch: int = 0
    # "Now": new events arrive just before it; every batch moves it ten minutes on,
    # into the day after the loaded days (its partition exists ahead, as the sink's do).
    now: datetime = START

    def __post_init__(self) -> None:
        self.now = START + timedelta(days=self.days)

    async def load_fresh(self, total: int) -> None:
        """The first events: each day loaded into a bare table, indexed, then attached
        (the fast path for bulk loads; the sink attaches partitions the same way)."""
        per_day = total // self.days
        async with self.pool.acquire() as conn:
            await conn.execute("SET synchronous_commit = off")
            for day in range(self.days):
                start = START + timedelta(days=day)
                name = f"events_b{start:%Y%m%d}"
                count = per_day + (total - per_day * self.days if day == self.days - 1 else 0)
                await conn.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)")
                await conn.execute(
                    f"ALTER TABLE {name} ADD CHECK (time >= '{start.isoformat()}' "
                    f"AND time < '{(start + timedelta(days=1)).isoformat()}')")
                await conn.execute(f"INSERT INTO {name} {COLUMNS} {EVENT_ROWS} ORDER BY 6",
                                   start, count, self.subjects, f"d{day}-", timedelta(days=1))
                await conn.execute(
                    f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM "
                    f"('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')")
                # Rows written outside the parent bypass its statement trigger: a bulk
                # load records their time floor itself (sql/011_event_floor.sql).
                await conn.execute(f"INSERT INTO event_floor (namespace, type, hi_seq, min_time) "
                                   f"SELECT namespace, type, max(seq), min(time) FROM {name} GROUP BY 1, 2")
            today = START + timedelta(days=self.days)
            await conn.execute(
                f"CREATE TABLE events_b{today:%Y%m%d} PARTITION OF events FOR VALUES FROM "
                f"('{today.isoformat()}') TO ('{(today + timedelta(days=1)).isoformat()}')")
            await conn.execute("ANALYZE events")

    async def load_more(self, total: int) -> None:
        """More events into the existing (indexed) partitions, a day at a time."""
        per_day = total // self.days
        async with self.pool.acquire() as conn:
            await conn.execute("SET synchronous_commit = off")
            for day in range(self.days):
                count = per_day + (total - per_day * self.days if day == self.days - 1 else 0)
                await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS} ORDER BY 6",
                                   START + timedelta(days=day), count, self.subjects, f"m{day}-",
                                   timedelta(days=1))
            await conn.execute("ANALYZE events")

    async def add_new(self, count: int) -> None:
        """New events as ingest delivers them: 99% from the ten minutes before "now",
        which moves on ten minutes per batch, and 1% late by up to two days."""
        self.batch += 1
        self.now += timedelta(minutes=10)
        late = count // 100
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                for start, span, n, tag in ((self.now - timedelta(minutes=10), timedelta(minutes=10), count - late, "n"),
                                            (self.now - timedelta(days=2), timedelta(days=2), late, "l")):
                    await conn.execute(f"INSERT INTO events {COLUMNS} {EVENT_ROWS}",
                                       start, n, self.subjects, f"{tag}{self.batch}-", span)

    async def refresh(self) -> tuple[float, int]:
        # With the default refresher.dayZones, as a deployment merges.
        refresher = Refresher(self.pool, max_batch=200_000, day_zones=RefresherConfig().day_zones)
        started = time.perf_counter()
        report = await refresher.run_cycle()
        return time.perf_counter() - started, report.events

    async def backfill(self, what: str) -> None:
        """Refresh cycles until every event is merged (a cycle may stop early when a
        writer or autovacuum holds the table)."""
        started, merged = time.perf_counter(), 0
        while True:
            merged += (await self.refresh())[1]
            async with self.pool.acquire() as conn:
                if await conn.fetchval("SELECT min(last_seq) = pg_sequence_last_value('events_seq') "
                                       "FROM meter_rollups"):
                    break
        elapsed = time.perf_counter() - started
        say(f"  backfill {what}: {merged:,} events merged in {elapsed:.1f} s ({merged / elapsed:,.0f} events/s)")

    async def refresh_new(self, rounds: int) -> float:
        times = []
        for _ in range(rounds):
            await self.add_new(10_000)
            elapsed, merged = await self.refresh()
            assert merged > 8_000, merged
            times.append(elapsed)
        return statistics.median(times)

    async def zone_cost(self, rounds: int) -> tuple[float, float]:
        """Median merge of 10k new events with the default day zones and with none: the
        same range merged in alternation, each time rolled back."""
        await self.add_new(10_000)
        timed: dict[bool, list[float]] = {True: [], False: []}
        async with self.pool.acquire() as conn:
            rollup = Rollup.from_row(await conn.fetchrow(f"SELECT {ROLLUP_COLUMNS} FROM meter_rollups"))
            head = await conn.fetchval("SELECT pg_sequence_last_value('events_seq')")
            for n in range(2 * rounds):
                zoned = n % 2 == 0
                tr = conn.transaction()
                await tr.start()
                await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
                started = time.perf_counter()
                await merge_range(conn, replace(rollup, day_zones=rollup.day_zones if zoned else ()),
                                  rollup.last_seq, head)
                timed[zoned].append(time.perf_counter() - started)
                await tr.rollback()
        await self.refresh()
        return statistics.median(timed[True]), statistics.median(timed[False])

    async def vacuum(self) -> None:
        async with self.pool.acquire() as conn:
            tables = await conn.fetch("SELECT schemaname || '.' || tablename AS t FROM pg_tables "
                                      "WHERE schemaname = 'rollup'")
            for row in tables:
                await conn.execute(f"VACUUM ANALYZE {row['t']}")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


RAW_QUERY = """
SELECT date_trunc('day', time, $3) AS day, subject, sum(pgmeter_number(data #> '{ms}')) AS value
  FROM events
 WHERE namespace = 'default' AND type = 'api.call' AND time >= $1 AND time < $2
 GROUP BY 1, 2
"""
MATVIEW = """
CREATE MATERIALIZED VIEW bench_minutes AS
SELECT date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, subject,
       pgmeter_group_value(data #> '{endpoint}') AS endpoint,
       count(*) AS cnt, sum(pgmeter_number(data #> '{ms}')) AS s_sum
  FROM events
 WHERE namespace = 'default' AND type = 'api.call'
 GROUP BY 1, 2, 3
WITH NO DATA
"""


# UTC reads d1; Berlin and Kolkata their local-day level (default refresher.dayZones);
# Paris has Berlin's offsets but is not kept, so it shows what Berlin cost before
# (h1), in the same run.
ZONES = ("UTC", "Europe/Berlin", "Asia/Kolkata", "Europe/Paris")


async def run(total: int, first: int, subjects: int, query_runs: int, raw_runs: int, rounds: int,
              days: int = DAYS) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-query-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    proc, url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
    try:
        admin = await asyncpg.connect(url)
        for setting in ("work_mem = '64MB'", "maintenance_work_mem = '1GB'", "max_wal_size = '16GB'",
                        "checkpoint_timeout = '30min'"):
            await admin.execute(f"ALTER SYSTEM SET {setting}")
        await admin.execute("SELECT pg_reload_conf()")
        version = await admin.fetchval("SHOW server_version")
        await admin.close()
        migrate(url)
        pool = await create_pool(url, size=4)
        bench = Bench(pool, subjects, days)
        async with pool.acquire() as conn:
            meter = await store.create(conn, "default", METER)
        say(f"pgmeter query benchmark: {total:,} events over {days} days (daily partitions), {subjects} subjects, "
            f"{len(ENDPOINTS)} endpoints; PostgreSQL {version}, {os.cpu_count()} CPUs")
        say(f"meter: SUM of $.ms by endpoint; levels m1, q15, h1, d1 and local days in "
            f"{', '.join(RefresherConfig().day_zones)}")

        started = time.perf_counter()
        await bench.load_fresh(first)
        say(f"  load {human(first)}: {time.perf_counter() - started:.1f} s")
        await bench.backfill(human(first))
        await bench.vacuum()
        refresh_small = await bench.refresh_new(rounds)
        say(f"  refresh of 10k new events at {human(first)}: median {refresh_small * 1000:.0f} ms ({rounds} rounds)")

        if total > first:
            started = time.perf_counter()
            await bench.load_more(total - first)
            say(f"  load +{human(total - first)}: {time.perf_counter() - started:.1f} s")
            await bench.backfill(f"+{human(total - first)}")
            await bench.vacuum()
        refresh_large = await bench.refresh_new(rounds)
        say(f"  refresh of 10k new events at {human(total)}: median {refresh_large * 1000:.0f} ms")
        zoned, unzoned = await bench.zone_cost(rounds)
        say(f"  merge of 10k new events with the {len(RefresherConfig().day_zones)} day zones / none: "
            f"median {zoned * 1000:.0f} / {unzoned * 1000:.0f} ms ({zoned / unzoned:.2f}x)")

        async with pool.acquire() as conn:
            await conn.execute(MATVIEW)
            started = time.perf_counter()
            await conn.execute("REFRESH MATERIALIZED VIEW bench_minutes")
            full = time.perf_counter() - started
            events = await conn.fetchval("SELECT count(*) FROM events")
            sizes = await conn.fetch(
                "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes, c.reltuples::bigint AS rows "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'rollup' AND c.relkind = 'r' ORDER BY 1")
            await conn.execute("DROP MATERIALIZED VIEW bench_minutes")
            await conn.execute("CHECKPOINT")
            database = await conn.fetchval("SELECT pg_database_size(current_database())")
            raw = await conn.fetchval("SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                                      "WHERE inhparent = 'events'::regclass")
            dedup = await conn.fetchval("SELECT pg_total_relation_size('event_dedup')")
        say(f"  REFRESH MATERIALIZED VIEW (equivalent m1 view) at {events:,} events: {full:.1f} s")
        for row in sizes:
            say(f"    rollup {row['relname'].split('_')[0]:>3}: {row['rows']:>10,} rows, {row['bytes'] / 2**20:,.0f} MiB")
        rollups = sum(row["bytes"] for row in sizes)
        # The bulk load writes no dedup keys (the sink does, 16 bytes + btree per event).
        say(f"  disk: database {database / 2**30:.2f} GiB = {database / events:,.0f} B/event (events with indexes "
            f"{raw / events:,.0f} B, rollups {rollups / events:,.0f} B, dedup {dedup / events:,.0f} B per event)")

        # Queries: 10k new events are left unmerged (the tail), more than a 2 s refresh
        # interval leaves at 4k events/s.
        await bench.add_new(10_000)
        # The last 30 whole days, today included (where the tail is), in three zones:
        # UTC (d1), Europe/Berlin (h1) and Asia/Kolkata (q15).
        # Zones take turns query by query, so a busy moment of the machine does not
        # land on one zone's figures only.
        figures = {}
        queries = {zone: QueryParams(from_=START + timedelta(days=days - 29), to=START + timedelta(days=days + 1),
                                     window_size=WindowSize.DAY, window_time_zone=zone, group_by=("subject",))
                   for zone in ZONES}
        results = {zone: await run_query(pool, meter, params) for zone, params in queries.items() for _ in range(5)}
        meter_times: dict[str, list[float]] = {zone: [] for zone in ZONES}
        for _ in range(query_runs):
            for zone, params in queries.items():
                started = time.perf_counter()
                results[zone] = await run_query(pool, meter, params)
                meter_times[zone].append(time.perf_counter() - started)
        for zone, params in queries.items():
            result = results[zone]
            raw_times = []
            async with pool.acquire() as conn:
                for _ in range(raw_runs):
                    started = time.perf_counter()
                    raw = await conn.fetch(RAW_QUERY, params.from_, params.to, zone)
                    raw_times.append(time.perf_counter() - started)
            # A SUM meter reports no row for a group whose values are all invalid (NULL).
            expected = {(r["day"], r["subject"]): r["value"] for r in raw if r["value"] is not None}
            assert len(expected) == len(result.rows), (zone, len(expected), len(result.rows))
            wrong = [(row.window_start, row.subject, row.value, expected.get((row.window_start, row.subject)))
                     for row in result.rows if expected.get((row.window_start, row.subject)) != row.value]
            assert not wrong, (zone, len(wrong), wrong[:5])
            m50, m99 = percentile(meter_times[zone], 50), percentile(meter_times[zone], 99)
            r50, r99 = percentile(raw_times, 50), percentile(raw_times, 99)
            figures[zone] = (m50, m99, r50, r99)
            say(f"  meter query, 30 days x DAY ({zone}) x group by subject ({len(result.rows):,} rows, "
                f"answer equal to raw): p50 {m50 * 1000:.1f} ms, p99 {m99 * 1000:.1f} ms ({query_runs} runs)")
            say(f"  raw GROUP BY over events, same answer: p50 {r50 * 1000:.0f} ms, p99 {r99 * 1000:.0f} ms "
                f"({raw_runs} runs)")

        cached = await cached_workload(workdir, pool, meter, query_runs, days)

        say("")
        say("summary")
        ratio = refresh_large / refresh_small
        say(f"  refresh 10k new: {refresh_small * 1000:.0f} ms at {human(first)}, {refresh_large * 1000:.0f} ms "
            f"at {human(total)}: {ratio:.2f}x  (target <= 1.5x) {'ok' if ratio <= 1.5 else 'MISSED'}")
        ratio = full / refresh_large
        say(f"  full REFRESH MATERIALIZED VIEW {full:.1f} s vs incremental {refresh_large * 1000:.0f} ms: "
            f"{ratio:,.0f}x cheaper  (target >= 100x) {'ok' if ratio >= 100 else 'MISSED'}")
        for zone, (m50, m99, r50, r99) in figures.items():
            say(f"  meter query ({zone}) p99 {m99 * 1000:.1f} ms  (target <= 50 ms) "
                f"{'ok' if m99 <= 0.050 else 'MISSED'}")
            ratio = r50 / m50
            say(f"  meter query ({zone}) vs raw: p50 {ratio:,.0f}x, p99 {r99 / m99:,.0f}x faster  (target >= 100x) "
                f"{'ok' if ratio >= 100 else 'MISSED'}")
        berlin, paris = figures["Europe/Berlin"], figures["Europe/Paris"]
        say(f"  Berlin's local days vs the same offsets through hours (Paris): p50 {paris[0] / berlin[0]:.2f}x, "
            f"p99 {paris[1] / berlin[1]:.2f}x faster; Berlin vs UTC p50 {berlin[0] / figures['UTC'][0]:.2f}x")
        say(f"  cached meter query p99 {cached.p99 * 1000:.2f} ms  (target <= 3 ms) "
            f"{'ok' if cached.p99 <= 0.003 else 'MISSED'}; hit ratio {cached.hit_ratio:.1%}")
        await pool.close()
    finally:
        proc.stop()
        services.remove_tree(workdir)


@dataclass
class CachedFigures:
    p50: float
    p99: float
    hit_ratio: float


# A dashboard: the same few panels refreshed over and over; a panel per heavy TPP.
def dashboard_panels(subjects: list[str], days: int = DAYS) -> list[QueryParams]:
    end = START + timedelta(days=days)
    start = end - timedelta(days=DAYS)
    panels = [
        QueryParams(from_=start, to=end, window_size=WindowSize.DAY, group_by=("subject",)),
        QueryParams(from_=end - timedelta(days=7), to=end, window_size=WindowSize.HOUR),
        QueryParams(from_=start, to=end, window_size=WindowSize.DAY, window_time_zone="Asia/Kolkata",
                    group_by=("endpoint",)),
        QueryParams(from_=start, to=end),
    ]
    panels += [QueryParams(from_=start, to=end, window_size=WindowSize.DAY, subjects=(subject,))
               for subject in subjects]
    return panels


async def cached_workload(workdir: Path, pool: asyncpg.Pool, meter: store.Meter, runs: int,
                          days: int = DAYS) -> CachedFigures:
    """Dashboard-like repeated queries through the Valkey cache, with a late event
    (an epoch bump, as the sink makes it) after every 50 queries."""
    import valkey.asyncio as valkey_asyncio

    from pgmeter.api.query import iter_json
    from pgmeter.config import Settings
    from pgmeter.query import cache as query_cache

    proc, url = services.start_valkey(workdir / "valkey", free_port(), log_path=workdir / "valkey.log")
    client = valkey_asyncio.from_url(url, socket_timeout=0.05)
    try:
        cache = query_cache.QueryCache(client, Settings(valkey={"url": url}))
        async with pool.acquire() as conn:
            heavy = [row["subject"] for row in await conn.fetch(
                "SELECT subject FROM events GROUP BY subject ORDER BY count(*) DESC LIMIT 6")]
        panels = dashboard_panels(heavy, days)
        def hits() -> float:
            return REGISTRY.get_sample_value("pgmeter_cache_hits_total") or 0.0

        times, hit_times = [], []
        total = runs * 5
        for n in range(total):
            if n and n % 50 == 0:
                await pool.execute("INSERT INTO cache_epochs (namespace, event_type, epoch) VALUES ($1, $2, 1) "
                                   "ON CONFLICT (namespace, event_type) DO UPDATE SET epoch = cache_epochs.epoch + 1",
                                   meter.namespace, meter.event_type)
            before = hits()
            panel = panels[n % len(panels)]
            started = time.perf_counter()
            # As the API answers: the JSON body, cached whole when the panel is settled.
            await query_cache.collect(await cache.respond(pool, meter, panel, "json", partial(iter_json, panel)))
            elapsed = time.perf_counter() - started
            times.append(elapsed)
            if hits() > before:
                hit_times.append(elapsed)
        figures = CachedFigures(percentile(hit_times or times, 50), percentile(hit_times or times, 99),
                                len(hit_times) / total)
        say(f"  cached meter query (dashboard of {len(panels)} panels, {total} queries, a late event every 50): "
            f"hits p50 {figures.p50 * 1000:.2f} ms, p99 {figures.p99 * 1000:.2f} ms; hit ratio {figures.hit_ratio:.1%}; "
            f"all queries p50 {percentile(times, 50) * 1000:.2f} ms, p99 {percentile(times, 99) * 1000:.2f} ms")
        return figures
    finally:
        await client.aclose()
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events at full size (default 10M)")
    parser.add_argument("--subjects", type=int, default=200, help="distinct subjects (default 200)")
    parser.add_argument("--days", type=int, default=DAYS,
                        help="daily partitions the events spread over (default 30; the year target: 365)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (200k events)")
    args = parser.parse_args(argv)
    if args.quick:
        total, first, query_runs, raw_runs, rounds = 200_000, 50_000, 30, 3, 2
    else:
        total, first = args.events, min(1_000_000, args.events)
        query_runs, raw_runs, rounds = 200, 5, 5
    asyncio.run(run(total, first, args.subjects, query_runs, raw_runs, rounds, args.days))
    if args.quick:
        # The ratios only mean something at size: at 200k events a raw GROUP BY is fast
        # and the fixed costs of a refresh dominate, so several targets read MISSED.
        print("\nnote: --quick is a smoke test; the targets above are sized for the full run "
              "(10M events), so MISSED here says nothing about them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
