"""Metered entitlement values: the engine fed with pgmeter's own usage.

A value read opens one REPEATABLE READ snapshot and asks the meter query engine
(rollups plus the unmerged tail) for the usage of every burn phase inside it, so
every phase sees the same committed events and a value is exact up to the last
committed event. The phases do not depend on usage, so a dry run of the engine
names them and :func:`pgmeter.query.engine.usage_in_ranges` answers them all in
one statement (UNIQUE_COUNT, counted from the period start, asks per phase). Usage
is the customer's: the events of its key and subject keys aggregated together.
Everything else the read needs (customer, feature, meter, grants, resets, cache
epoch, snapshots, the meter query's rollup row and tail floor) comes from one
context statement (:func:`pgmeter.entitlements.store.load`), so a steady read is
four round trips: BEGIN, the context, the usage, COMMIT.

Snapshots keep reads cheap: the engine's state right after the newest usage-period
boundary that lies at least ``valkey.settleAfter`` in the past is stored, and the
next read resumes there, so it costs the phases of the current period only. A
snapshot is trusted while the cache epoch of the meter's event type is the one it
was computed under (the sink bumps it for every late event, see
:mod:`pgmeter.query.cache`). After a bump, the snapshot is checked instead of
thrown away: one query recomputes the usage from measureUsageFrom to the snapshot
and compares it with the usage the snapshot saw. Equal means the late events did
not cross it (it is re-stamped); different means they did, and it is dropped.
Grants, voids, resets and subject changes drop the snapshots after their time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import TypeVar

import asyncpg

from pgmeter.entitlements import engine, store
from pgmeter.entitlements.engine import ZERO, Grant, Reset, Segment, State
from pgmeter.entitlements.periods import MINUTE, Recurrence, ceil_minute, parse_interval
from pgmeter.meters import store as meter_store
from pgmeter.meters.model import Aggregation
from pgmeter.query.engine import Source, run_query, usage_in_ranges
from pgmeter.query.params import QueryParams, WindowSize

T = TypeVar("T")


@dataclass
class Timeline:
    """Usage periods: ``(from, recurrence, preserveOverage)`` entries, the first at measureUsageFrom."""

    entries: list[tuple[datetime, Recurrence, bool]]
    default_preserve: bool

    @classmethod
    def of(cls, ent: store.Entitlement, resets: list[store.ResetRow]) -> Timeline:
        recurrence = ent.recurrence
        assert recurrence is not None and ent.measure_usage_from is not None
        entries = [(ent.measure_usage_from, recurrence, ent.preserve_overage_at_reset)]
        for r in resets:
            entries.append((r.reset_time, Recurrence(r.anchor, parse_interval(r.usage_interval)), r.preserve_overage))
        return cls(entries, ent.preserve_overage_at_reset)

    def _entry(self, t: datetime) -> int:
        index = 0
        for i, (start, _, _) in enumerate(self.entries):
            if start <= t:
                index = i
        return index

    def period_at(self, t: datetime) -> tuple[datetime, datetime]:
        i = self._entry(t)
        start, recurrence, _ = self.entries[i]
        lo, hi = recurrence.period_at(max(t, start))
        lo = max(lo, start)
        if i + 1 < len(self.entries):
            hi = min(hi, self.entries[i + 1][0])
        return lo, hi

    def resets_between(self, lo: datetime, hi: datetime) -> list[Reset]:
        """Every reset in ``(lo, hi]``: stored resets and the period boundaries."""
        found: dict[datetime, bool] = {}
        for i, (start, recurrence, preserve) in enumerate(self.entries):
            end = self.entries[i + 1][0] if i + 1 < len(self.entries) else None
            if i > 0 and lo < start <= hi:
                found[start] = preserve
            a, b = max(lo, start), hi if end is None else min(hi, end)
            if a > b:
                continue
            for t in recurrence.between(a, b, include_lo=False, include_hi=True):
                if t > start and (end is None or t < end):
                    found.setdefault(t, self.default_preserve)
        return [Reset(t, p) for t, p in sorted(found.items())]

    @property
    def last_reset(self) -> datetime:
        return self.entries[-1][0]


@dataclass
class Context:
    """Everything a metered value depends on, read in one snapshot (one statement,
    :func:`pgmeter.entitlements.store.load`)."""

    entitlement: store.Entitlement
    customer: store.Customer
    feature: store.Feature
    meter: meter_store.Meter
    grants: list[store.GrantRow]
    resets: list[store.ResetRow]
    now: datetime  # the transaction's now()
    fingerprint: tuple[object, ...]  # see store.fingerprint
    epoch: int  # the cache epoch of the meter's event type
    snapshots_at: datetime | None  # snapshots holds those at or before this (None: not read)
    snapshots: list[store.Snapshot]  # newest first
    source: Source | None  # the meter query's rollup and tail floor, when read in this snapshot

    @property
    def engine_grants(self) -> list[Grant]:
        return [g.engine_grant() for g in self.grants]

    @property
    def timeline(self) -> Timeline:
        return Timeline.of(self.entitlement, self.resets)

    @property
    def latest(self) -> bool:
        return self.meter.aggregation is Aggregation.LATEST

    @property
    def unique(self) -> bool:
        return self.meter.aggregation is Aggregation.UNIQUE_COUNT


@dataclass
class Value:
    at: datetime
    balance: Decimal
    usage: Decimal
    overage: Decimal
    total_available: Decimal
    grant_balances: dict[str, Decimal]
    has_access: bool
    period: tuple[datetime, datetime]


@dataclass
class _Pending:
    """Snapshot bookkeeping decided during a read, written after it."""

    save: store.Snapshot | None = None
    epoch: int = 0  # the cache epoch the read saw
    restamp: list[datetime] = field(default_factory=list)
    drop_from: datetime | None = None


class Usage:
    """Usage of one entitlement from the meter query engine, inside the caller's snapshot."""

    def __init__(self, conn: asyncpg.Connection, ctx: Context) -> None:
        self.conn = conn
        self.ctx = ctx
        self.subjects = tuple(ctx.customer.usage_keys)
        # The query groups by the customer, so the engine aggregates over the set of its
        # subjects at once: a distinct count or a latest value across several subject
        # keys is not the sum (or the largest) of per-subject values.
        self.customers = {ctx.customer.id: self.subjects}
        self.filters = {k: (v,) for k, v in (ctx.feature.filters or {}).items()}
        self.known: dict[tuple[datetime, datetime], Decimal] = {}

    async def prefetch(self, ranges: list[tuple[datetime, datetime]]) -> None:
        """The usage of every adjacent range the engine will ask for, in one statement
        (:func:`~pgmeter.query.engine.usage_in_ranges`) instead of one query each."""
        bounds = sorted({t for lo, hi in ranges if lo < hi for t in (lo, hi)})
        if len(bounds) < 2 or not self.subjects:
            return
        values = await usage_in_ranges(self.conn, self.ctx.meter, QueryParams(
            customers=self.customers, filter_group_by=self.filters), bounds, source=self.ctx.source)
        for (lo, hi), value in zip(zip(bounds, bounds[1:], strict=False), values, strict=True):
            self.known[(lo, hi)] = ZERO if value is None else value

    async def total(self, lo: datetime, hi: datetime) -> Decimal:
        if hi <= lo or not self.subjects:
            return ZERO
        if (lo, hi) in self.known:
            return self.known[(lo, hi)]
        result = await run_query(self.conn, self.ctx.meter, QueryParams(
            from_=lo, to=hi, customers=self.customers, filter_group_by=self.filters))
        return result.rows[0].value if result.rows else ZERO  # one row: this customer's

    async def windows(self, lo: datetime, hi: datetime, size: WindowSize, zone: str) -> dict[datetime, Decimal]:
        if hi <= lo or not self.subjects:
            return {}
        result = await run_query(self.conn, self.ctx.meter, QueryParams(
            from_=lo, to=hi, window_size=size, window_time_zone=zone, customers=self.customers,
            filter_group_by=self.filters))
        return {row.window_start.astimezone(UTC): row.value for row in result.rows}

    async def __call__(self, period_start: datetime, lo: datetime, hi: datetime) -> Decimal:
        if self.ctx.unique:
            # Distinct counts do not add up across phases: count from the period start.
            return await self.total(period_start, hi) - await self.total(period_start, lo)
        return await self.total(lo, hi)


async def load_context(conn: asyncpg.Connection, ent: store.Entitlement, *, at: datetime | None = None) -> Context:
    """The context of ``ent``'s values, in one round trip.

    With ``at``, it also holds what a computation at ``at`` starts from: the snapshots
    at or before it and the meter query's source (rollup row and tail floor), which the
    usage statement then does not read again. Only a caller inside one REPEATABLE READ
    snapshot passes ``at``: under READ COMMITTED the rollup could move on between this
    statement and the usage statement, and the tail would count merged events twice.
    """
    loaded = await store.load(conn, ent, at)
    return Context(ent, loaded.customer, loaded.feature, loaded.meter, loaded.grants, loaded.resets,
                   now=loaded.now, fingerprint=loaded.fingerprint, epoch=loaded.epoch, snapshots_at=at,
                   snapshots=loaded.snapshots, source=loaded.source if at is not None else None)


async def _start(conn: asyncpg.Connection, ctx: Context, usage: Usage, at: datetime, epoch: int,
                 pending: _Pending) -> State:
    ent = ctx.entitlement
    assert ent.measure_usage_from is not None
    if not ctx.latest:
        snapshots = ctx.snapshots if ctx.snapshots_at == at else await store.snapshots_at_or_before(conn, ent.id, at)
        for snap in snapshots:
            if snap.state.at < ent.measure_usage_from:
                break
            if snap.epoch == epoch:
                return snap.state
            if not ctx.unique and await usage.total(ent.measure_usage_from, snap.state.at) == snap.state.checksum:
                pending.restamp.append(snap.state.at)
                return snap.state
            pending.drop_from = snap.state.at  # a late event crossed it (and everything after it)
    return engine.starting_state(ctx.engine_grants, ent.measure_usage_from)


async def compute(conn: asyncpg.Connection, ctx: Context, at: datetime, *, now: datetime, grace: timedelta,
                  history: list[Segment] | None = None, observe: list[datetime] | None = None,
                  ) -> tuple[State, _Pending]:
    """The engine's state at ``at`` (minute-aligned), in the caller's snapshot."""
    ent = ctx.entitlement
    assert ent.measure_usage_from is not None
    grants = ctx.engine_grants
    pending = _Pending()
    if at < ent.measure_usage_from:
        return engine.starting_state(grants, at), pending
    usage = Usage(conn, ctx)
    epoch = pending.epoch = ctx.epoch
    start = await _start(conn, ctx, usage, at, epoch, pending)
    if history is not None:
        start = engine.starting_state(grants, ent.measure_usage_from) if start.at > min(observe or [at]) else start
    timeline = ctx.timeline
    resets = timeline.resets_between(start.at, at)
    horizon = now - grace
    saved: list[State] = []

    def on_reset(state: State) -> None:
        if state.at <= horizon and state.at > start.at:
            saved.append(state)

    period_start = timeline.period_at(start.at)[0]
    if not ctx.unique:
        # The phases do not depend on usage: a dry run names them, one statement reads
        # them all, then the real run finds each phase's usage in hand.
        ranges: list[tuple[datetime, datetime]] = []

        async def record(_: datetime, lo: datetime, hi: datetime) -> Decimal:
            ranges.append((lo, hi))
            return ZERO

        await engine.run(start, period_start, grants, resets, at, record, latest=ctx.latest, observe=observe)
        await usage.prefetch(ranges)
    state = await engine.run(start, period_start, grants, resets, at, usage,
                             latest=ctx.latest, history=history, on_reset=on_reset, observe=observe)
    if saved and not ctx.latest:
        pending.save = store.Snapshot(saved[-1], epoch)
    return state, pending


def lock_key(entitlement_id: str) -> str:
    return f"pgmeter.entitlement:{entitlement_id}"


async def _write_back(pool: asyncpg.Pool, ent: store.Entitlement, pending: _Pending, seen: tuple[object, ...]) -> None:
    if pending.save is None and not pending.restamp and pending.drop_from is None:
        return
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(ent.id))
        if await store.fingerprint(conn, ent) != seen:
            return  # a grant, void, reset or subject change came in meanwhile: its own invalidation wins
        if pending.drop_from is not None:
            await store.invalidate_snapshots(conn, [ent.id], pending.drop_from)
        for at in pending.restamp:
            await store.restamp_snapshot(conn, ent.id, at, pending.epoch)
        if pending.save is not None:
            await store.save_snapshot(conn, ent.id, pending.save)


async def metered_value(pool: asyncpg.Pool, ent: store.Entitlement, time: datetime, *, grace: timedelta) -> tuple[Value, Context]:
    at = ceil_minute(time)
    async with pool.acquire() as conn:
        # Four round trips: BEGIN, the context (load_context), the usage of every
        # phase (usage_in_ranges), COMMIT; the snapshot write-back is rare.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            ctx = await load_context(conn, ent, at=at)
            state, pending = await compute(conn, ctx, at, now=ctx.now, grace=grace)
    await _write_back(pool, ent, pending, ctx.fingerprint)
    return value_of(ctx, state, at), ctx


def value_of(ctx: Context, state: State, at: datetime) -> Value:
    grant_balances = engine.visible_balances(state, ctx.engine_grants)
    balance = sum(grant_balances.values(), ZERO)
    return Value(at=at, balance=balance, usage=state.usage, overage=state.overage,
                 total_available=state.total_grant_usage + balance, grant_balances=grant_balances,
                 has_access=ctx.entitlement.is_soft_limit or balance > 0,
                 period=ctx.timeline.period_at(at))


# -- history ---------------------------------------------------------------------

_TRUNC: dict[WindowSize, Callable[[datetime], datetime]] = {
    WindowSize.MINUTE: lambda t: t.replace(second=0, microsecond=0),
    WindowSize.HOUR: lambda t: t.replace(minute=0, second=0, microsecond=0),
    WindowSize.DAY: lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0),
    WindowSize.MONTH: lambda t: t.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
}


def windows(lo: datetime, hi: datetime, size: WindowSize, zone: tzinfo) -> list[tuple[datetime, datetime]]:
    """Calendar windows in ``zone`` covering ``[lo, hi)``: local wall-clock arithmetic for DAY and MONTH."""
    out = []
    local = _TRUNC[size](lo.astimezone(zone))
    while True:
        start = local.astimezone(UTC)
        if start >= hi:
            break
        if size is WindowSize.MINUTE:
            nxt = (start + MINUTE).astimezone(zone)
        elif size is WindowSize.HOUR:
            nxt = (start + timedelta(hours=1)).astimezone(zone)
        elif size is WindowSize.DAY:
            nxt = (local.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=zone)
        else:
            month = local.month % 12 + 1
            nxt = local.replace(year=local.year + (local.month == 12), month=month, tzinfo=None).replace(tzinfo=zone)
        out.append((start, nxt.astimezone(UTC)))
        local = nxt
    return out


@dataclass
class History:
    windows: list[tuple[datetime, datetime, Decimal, Decimal]]  # start, end, usage, balance at start
    segments: list[Segment]
    grants: list[Grant]


async def history(pool: asyncpg.Pool, ent: store.Entitlement, lo: datetime, hi: datetime, size: WindowSize,
                  zone_name: str, zone: tzinfo, *, grace: timedelta) -> History:
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            ctx = await load_context(conn, ent, at=hi)
            assert ent.measure_usage_from is not None
            spans = [w for w in windows(lo, hi, size, zone) if w[0] >= ent.measure_usage_from]
            observe = [w[0] for w in spans]
            segments: list[Segment] = []
            await compute(conn, ctx, hi, now=ctx.now, grace=grace, history=segments, observe=observe)
            usage = await Usage(conn, ctx).windows(lo, hi, size, zone_name)
    grants = ctx.engine_grants
    at_start: dict[datetime, dict[str, Decimal]] = {}
    for s in segments:
        if not s.rollover or s.start not in at_start:
            at_start[s.start] = s.balances_at_start
    out = []
    for start, end in spans:
        balances = at_start.get(start, {})
        balance = sum((b for gid, b in balances.items()
                       if any(g.id == gid and g.active_at(start) for g in grants)), ZERO)
        out.append((start, end, usage.get(start, ZERO), balance))
    return History(out, [s for s in segments if s.end > lo or s.start >= lo], grants)


async def gather_limited(coros: list[Awaitable[T]], limit: int = 10) -> list[T]:
    """Run at most ``limit`` at a time (the access endpoint's fan-out, as OpenMeter)."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))
