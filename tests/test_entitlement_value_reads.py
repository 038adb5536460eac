"""A value read against the minute-by-minute oracle, and what it costs in round trips.

The read's inputs come from one context statement (entitlements.store.load) and its
usage from one statement over the rollups and the unmerged tail; this checks the
answer against tests/support/burndown.py fed with the events themselves, while part
of them is merged and part is not, after a snapshot is saved, and after late events
(one crossing the snapshot) bump the cache epoch.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from pgmeter.db.pool import create_pool
from pgmeter.entitlements import balance, service
from pgmeter.entitlements import store as ent_store
from pgmeter.entitlements.periods import ceil_minute, floor_minute
from pgmeter.entitlements.service import EntitlementInput, GrantInput
from pgmeter.meters import store as meter_store
from pgmeter.meters.model import Aggregation, MeterSpec
from pgmeter.rollup.refresher import Refresher
from tests.support import burndown, events_sql
from tests.support.events_sql import Event

CUSTOMER_SUBJECTS = ("tpp-a", "tpp-a2")  # its key and a subject key


async def merge_all(pool: asyncpg.Pool) -> None:
    refresher = Refresher(pool, max_batch=10_000)
    while True:
        await refresher.run_cycle()
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT min(last_seq) = pg_sequence_last_value('events_seq') FROM meter_rollups"):
                return


def oracle(events: list[Event], ent: ent_store.Entitlement, grants: list[ent_store.GrantRow],
           at: datetime) -> burndown.OValue:
    usage = Counter(floor_minute(e.time) for e in events if e.subject in CUSTOMER_SUBJECTS)
    assert ent.usage_anchor is not None and ent.measure_usage_from is not None
    return burndown.value(
        [burndown.OGrant(g.id, g.amount, g.priority, g.effective_at, g.created_at, g.expires_at,
                         min_rollover=g.min_rollover, max_rollover=g.max_rollover) for g in grants],
        {t: Decimal(n) for t, n in usage.items()}, ent.measure_usage_from, burndown.Every(ent.usage_anchor, months=1),
        [], False, at)


def test_a_value_read_is_four_round_trips_and_matches_the_minute_oracle(database_url: str) -> None:
    rng = random.Random(13)
    now = datetime.now(UTC)
    at = ceil_minute(now)
    subjects = [*CUSTOMER_SUBJECTS, "tpp-b"]
    # 45 days of usage; the current monthly period began 20 days ago.
    events = [Event(rng.choice(subjects), now - timedelta(seconds=rng.uniform(60, 45 * 86400)), None, type="call")
              for _ in range(600)]

    async def run() -> None:
        pool = await create_pool(database_url, size=2)
        logged: list[str] = []
        reader = await create_pool(database_url, size=1)
        try:
            async with pool.acquire() as conn:
                await meter_store.create(conn, "default",
                                         MeterSpec(slug="calls", aggregation=Aggregation.COUNT, eventType="call"))
                customer = await service.create_customer(conn, "default", {
                    "key": "tpp-a", "name": "A", "description": None, "primary_email": None, "currency": None,
                    "billing_address": None, "metadata": None}, ["tpp-a2"])
                await service.create_feature(conn, "default", "calls", "Calls", "calls", None, None)
                ent = await service.create_entitlement(conn, "default", customer, EntitlementInput(
                    type="metered", feature_id=None, feature_key="calls", usage_interval="MONTH",
                    usage_anchor=now - timedelta(days=20), measure_usage_from=now - timedelta(days=45)))
                period_start = balance.Timeline.of(ent, []).period_at(now)[0]
                for amount, priority, hours, days in ((100, 1, 1, 5), (50, 1, 2, None), (400, 2, 3, None)):
                    await service.create_grant(conn, ent, GrantInput(
                        amount=Decimal(amount), priority=priority, effective_at=period_start + timedelta(hours=hours),
                        expiration_duration="DAY" if days else None, expiration_count=days, min_rollover=Decimal(0),
                        max_rollover=Decimal(0), recurrence_interval=None, recurrence_anchor=None, metadata=None))
                grants = await ent_store.grants_of(conn, ent.id)
            # Half merged into the rollups, half left in the tail.
            events_sql.insert_committed(database_url, events[:300])
            await merge_all(pool)
            events_sql.insert_committed(database_url, events[300:])

            def check(value: balance.Value, seen: list[Event]) -> None:
                expected = oracle(seen, ent, grants, at)
                assert (value.balance, value.usage, value.overage, value.total_available, value.grant_balances) == (
                    expected.balance, expected.usage, expected.overage, expected.total, expected.grants)

            first, _ = await balance.metered_value(reader, ent, now, grace=timedelta(hours=1))
            check(first, events)
            async with pool.acquire() as conn:
                # The write-back's fingerprint agreed with the context's: the snapshot is there.
                assert await conn.fetchval("SELECT count(*) FROM balance_snapshots WHERE entitlement_id = $1",
                                           ent.id) == 1
            async with reader.acquire() as conn:
                conn.add_query_logger(lambda record: logged.append(record.query))
            second, ctx = await balance.metered_value(reader, ent, now, grace=timedelta(hours=1))
            await asyncio.sleep(0)  # loggers are called soon after each statement
            check(second, events)
            assert [s.state.at for s in ctx.snapshots] == [period_start]  # it resumed there
            statements = [q for q in logged if not q.startswith("SELECT pg_advisory_unlock_all()")]  # the pool's reset
            assert [q.split()[0].rstrip(";") for q in statements] == ["BEGIN", "WITH", "WITH", "COMMIT"], statements

            # Late events, one before the snapshot: the epoch moves and the value follows them.
            late = [Event("tpp-a2", period_start - timedelta(days=2), None, type="call"),
                    Event("tpp-a", now - timedelta(minutes=3), None, type="call")]
            events_sql.insert_committed(database_url, late)
            third, _ = await balance.metered_value(reader, ent, now, grace=timedelta(hours=1))
            check(third, events + late)
            await merge_all(pool)
            fourth, _ = await balance.metered_value(reader, ent, now, grace=timedelta(hours=1))
            check(fourth, events + late)
        finally:
            await reader.close()
            await pool.close()

    asyncio.run(run())
