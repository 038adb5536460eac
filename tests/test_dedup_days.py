"""event_dedup by event day (sql/014_dedup_days.sql): keys claimed before the migration
are carried over into partitions mirroring the events partitions and still stop their
duplicates, and a batch's lookup reads only the partitions of its events' days."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime

import asyncpg
import psycopg
import pytest
from psycopg import sql

from pgmeter.db.migrate import migrate
from pgmeter.sink import partitions, store
from tests.support import events_sql
from tests.support.services import PostgresServer

DAYS = (date(2025, 3, 1), date(2025, 3, 2), date(2025, 3, 3))


@pytest.fixture
def url(pg_server: PostgresServer) -> Iterator[str]:
    name = f"pgmeter_dd_{uuid.uuid4().hex[:10]}"
    admin = pg_server.url(pg_server.maintenance_db)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def day_number(day: date) -> int:
    return (day - partitions.EPOCH_DAY).days


def record(event_id: str, day: date, hour: int = 6) -> tuple[str, store.EventRecord]:
    micros = int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp()) * 1_000_000
    return (store.dedup_key("default", "mig", event_id),
            ("default", event_id, "mig", "t", "s", micros, None, micros, 1))


def test_claimed_keys_survive_the_migration_and_lookups_prune_to_their_days(url: str) -> None:
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        # The layout before 014: one table of keys, events partitions made by hand.
        events_sql.ensure_partitions(conn, set(DAYS))
        conn.execute("DROP TABLE event_dedup")
        conn.execute("CREATE TABLE event_dedup (key uuid PRIMARY KEY, event_time timestamptz NOT NULL)")
        for n, day in enumerate(DAYS):
            key, rec = record(f"e{n}", day, hour=23)
            conn.execute("INSERT INTO event_dedup VALUES (%s, %s)", (key, datetime(day.year, day.month, day.day, 23,
                                                                                     tzinfo=UTC)))
        # A key of a day no events partition covers any more (its events are gone).
        conn.execute("INSERT INTO event_dedup VALUES (%s, '2024-01-01T00:00:00Z')",
                     (store.dedup_key("default", "mig", "gone"),))
        conn.execute("DELETE FROM schema_migrations WHERE version = 14")
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        twins = conn.execute("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                             "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'event_dedup'::regclass "
                             "ORDER BY 1").fetchall()
        assert twins == [(f"event_dedup_t{day:%Y%m%d}",
                          f"FOR VALUES FROM ({day_number(day)}) TO ({day_number(day) + 1})") for day in DAYS]
        assert sorted(conn.execute("SELECT day FROM event_dedup").fetchall()) == [(day_number(d),) for d in DAYS]

    async def run() -> tuple[store.Outcome, str]:
        conn = await asyncpg.connect(url)
        try:
            await store.prepare(conn)
            # The carried-over keys (another hour of the same day) are duplicates; a new
            # id, and the same id on another day, are new.
            batch = [record(f"e{n}", day, hour=1) for n, day in enumerate(DAYS)]
            batch += [record("new", DAYS[0]), record("e0", DAYS[1])]
            outcome = await store.write(conn, [k for k, _ in batch], [r for _, r in batch], [])
            plan = "\n".join(row[0] for row in await conn.fetch(
                "EXPLAIN SELECT key FROM event_dedup WHERE day = ANY($1::int[]) AND key = ANY($2::uuid[])",
                [day_number(DAYS[1])], [uuid.uuid4()]))
            return outcome, plan
        finally:
            await conn.close()

    outcome, plan = asyncio.run(run())
    assert outcome.stored["default"] == 2 and outcome.duplicates["default"] == 3
    assert "event_dedup_t20250302" in plan
    assert "event_dedup_t20250301" not in plan and "event_dedup_t20250303" not in plan
