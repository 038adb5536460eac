"""Daily ``events`` partitions: created ahead and on demand, dropped by retention.

No pg_partman (CNPG's images do not ship it) and no DEFAULT partition (attaching
next to a non-empty default scans and locks it). A partition is created the way
that does not block readers: as a standalone table with a CHECK constraint equal
to its bound, then ``ALTER TABLE events ATTACH PARTITION``, which takes only SHARE
UPDATE EXCLUSIVE on ``events`` (readers and writers carry on) and skips the
validation scan because the CHECK proves the bound. ``CREATE TABLE ... PARTITION
OF`` would instead wait for, and block, every reader of ``events``.

Partition ``events_pYYYYMMDD`` holds ``[day 00:00 UTC, next day 00:00 UTC)``.
Concurrent creators (several sinks) are serialised by a transaction-scoped
advisory lock and re-check after taking it; "already there" is success.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

DAY_MICROS = 86_400_000_000
EPOCH_DAY = date(1970, 1, 1)
# Arbitrary constants all pgmeter processes agree on (the migration lock is ...001).
CREATE_LOCK_KEY = 7_283_110_101
RETENTION_LOCK_KEY = 7_283_110_102
_NAME = re.compile(r"^events_p(\d{8})$")

# The dedup key of a stored row, in SQL: md5 over namespace, source and id joined by
# NUL bytes (text cannot hold chr(0), so the bytes are joined as bytea). Equal to
# pgmeter.sink.store.dedup_key.
DEDUP_KEY_SQL = ("md5(convert_to(namespace, 'UTF8') || '\\x00'::bytea || convert_to(source, 'UTF8') "
                 "|| '\\x00'::bytea || convert_to(id, 'UTF8'))::uuid")


def day_of(micros: int) -> int:
    """Days since 1970-01-01 of a time in microseconds since the epoch (UTC)."""
    return micros // DAY_MICROS


def today(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    return (now.date() - EPOCH_DAY).days


def partition_name(day: int) -> str:
    return f"events_p{EPOCH_DAY + timedelta(days=day):%Y%m%d}"


def _bound(day: int) -> str:
    try:
        return f"{EPOCH_DAY + timedelta(days=day):%Y-%m-%d} 00:00:00+00"
    except OverflowError:  # the day after 9999-12-31
        return "10000-01-01 00:00:00+00"


def _day_of_name(name: str) -> int | None:
    match = _NAME.match(name)
    if not match:
        return None
    try:
        return (datetime.strptime(match[1], "%Y%m%d").date() - EPOCH_DAY).days
    except ValueError:
        return None


async def attached_days(conn: asyncpg.Connection) -> set[int]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass")
    return {day for day in (_day_of_name(r["relname"]) for r in rows) if day is not None}


async def create_partition(conn: asyncpg.Connection, day: int) -> bool:
    """Create and attach the partition for ``day``; ``False`` if it was already there."""
    name = partition_name(day)
    low, high = _bound(day), _bound(day + 1)
    try:
        async with conn.transaction():
            # Never queue behind a long lock holder for long: the caller retries.
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CREATE_LOCK_KEY)
            exists = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass AND c.relname = $1)", name)
            if exists:
                return False
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
        # Someone attached a partition under another name that covers this day.
        log.warning("a partition already covers this day", extra={"partition": name, "error": str(exc)})
        return False
    log.info("attached partition", extra={"partition": name})
    return True


class PartitionMap:
    """The days that have a partition, cached; missing ones are created on demand."""

    def __init__(self) -> None:
        self.days: set[int] = set()

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self.days = await attached_days(conn)

    async def ensure(self, conn: asyncpg.Connection, days: Iterable[int]) -> None:
        for day in sorted(set(days) - self.days):
            await create_partition(conn, day)
            self.days.add(day)


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

    Runs outside a transaction (``DETACH ... CONCURRENTLY`` must). One process at a
    time: the others skip the round. A detach interrupted half-way is finished with
    ``FINALIZE`` next round, and a detached table left behind by a crash is dropped.
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
            "WHERE i.inhparent = 'events'::regclass")
        for row in rows:
            day = _day_of_name(row["relname"])
            if day is None or day >= horizon:
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
            "WHERE c.relkind = 'r' AND c.relname ~ '^events_p[0-9]{8}$' AND n.nspname = current_schema() "
            "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)")
        for row in leftovers:
            day = _day_of_name(row["relname"])
            if day is not None and day < horizon:
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
    existing = await attached_days(conn)
    for day in wanted:
        if day not in existing:
            await create_partition(conn, day)
    dropped = await apply_retention(conn, retention_days, now)
    if partitions is not None:
        await partitions.refresh(conn)
    return dropped
