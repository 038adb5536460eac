"""``events`` partitions: daily for recent days, one per month (or part of one) for older ones.

Why two sizes: a tenant may send event times anywhere in the accepted window
(``limits.eventMaxAge``, 400 days back by default), and one partition per day of it
would be ~400 tables with 3 indexes each, all locked by every query that cannot
prune (the refresher reads by ``seq``). So the partition count is bounded whatever
the spread of event times:

- a day from ``DAILY_DAYS`` (35) days before today onwards gets its own partition
  ``events_pYYYYMMDD`` holding ``[day 00:00 UTC, next day 00:00 UTC)`` — these are
  also kept ready from yesterday to ``sink.partitionDaysAhead`` ahead;
- an older day gets a *span* partition ``events_pYYYYMMDD_YYYYMMDD`` (first and last
  day, inclusive) covering its calendar month, cut short where an existing
  partition begins or ends and never reaching into the daily range;
- a day some partition already covers is never given another one. Partitions are
  never merged or split: a daily partition that ages past ``DAILY_DAYS`` stays as it
  is, and a span only fills the gap around the day that needed it, so a daily and a
  span never overlap.

In steady state every day gets its daily partition while it is recent (maintenance
creates yesterday and the days ahead), so only months before pgmeter's first day
get spans: at most ``DAILY_DAYS`` + days ahead + 2 + one per month of the window
(about 60 with the defaults), however many distinct days a tenant sends.

No pg_partman (CNPG's images do not ship it) and no DEFAULT partition (attaching
next to a non-empty default scans and locks it). A partition is created the way
that does not block readers: as a standalone table with a CHECK constraint equal
to its bound, then ``ALTER TABLE events ATTACH PARTITION``, which takes only SHARE
UPDATE EXCLUSIVE on ``events`` (readers and writers carry on) and skips the
validation scan because the CHECK proves the bound. ``CREATE TABLE ... PARTITION
OF`` would instead wait for, and block, every reader of ``events``.

Concurrent creators (several sinks) are serialised by a transaction-scoped advisory
lock and decide the bounds after taking it, from the partitions attached at that
moment; "already covered" is success. Retention drops a partition once its upper
bound is past the horizon.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from pgmeter.sink.store import DEDUP_KEY_SQL

log = logging.getLogger(__name__)

DAY_MICROS = 86_400_000_000
EPOCH_DAY = date(1970, 1, 1)
# Days before today that still get a partition of their own; older days share spans.
DAILY_DAYS = 35
# Arbitrary constants all pgmeter processes agree on (the migration lock is ...001).
CREATE_LOCK_KEY = 7_283_110_101
RETENTION_LOCK_KEY = 7_283_110_102
_NAME = re.compile(r"^events_p(\d{8})(?:_(\d{8}))?$")
_NAME_SQL = "^events_p[0-9]{8}(_[0-9]{8})?$"


def day_of(micros: int) -> int:
    """Days since 1970-01-01 of a time in microseconds since the epoch (UTC)."""
    return micros // DAY_MICROS


def today(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    return (now.date() - EPOCH_DAY).days


def _date(day: int) -> date:
    return EPOCH_DAY + timedelta(days=day)


def _day(value: date) -> int:
    return (value - EPOCH_DAY).days


@dataclass(frozen=True, order=True)
class Span:
    """The days ``[lo, hi)`` one partition holds."""

    lo: int
    hi: int

    @property
    def name(self) -> str:
        if self.hi == self.lo + 1:
            return f"events_p{_date(self.lo):%Y%m%d}"
        return f"events_p{_date(self.lo):%Y%m%d}_{_date(self.hi - 1):%Y%m%d}"

    def __contains__(self, day: object) -> bool:
        return isinstance(day, int) and self.lo <= day < self.hi


def partition_name(day: int) -> str:
    """The name of the daily partition of ``day``."""
    return Span(day, day + 1).name


def _bound(day: int) -> str:
    try:
        return f"{_date(day):%Y-%m-%d} 00:00:00+00"
    except OverflowError:  # the day after 9999-12-31
        return "10000-01-01 00:00:00+00"


def span_of_name(name: str) -> Span | None:
    match = _NAME.match(name)
    if not match:
        return None
    try:
        lo = _day(datetime.strptime(match[1], "%Y%m%d").date())
        last = lo if match[2] is None else _day(datetime.strptime(match[2], "%Y%m%d").date())
    except ValueError:
        return None
    return Span(lo, last + 1) if last >= lo else None


def span_for(day: int, existing: list[Span], current_day: int) -> Span:
    """The partition to create for ``day``, which no partition in ``existing`` (sorted) covers."""
    if day >= current_day - DAILY_DAYS:
        return Span(day, day + 1)
    when = _date(day)
    lo = _day(when.replace(day=1))
    try:
        hi = _day((when.replace(day=28) + timedelta(days=4)).replace(day=1))
    except OverflowError:  # December 9999
        hi = _day(date.max) + 1
    hi = min(hi, current_day - DAILY_DAYS)
    # Cut at the neighbours: the last partition ending at or before ``day`` and the
    # first one starting after it.
    position = bisect.bisect_right(existing, Span(day, day))
    if position > 0:
        lo = max(lo, existing[position - 1].hi)
    if position < len(existing):
        hi = min(hi, existing[position].lo)
    return Span(lo, hi)


def _covering(spans: list[Span], day: int) -> Span | None:
    position = bisect.bisect_right(spans, Span(day, day + 10**9)) - 1
    if position >= 0 and day in spans[position]:
        return spans[position]
    return None


async def attached_spans(conn: asyncpg.Connection) -> list[Span]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass")
    return sorted(span for span in (span_of_name(r["relname"]) for r in rows) if span is not None)


async def attached_days(conn: asyncpg.Connection) -> set[int]:
    """Every day some partition covers."""
    return {day for span in await attached_spans(conn) for day in range(span.lo, span.hi)}


async def create_for(conn: asyncpg.Connection, day: int, *, now: datetime | None = None) -> tuple[Span | None, bool]:
    """Make sure a partition covers ``day``: ``(its span, whether we created it)``.

    The span is ``None`` only if a partition pgmeter did not name covers the day.
    """
    current_day = today(now)
    try:
        async with conn.transaction():
            # Never queue behind a long lock holder for long: the caller retries.
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CREATE_LOCK_KEY)
            existing = await attached_spans(conn)
            covering = _covering(existing, day)
            if covering is not None:
                return covering, False
            span = span_for(day, existing, current_day)
            name, low, high = span.name, _bound(span.lo), _bound(span.hi)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {name} (LIKE events INCLUDING DEFAULTS)")
            await conn.execute(
                f"ALTER TABLE {name} ADD CONSTRAINT {name}_bound "
                f"CHECK (time >= '{low}' AND time < '{high}')")
            await conn.execute(
                f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{low}') TO ('{high}')")
            # The partition bound now does the CHECK's job; no need to evaluate both per row.
            await conn.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bound")
    except asyncpg.InvalidObjectDefinitionError as exc:
        if "overlap" not in str(exc):
            raise
        # Someone attached a partition under a name of their own that covers this day.
        log.warning("a partition already covers this day",
                    extra={"partition": partition_name(day), "error": str(exc)})
        return None, False
    log.info("attached partition", extra={"partition": name})
    return span, True


async def create_partition(conn: asyncpg.Connection, day: int, *, now: datetime | None = None) -> bool:
    """Create and attach a partition covering ``day``; ``False`` if one was already there."""
    return (await create_for(conn, day, now=now))[1]


class PartitionMap:
    """The partitions' spans, cached; a day no partition covers gets one on demand."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self.spans = await attached_spans(conn)

    def covers(self, day: int) -> bool:
        return _covering(self.spans, day) is not None

    async def ensure(self, conn: asyncpg.Connection, days: Iterable[int], *, now: datetime | None = None) -> None:
        for day in sorted(set(days)):
            if self.covers(day):
                continue
            span, _ = await create_for(conn, day, now=now)
            if span is None:
                span = Span(day, day + 1)  # covered by a foreign partition; inserts will tell
            bisect.insort(self.spans, span)


def retention_horizon_day(retention_days: int, now: datetime | None = None) -> int | None:
    """Partitions (and events) of days before this one are past retention; None keeps all."""
    if retention_days <= 0:
        return None
    return today(now) - retention_days


async def _drop_detached(conn: asyncpg.Connection, name: str) -> None:
    async with conn.transaction():
        # The dedup rows of the events that go: each stored event is its key's winner.
        await conn.execute(f"DELETE FROM event_dedup WHERE key IN (SELECT {DEDUP_KEY_SQL} FROM {name})")
        await conn.execute(f"DROP TABLE {name}")
        # Answers over the dropped days may change (raw edges): no cached one survives.
        await conn.execute("UPDATE cache_epochs SET epoch = epoch + 1")
    log.info("dropped partition past retention", extra={"partition": name})


async def apply_retention(conn: asyncpg.Connection, retention_days: int, now: datetime | None = None) -> list[str]:
    """Detach (concurrently) and drop every partition entirely past retention.

    A span partition goes once its last day is past the horizon. Runs outside a
    transaction (``DETACH ... CONCURRENTLY`` must). One process at a time: the others
    skip the round. A detach interrupted half-way is finished with ``FINALIZE`` next
    round, and a detached table left behind by a crash is dropped.
    """
    horizon = retention_horizon_day(retention_days, now)
    if horizon is None:
        return []
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY):
        return []
    dropped: list[str] = []
    try:
        rows = await conn.fetch(
            "SELECT c.relname, i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass ORDER BY c.relname")
        for row in rows:
            span = span_of_name(row["relname"])
            if span is None or span.hi > horizon:
                continue
            name = row["relname"]
            if row["inhdetachpending"]:
                await conn.execute(f"ALTER TABLE events DETACH PARTITION {name} FINALIZE")
            else:
                await conn.execute(f"ALTER TABLE events DETACH PARTITION {name} CONCURRENTLY")
            await _drop_detached(conn, name)
            dropped.append(name)
        # Tables a crash left detached but not dropped.
        leftovers = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND c.relname ~ $1 AND n.nspname = current_schema() "
            "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)", _NAME_SQL)
        for row in leftovers:
            span = span_of_name(row["relname"])
            if span is not None and span.hi <= horizon:
                await _drop_detached(conn, row["relname"])
                dropped.append(row["relname"])
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    return dropped


async def maintain(conn: asyncpg.Connection, *, days_ahead: int, retention_days: int,
                   partitions: PartitionMap | None = None, now: datetime | None = None) -> list[str]:
    """One maintenance round: partitions from yesterday to ``days_ahead`` ready, retention applied."""
    first = today(now) - 1
    wanted = range(first, today(now) + days_ahead + 1)
    horizon = retention_horizon_day(retention_days, now)
    if horizon is not None:
        wanted = range(max(first, horizon), wanted.stop)
    covered = PartitionMap()
    await covered.refresh(conn)
    await covered.ensure(conn, wanted, now=now)
    dropped = await apply_retention(conn, retention_days, now)
    if partitions is not None:
        await partitions.refresh(conn)
    return dropped
