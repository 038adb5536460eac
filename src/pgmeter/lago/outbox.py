"""The Lago outbox and sync state in Postgres (tables from sql/*_lago.sql)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import asyncpg

from pgmeter.lago.plan import Item, Sent
from pgmeter.meters.store import Meter


async def lock_state(conn: asyncpg.Connection, meter_key: str, code: str) -> tuple[datetime, int] | None:
    row = await conn.fetchrow(
        "SELECT closed_to, seen_seq FROM lago_sync_state WHERE meter_key = $1 AND code = $2 FOR UPDATE",
        meter_key, code)
    return (row["closed_to"], row["seen_seq"]) if row else None


async def save_state(conn: asyncpg.Connection, meter_key: str, code: str, closed_to: datetime, seen_seq: int) -> None:
    await conn.execute(
        """
        INSERT INTO lago_sync_state (meter_key, code, closed_to, seen_seq) VALUES ($1, $2, $3, $4)
        ON CONFLICT (meter_key, code) DO UPDATE
           SET closed_to = excluded.closed_to, seen_seq = excluded.seen_seq, updated_at = now()
        """,
        meter_key, code, closed_to, seen_seq)


async def first_event_time(conn: asyncpg.Connection, meter: Meter) -> datetime | None:
    return await conn.fetchval(
        "SELECT min(time) FROM events WHERE namespace = $1 AND type = $2 AND time >= coalesce($3::timestamptz, '-infinity')",
        meter.namespace, meter.event_type, meter.event_from)


async def touched_hours(conn: asyncpg.Connection, meter: Meter, after_seq: int, upto_seq: int,
                        before: datetime) -> list[tuple[str, datetime]]:
    """(subject, UTC hour) of events that arrived in (after_seq, upto_seq] with times
    before ``before``: the windows late events reached. Hours, not windows, because a
    window's bounds depend on the subject's customer time zone (a +05:30 hour spans two
    UTC hours, so each UTC hour maps to at most two windows)."""
    if upto_seq <= after_seq:
        return []
    rows = await conn.fetch(
        """
        SELECT DISTINCT subject, date_trunc('hour', time, 'UTC') AS hour
          FROM events
         WHERE seq > $1 AND seq <= $2 AND namespace = $3 AND type = $4 AND time < $5
           AND time >= coalesce($6::timestamptz, '-infinity')
        """,
        after_seq, upto_seq, meter.namespace, meter.event_type, before, meter.event_from)
    return [(row["subject"], row["hour"]) for row in rows]


PieceKey = tuple[str, datetime, str]  # subject, window start, Lago subscription record


async def histories(conn: asyncpg.Connection, meter_key: str, code: str,
                    windows: list[tuple[str, datetime]]) -> dict[PieceKey, list[Sent]]:
    """Every outbox row of the given (subject, window start)s, by piece."""
    if not windows:
        return {}
    rows = await conn.fetch(
        """
        SELECT o.subject, o.window_start, o.lago_subscription_id, o.revision, o.value, o.window_value,
               o.status, o.external_subscription_id, o.timestamp, o.window_end
          FROM lago_outbox o
          JOIN (SELECT DISTINCT * FROM unnest($3::text[], $4::timestamptz[])) AS k(subject, window_start)
            ON o.subject = k.subject AND o.window_start = k.window_start
         WHERE o.meter_key = $1 AND o.code = $2
        """,
        meter_key, code, [k[0] for k in windows], [k[1] for k in windows])
    found: dict[PieceKey, list[Sent]] = defaultdict(list)
    for row in rows:
        found[(row["subject"], row["window_start"], row["lago_subscription_id"])].append(
            Sent(row["revision"], row["value"], row["window_value"], row["status"],
                 row["external_subscription_id"], row["timestamp"], row["window_end"]))
    return found


async def add(conn: asyncpg.Connection, items: list[Item]) -> None:
    if not items:
        return
    await conn.executemany(
        """
        INSERT INTO lago_outbox (transaction_id, meter_key, code, subject, external_subscription_id,
                                 lago_subscription_id, window_start, window_end, revision, part, value,
                                 window_value, timestamp, property, status, last_error)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
        ON CONFLICT (transaction_id) DO UPDATE
           SET value = excluded.value, window_value = excluded.window_value, last_error = excluded.last_error,
               created_at = now()
         WHERE lago_outbox.status = 'refused' AND excluded.status = 'refused'
        """,
        [(i.transaction_id, i.meter_key, i.code, i.subject, i.external_subscription_id, i.lago_subscription_id,
          i.window_start, i.window_end, i.revision, i.part, i.value, i.window_value, i.timestamp, i.property,
          i.status, i.reason) for i in items])


async def pending(conn: asyncpg.Connection) -> list[Item]:
    rows = await conn.fetch(
        """
        SELECT transaction_id, meter_key, code, subject, external_subscription_id, lago_subscription_id,
               window_start, window_end, revision, part, value, window_value, timestamp, property
          FROM lago_outbox WHERE status = 'pending' ORDER BY created_at, transaction_id
        """)
    return [Item(**dict(row)) for row in rows]


async def mark_sent(conn: asyncpg.Connection, transaction_ids: list[str]) -> None:
    if transaction_ids:
        await conn.execute(
            "UPDATE lago_outbox SET status = 'sent', sent_at = now(), attempts = attempts + 1 "
            "WHERE transaction_id = ANY($1::text[])", transaction_ids)


async def mark_attempt(conn: asyncpg.Connection, transaction_ids: list[str], error: str) -> None:
    await conn.execute(
        "UPDATE lago_outbox SET attempts = attempts + 1, last_error = $2 WHERE transaction_id = ANY($1::text[])",
        transaction_ids, error)


async def mark_failed(conn: asyncpg.Connection, errors: dict[str, str]) -> None:
    if errors:
        await conn.executemany(
            "UPDATE lago_outbox SET status = 'failed', attempts = attempts + 1, last_error = $2 "
            "WHERE transaction_id = $1", list(errors.items()))


async def status_counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM lago_outbox GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def problem_items(conn: asyncpg.Connection, status: str, limit: int = 100) -> list[asyncpg.Record]:
    """The newest rows Lago rejected ('failed') or pgmeter would not send ('refused')."""
    return await conn.fetch(
        "SELECT transaction_id, code, subject, external_subscription_id, window_start, value, attempts, last_error "
        "FROM lago_outbox WHERE status = $1 ORDER BY created_at DESC, transaction_id LIMIT $2", status, limit)


async def recent_subscriptions(conn: asyncpg.Connection, since: datetime) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT external_subscription_id FROM lago_outbox WHERE window_start >= $1 "
        "AND external_subscription_id <> ''", since)
    return [row["external_subscription_id"] for row in rows]


async def refused_windows(conn: asyncpg.Connection, meter_key: str, code: str,
                          since: datetime) -> list[asyncpg.Record]:
    """(subject, external_subscription_id, window_start) of usage refused for want of an
    active subscription since ``since``: re-read when the subscription appears or the
    subject's mapping changes."""
    return await conn.fetch(
        "SELECT DISTINCT subject, external_subscription_id, window_start FROM lago_outbox "
        "WHERE meter_key = $1 AND code = $2 AND status = 'refused' AND lago_subscription_id = '' "
        "AND window_start >= $3", meter_key, code, since)


async def save_mapping_status(conn: asyncpg.Connection, meter_key: str, code: str, refused: str | None) -> None:
    await conn.execute(
        """
        INSERT INTO lago_mapping_status (meter_key, code, refused) VALUES ($1, $2, $3)
        ON CONFLICT (meter_key, code) DO UPDATE SET refused = excluded.refused, checked_at = now()
        """,
        meter_key, code, refused)


async def forget_other_mappings(conn: asyncpg.Connection, configured: list[tuple[str, str]]) -> None:
    """Drop the check results of mappings no longer configured (a removed mapping is
    not refused any more)."""
    await conn.execute(
        "DELETE FROM lago_mapping_status WHERE (meter_key, code) NOT IN "
        "(SELECT * FROM unnest($1::text[], $2::text[]))",
        [key for key, _ in configured], [code for _, code in configured])


async def refused_mappings(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT meter_key, code, refused, checked_at FROM lago_mapping_status WHERE refused IS NOT NULL "
        "ORDER BY meter_key, code")
