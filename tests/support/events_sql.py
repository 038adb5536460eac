"""Events written straight into ``events`` with SQL, bypassing ingest.

For tests that are about the refresher and the query engine rather than the
ingest path: they need exact control over what is committed when (several
transactions, a transaction left open, late events). Rows get their seq from the
table default (nextval on events_seq), exactly as the sink's do. Daily partitions
are created here as needed (the sink creates its own on the ingest path). Like the
sink, each insert bumps the query cache's epoch for its (namespace, type), in the
same transaction; the sink does it only for late events, this always does, which
only makes cached answers expire sooner.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

NAMESPACE = "default"


@dataclass
class Event:
    subject: str
    time: datetime
    data: dict[str, Any] | None
    type: str = "request"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = "tests"
    seq: int | None = None  # filled in once stored


def partition_name(day: date) -> str:
    return f"events_t{day:%Y%m%d}"


def ensure_partitions(conn: psycopg.Connection, days: set[date]) -> None:
    for day in sorted(days):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF events FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(partition_name(day)), sql.Literal(start), sql.Literal(start + timedelta(days=1))))


def insert(conn: psycopg.Connection, events: list[Event], *, namespace: str = NAMESPACE,
           bump_cache: bool = True) -> None:
    """Insert in list order (so seq follows it) in the caller's transaction; sets ``seq``.

    Duplicates of (source, id) are the caller's business: this writes what it is given.
    ``bump_cache=False`` skips the epoch bump, whose row lock would serialise
    concurrent writers (tests of out-of-order commits that read no cached answers).
    """
    ensure_partitions(conn, {e.time.astimezone(UTC).date() for e in events})
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO events (namespace, id, source, type, subject, time, data, ingested_at, batch_seq) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, now(), 0) RETURNING seq",
            [(namespace, e.id, e.source, e.type, e.subject, e.time,
              json.dumps(e.data) if e.data is not None else None) for e in events],
            returning=True)
        for event in events:
            row = cur.fetchone()
            assert row is not None
            event.seq = row[0]
            cur.nextset()
        for event_type in sorted({e.type for e in events}) if bump_cache else ():
            cur.execute("INSERT INTO cache_epochs (namespace, event_type, epoch) VALUES (%s, %s, 1) "
                        "ON CONFLICT (namespace, event_type) DO UPDATE SET epoch = cache_epochs.epoch + 1",
                        (namespace, event_type))


def insert_committed(url: str, events: list[Event], *, batch: int = 500) -> None:
    """Insert in transactions of ``batch`` events."""
    with psycopg.connect(url) as conn:
        for start in range(0, len(events), batch):
            with conn.transaction():
                insert(conn, events[start:start + batch])
