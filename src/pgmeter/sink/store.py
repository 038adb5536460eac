"""One sink transaction: claim dedup keys, COPY the new events, keep dead letters.

Exactly-once rests on three things happening in one transaction: claiming each
event's key in ``event_dedup``, writing the events whose claim succeeded, and
recording the dead letters of the same messages. The JetStream acks are sent only
after COMMIT, so a crash anywhere means redelivery, and redelivery finds the keys
claimed and writes nothing twice. The first copy of an event wins: by stream order
inside a batch (repeats are dropped here before they reach Postgres) and by commit
order across batches.

Claiming never makes Postgres raise an error on the way, so a duplicate costs no
aborted statement, no savepoint rollback and no ERROR line in the server log: the
batch's keys are first looked up (``key = ANY($1)``, one index probe each, read
only), the keys found are dropped from the batch as duplicates, and the rest are
COPYed straight into ``event_dedup`` - the cheapest possible unique insert (about
twice the rate of ``INSERT ... ON CONFLICT``, measured). A batch with duplicates
therefore costs what a batch without any costs. Only a key another sink claims
between the lookup and the COPY (two sinks handling copies of one event at the same
moment) makes that COPY fail; its savepoint is rolled back and the batch takes the
general path: keys COPYed into a temporary stage (``ON COMMIT DELETE ROWS``), then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING key``, whose result says
which events are new. Events always go into the
partitioned parent ``events`` (never into a partition directly), so the writer
holds ROW EXCLUSIVE on it, which the refresher's watermark relies on.

Timestamps travel as integers: the sink's connection encodes ``timestamptz`` from
microseconds since the Unix epoch (:func:`prepare`), which saves building and
encoding a datetime per event.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

EVENT_COLUMNS = ("namespace", "id", "source", "type", "subject", "time", "data", "ingested_at", "batch_seq")
STAGE = "pgmeter_sink_stage"
# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_OFFSET = 946_684_800_000_000

# (namespace, id, source, type, subject, time µs, data JSON text, ingested_at µs, batch_seq): a row of
# ``events`` as the sink's connection encodes it.
EventRecord = tuple[str, str, str, str, str, int, "str | None", int, int]


def dedup_key(namespace: str, source: str, event_id: str) -> str:
    """The ``event_dedup`` key as 32 hex digits: md5 of namespace, source and id joined by NUL.

    The one definition of the key, with :data:`DEDUP_KEY_SQL` (the same in SQL) beside
    it. Raises ``UnicodeEncodeError`` for text with unpaired surrogates.
    """
    return hashlib.md5(f"{namespace}\x00{source}\x00{event_id}".encode()).hexdigest()


# The dedup key of a stored ``events`` row, in SQL: equal to :func:`dedup_key`. Text
# cannot hold chr(0), so the fields are joined as bytea.
DEDUP_KEY_SQL = ("md5(convert_to(namespace, 'UTF8') || '\\x00'::bytea || convert_to(source, 'UTF8') "
                 "|| '\\x00'::bytea || convert_to(id, 'UTF8'))::uuid")


@dataclass
class DeadLetter:
    stream_seq: int
    item: int  # index of the event in its message, -1 for the whole message
    subject: str
    reason: str
    payload: bytes


@dataclass
class Outcome:
    stored: Counter[str] = field(default_factory=Counter)  # namespace -> events stored for the first time
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0

    def add(self, other: Outcome) -> None:
        self.stored.update(other.stored)
        self.duplicates.update(other.duplicates)
        self.dead_letters += other.dead_letters


def clean_text(text: str) -> str:
    """Text Postgres accepts: no NUL, no unpaired surrogates."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _encode_timestamp(micros: int) -> tuple[int]:
    return (micros - PG_EPOCH_OFFSET,)


def _decode_timestamp(value: tuple[int]) -> int:
    return value[0] + PG_EPOCH_OFFSET


async def prepare(conn: asyncpg.Connection) -> None:
    """Set up a sink connection: integer timestamps and the conflict path's temporary stage."""
    await conn.set_type_codec("timestamptz", schema="pg_catalog", encoder=_encode_timestamp,
                              decoder=_decode_timestamp, format="tuple")
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (ord int NOT NULL, key uuid NOT NULL, "
        "event_time timestamptz NOT NULL) ON COMMIT DELETE ROWS")


async def _claim(conn: asyncpg.Connection, keys: list[str], records: list[Any]) -> list[int] | None:
    """Claim every new key; ``None`` if all were new, else the positions of the new ones."""
    found = await conn.fetch(
        "SELECT replace(key::text, '-', '') FROM event_dedup WHERE key = ANY($1::uuid[])", keys)
    positions: list[int] | None = None
    if found:
        taken = {row[0] for row in found}
        positions = [position for position, key in enumerate(keys) if key not in taken]
        keys = [keys[position] for position in positions]
        records = [records[position] for position in positions]
    if keys:
        try:
            async with conn.transaction():  # a savepoint: a concurrent claim only undoes this COPY
                await conn.copy_records_to_table(
                    "event_dedup", records=zip(keys, [record[5] for record in records], strict=True),
                    columns=("key", "event_time"))
            return positions
        except asyncpg.UniqueViolationError:
            pass
    else:
        return positions
    # Another sink claimed one of these keys since the lookup: the general path.
    await conn.copy_records_to_table(
        STAGE, records=[(position, key, record[5]) for position, (key, record)
                        in enumerate(zip(keys, records, strict=True))],
        columns=("ord", "key", "event_time"))
    claimed = await conn.fetch(
        f"INSERT INTO event_dedup (key, event_time) SELECT key, event_time FROM {STAGE} ORDER BY ord "
        "ON CONFLICT (key) DO NOTHING RETURNING replace(key::text, '-', '')")
    fresh = {row[0] for row in claimed}
    subset = [position for position, key in enumerate(keys) if key in fresh]
    return subset if positions is None else [positions[position] for position in subset]


async def write(conn: asyncpg.Connection, keys: list[str], records: list[Any], dead: list[DeadLetter], *,
                late_margin: timedelta = timedelta(minutes=30)) -> Outcome:
    """Store the events (``keys[i]`` is the key of ``records[i]``, in stream order) and ``dead``,
    in one transaction. Events older than ``late_margin`` bump their cache epoch in it."""
    outcome = Outcome()
    if len(set(keys)) != len(keys):
        # Repeats within the batch: the first by stream order wins.
        seen: set[str] = set()
        unique_keys, unique_records = [], []
        for key, record in zip(keys, records, strict=False):
            if key in seen:
                outcome.duplicates[record[0]] += 1
            else:
                seen.add(key)
                unique_keys.append(key)
                unique_records.append(record)
        keys, records = unique_keys, unique_records
    fresh = records
    async with conn.transaction():
        if keys:
            positions = await _claim(conn, keys, records)
            if positions is not None:
                fresh = [records[position] for position in positions]
            if fresh:
                await conn.copy_records_to_table("events", records=fresh, columns=EVENT_COLUMNS)
                await _bump_cache_epochs(conn, fresh, late_margin)
        if dead:
            await conn.executemany(
                "INSERT INTO dead_letters (stream_seq, item, subject, reason, payload) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (stream_seq, item) DO NOTHING",
                [(d.stream_seq, d.item, clean_text(d.subject), clean_text(d.reason), d.payload) for d in dead])
    outcome.stored.update(record[0] for record in fresh)
    if fresh is not records:
        fresh_ids = {id(record) for record in fresh}
        outcome.duplicates.update(record[0] for record in records if id(record) not in fresh_ids)
    outcome.dead_letters = len(dead)
    return outcome


async def _bump_cache_epochs(conn: asyncpg.Connection, fresh: list[Any], late_margin: timedelta) -> None:
    """Invalidate cached answers that a late event changes (see pgmeter.query.cache).

    Per (namespace, type), the oldest new event is compared with the database clock
    at this moment, inside the transaction that commits the events; rows are locked
    in key order so concurrent sinks cannot deadlock.
    """
    oldest: dict[tuple[str, str], int] = {}
    for record in fresh:
        key = (record[0], record[3])
        if key not in oldest or record[5] < oldest[key]:
            oldest[key] = record[5]
    await conn.execute(
        """
        INSERT INTO cache_epochs (namespace, event_type, epoch)
        SELECT namespace, event_type, 1
          FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS o(namespace, event_type, oldest)
         WHERE oldest < clock_timestamp() - $4::interval
         ORDER BY namespace, event_type
        ON CONFLICT (namespace, event_type) DO UPDATE SET epoch = cache_epochs.epoch + 1
        """,
        [k[0] for k in oldest], [k[1] for k in oldest], list(oldest.values()), late_margin)


# SQLSTATE classes that mean "this data cannot be stored", whenever it is retried:
# 22 data exception (bad text, JSON, number out of range), 23 integrity constraint
# violation, 54 program limit exceeded (e.g. an index row over the btree limit).
# Everything else (08 connection, 53 resources, 57 operator intervention, 58 system,
# 40 rollback, timeouts, client errors) is about the server or the link: retried.
_POISON_CLASSES = frozenset({"22", "23", "54"})


def is_poison(exc: BaseException) -> bool:
    """A failure caused by the data (retrying the same batch fails the same way)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state[:2] not in _POISON_CLASSES or is_missing_partition(exc):
            return False
        # A dedup key claimed concurrently: the retry finds it claimed and moves on.
        return not (isinstance(exc, asyncpg.UniqueViolationError)
                    and getattr(exc, "table_name", None) == "event_dedup")
    # Raised while encoding a record, before Postgres saw it.
    return isinstance(exc, (UnicodeError, ValueError, TypeError, OverflowError))


def is_missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition of relation" in str(exc)
