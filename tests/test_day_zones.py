"""Day rollups in the configured zones (refresher.dayZones): a DAY or MONTH query in
Europe/Berlin or Asia/Kolkata reads one row per local day, and stays exact across
DST days of 23 and 25 hours, half-hour zones, late events, a zone added to meters
that already merged events (filled from q15) and a zone taken away."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import psycopg
import pytest

from pgmeter.config import Settings, load_settings
from pgmeter.db.pool import create_pool
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams, WindowSize
from pgmeter.query.plan import carve, usable_levels
from pgmeter.rollup.day_zones import known_zones
from pgmeter.rollup.refresher import Refresher
from tests.support import events_sql, oracle
from tests.support.events_sql import Event

BERLIN, KOLKATA = "Europe/Berlin", "Asia/Kolkata"
ZONES = ("America/New_York", KOLKATA, BERLIN)
METERS = [
    {"slug": "total", "aggregation": "SUM", "eventType": "call", "valueProperty": "$.n", "groupBy": {"k": "$.k"}},
    {"slug": "users", "aggregation": "UNIQUE_COUNT", "eventType": "call", "valueProperty": "$.u",
     "groupBy": {"k": "$.k"}},
    {"slug": "calls", "aggregation": "COUNT", "eventType": "call"},
]
ORACLE = {m["slug"]: oracle.MeterDef(str(m["slug"]), str(m["aggregation"]), "call", m.get("valueProperty"),
                                     dict(m.get("groupBy", {})))  # type: ignore[arg-type]
          for m in METERS}
# Berlin's spring (23 h) and autumn (25 h) days of 2024, with the days around them.
SPRING, AUTUMN = datetime(2024, 3, 31, tzinfo=ZoneInfo(BERLIN)), datetime(2024, 10, 27, tzinfo=ZoneInfo(BERLIN))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# -- the planner ------------------------------------------------------------------

def test_the_planner_reads_local_days_only_in_a_zone_the_meter_keeps() -> None:
    lo, hi = at("2024-03-28T00:00:00+01:00"), at("2024-04-03T00:00:00+02:00")
    usable = usable_levels(WindowSize.DAY, BERLIN, lo, hi, ZONES)
    assert usable == {"m1", "q15", "h1", "dz"}
    assert carve(lo, hi, usable, BERLIN).levels == {"dz": [(lo, hi)]}
    # Not kept: hours, as before. Not DAY/MONTH: no local days.
    assert "dz" not in usable_levels(WindowSize.DAY, "Europe/Paris", lo, hi, ZONES)
    assert "dz" not in usable_levels(WindowSize.HOUR, BERLIN, lo, hi, ZONES)
    # Kolkata's midnight is 18:30 UTC: partial days at the edges come from q15
    # (:30 is not on the hour grid), whole days from dz.
    lo, hi = at("2024-03-01T10:15:00+05:30"), at("2024-03-05T07:45:00+05:30")
    usable = usable_levels(WindowSize.DAY, KOLKATA, lo, hi, ZONES)
    assert usable == {"m1", "q15", "dz"}
    plan = carve(lo, hi, usable, KOLKATA)
    assert plan.levels == {"q15": [(lo, at("2024-03-02T00:00:00+05:30")), (at("2024-03-05T00:00:00+05:30"), hi)],
                           "dz": [(at("2024-03-02T00:00:00+05:30"), at("2024-03-05T00:00:00+05:30"))]}
    # A zone whose clocks jump at midnight (Havana, 2024-03-10 00:00 -> 01:00) has a
    # day without a midnight: no dz over it, even when kept.
    lo, hi = at("2024-03-08T00:00:00-05:00"), at("2024-03-12T00:00:00-04:00")
    assert "dz" not in usable_levels(WindowSize.DAY, "America/Havana", lo, hi, ("America/Havana",))


def test_day_zones_are_configured_and_checked(tmp_path: Any) -> None:
    assert "Europe/Berlin" in Settings().refresher.day_zones
    path = tmp_path / "pgmeter.yaml"
    path.write_text("refresher: {dayZones: [Europe/Nowhere]}\n")
    with pytest.raises(Exception, match="unknown time zone"):
        load_settings(path)


# -- merges and queries against the oracle ------------------------------------------

@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    async def setup() -> None:
        pool = await create_pool(settings.postgres.url, size=1)
        async with pool.acquire() as conn:
            for body in METERS:
                await store.create(conn, "default", MeterSpec.model_validate(body))
        await pool.close()

    asyncio.run(setup())
    days = {(day + timedelta(days=d)).date() for day in (SPRING, AUTUMN) for d in range(-3, 4)}
    with psycopg.connect(settings.postgres.url, autocommit=True) as conn:
        events_sql.ensure_partitions(conn, days)
    yield settings.postgres.url


def edge_times(rng: random.Random) -> list[datetime]:
    """Instants that land on either side of local midnights (Berlin, Kolkata, New York)
    and of Berlin's DST changes, plus random ones over the two weeks."""
    out = []
    for day in (SPRING, AUTUMN):
        for d in range(-2, 3):
            for zone in ZONES:
                local = datetime.combine((day + timedelta(days=d)).date(), datetime.min.time(), ZoneInfo(zone))
                for delta in (-61, -1, 0, 59, 3600 * 2 + 30):
                    out.append(local.astimezone(UTC) + timedelta(seconds=delta))
        out += [day.astimezone(UTC) + timedelta(hours=h, seconds=s) for h in (0.9, 1.0, 2.0) for s in (-1, 0, 1)]
        out += [day.astimezone(UTC) + timedelta(seconds=rng.uniform(-2 * 86400, 3 * 86400)) for _ in range(60)]
    return out


def make_event(rng: random.Random, t: datetime) -> Event:
    return Event(f"s{rng.randrange(4)}", t, {"n": rng.choice([1, 2, "3", None]), "k": rng.choice(["a", "b"]),
                                             "u": rng.randrange(6)}, type="call")


def stored(url: str) -> list[oracle.Stored]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT seq, type, subject, time, data FROM events ORDER BY seq").fetchall()
    return [oracle.Stored(*row) for row in rows]


def normal(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Rows of either side as (start, end, subject, groups, value), instants in UTC."""
    out = []
    for row in rows:
        groups = row.group_by if isinstance(row.group_by, tuple) else tuple(sorted(row.group_by.items()))
        out.append((row.window_start.astimezone(UTC), row.window_end.astimezone(UTC), row.subject, groups,
                    Decimal(row.value)))
    return sorted(out, key=repr)


QUERIES = [
    (from_, to, window, zone, group_by)
    for from_, to in ((at("2024-03-28T10:17:00Z"), at("2024-04-02T05:03:30Z")),
                      (at("2024-10-23T00:00:00Z"), at("2024-10-31T00:00:00Z")),
                      (at("2024-03-01T00:00:00Z"), at("2024-11-01T00:00:00Z")))
    for window in (WindowSize.DAY, WindowSize.MONTH) for zone in (BERLIN, KOLKATA)
    for group_by in ((), ("subject",), ("k",), ("subject", "k"))
]


async def mismatches(pool: asyncpg.Pool, events: list[oracle.Stored]) -> list[str]:
    """Every query of QUERIES on every meter, against the oracle; the failures."""
    failures = []
    for slug, meter_def in ORACLE.items():
        async with pool.acquire() as conn:
            meter = await store.get(conn, "default", slug)
        assert meter is not None
        for from_, to, window, zone, group_by in QUERIES:
            group_by = tuple(g for g in group_by if g == "subject" or g in meter_def.group_by)
            result = await run_query(pool, meter, QueryParams(from_=from_, to=to, window_size=window,
                                                              window_time_zone=zone, group_by=group_by))
            expected = oracle.answer(meter_def, events, oracle.Query(from_, to, window.value, zone,
                                                                     group_by=group_by))
            if normal(result.rows) != normal(expected):
                failures.append(f"{slug} {from_}..{to} {window} {zone} {group_by}")
    return failures


def test_zone_days_are_exact_across_dst_half_hours_late_events_and_zone_changes(url: str) -> None:
    rng = random.Random(15)
    times = edge_times(rng)
    rng.shuffle(times)
    first, second = [make_event(rng, t) for t in times[:150]], [make_event(rng, t) for t in times[150:]]
    # Late events: times in days merged long ago, committed after them.
    late = [make_event(rng, t) for t in rng.sample(times, 40)]

    async def run() -> None:
        pool = await create_pool(url, size=2)
        try:
            events_sql.insert_committed(url, first)
            await Refresher(pool, max_batch=100).run_cycle()  # no zones yet: as before
            # The zones arrive with meters that merged events already: filled from
            # q15, then merged batch by batch.
            events_sql.insert_committed(url, second)
            await Refresher(pool, max_batch=100, day_zones=ZONES).run_cycle()
            events_sql.insert_committed(url, late)
            await Refresher(pool, max_batch=100, day_zones=ZONES).run_cycle()
            events = stored(url)
            assert len(events) == len(first) + len(second) + len(late)
            async with pool.acquire() as conn:
                recorded = await conn.fetch("SELECT day_zones FROM meter_rollups")
                assert [tuple(r["day_zones"]) for r in recorded] == [tuple(sorted(ZONES))] * len(METERS)
                # The COUNT meter's day rows, per zone, against an independent tally of
                # local days (zoneinfo): every event in exactly one local day per zone.
                dz = await conn.fetchval("SELECT 'rollup.dz_' || lower(r.meter_id) || '_v' || r.version "
                                         "FROM meter_rollups r JOIN meters m ON m.id = r.meter_id "
                                         "WHERE m.slug = 'calls'")
                for zone in ZONES:
                    rows = await conn.fetch(f"SELECT subject, bucket, cnt FROM {dz} WHERE zone = $1", zone)
                    tally = Counter((e.subject, oracle.window_start(e.time, "DAY", ZoneInfo(zone))) for e in events)
                    assert {(r["subject"], r["bucket"]): r["cnt"] for r in rows} == dict(tally), zone
            assert await mismatches(pool, events) == []

            # The answers do come from dz: a day row changed by hand shows in them.
            async with pool.acquire() as conn:
                meter = await store.get(conn, "default", "calls")
                assert meter is not None
                day = datetime(2024, 3, 31, tzinfo=ZoneInfo(BERLIN))
                params = QueryParams(from_=day - timedelta(days=1), to=day + timedelta(days=2),
                                     window_size=WindowSize.DAY, window_time_zone=BERLIN)
                before = {r.window_start: r.value for r in (await run_query(pool, meter, params)).rows}
                await conn.execute(f"UPDATE {dz} SET cnt = cnt + 1000 WHERE zone = $1 AND bucket = $2 "
                                   "AND subject = 's0'", BERLIN, day)
                after = {r.window_start: r.value for r in (await run_query(pool, meter, params)).rows}
                assert after[day] == before[day] + 1000
                await conn.execute(f"UPDATE {dz} SET cnt = cnt - 1000 WHERE zone = $1 AND bucket = $2 "
                                   "AND subject = 's0'", BERLIN, day)

            # New York taken away: its rows go, the others stay exact; more events merge.
            more = [make_event(rng, t) for t in rng.sample(times, 30)]
            events_sql.insert_committed(url, more)
            await Refresher(pool, max_batch=100, day_zones=(KOLKATA, BERLIN)).run_cycle()
            async with pool.acquire() as conn:
                assert await conn.fetchval(f"SELECT count(*) FROM {dz} WHERE zone = 'America/New_York'") == 0
                assert [tuple(r["day_zones"]) for r in await conn.fetch("SELECT day_zones FROM meter_rollups")] \
                    == [(KOLKATA, BERLIN)] * len(METERS)
            assert await mismatches(pool, stored(url)) == []
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_zone_postgres_does_not_know_is_left_out(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Python's and Postgres' zone databases may differ; a zone only Python knows would
    fail every merge, so the refresher leaves it out and says so."""
    async def run() -> tuple[str, ...]:
        conn = await asyncpg.connect(settings.postgres.url)
        try:
            return await known_zones(conn, [BERLIN, "Mars/Olympus_Mons", KOLKATA])
        finally:
            await conn.close()

    assert asyncio.run(run()) == (BERLIN, KOLKATA)
    assert any(getattr(r, "zone", None) == "Mars/Olympus_Mons" for r in caplog.records)
