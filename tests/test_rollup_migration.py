"""Migration 006 carries existing rollups over to hash keys, in place.

A database with rollups in the previous layout (primary key on the texts, a
bucket index, no failure columns) is migrated: every row stays, each table ends
up with a unique index on the md5 of its texts (and bucket) and its bucket index,
and the meters go on merging, long values included, with answers equal to the
oracle's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from pgmeter.db.migrate import check_schema, migrate
from pgmeter.db.pool import create_pool
from pgmeter.meters import store
from pgmeter.meters.model import MeterSpec
from tests.support import events_sql, oracle
from tests.support.events_sql import Event
from tests.support.meter_env import refresh
from tests.support.services import PostgresServer

T0 = datetime(2024, 6, 1, tzinfo=UTC)
METERS = {
    "tokens": oracle.MeterDef("tokens", "SUM", "call", "$.n", {"k": "$.k", "r": "$.r"}),
    "users": oracle.MeterDef("users", "UNIQUE_COUNT", "call", "$.u", {"k": "$.k"}),
    "calls": oracle.MeterDef("calls", "COUNT", "call"),
}


@pytest.fixture
def url(pg_server: PostgresServer) -> Iterator[str]:
    name = f"pgmeter_m7_{uuid.uuid4().hex[:10]}"
    admin = pg_server.url(pg_server.maintenance_db)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def events(count: int, offset: int = 0) -> list[Event]:
    return [Event(f"s{i % 5}", T0 + timedelta(minutes=7 * i + offset, seconds=i % 60),
                  {"n": i % 9, "k": ["a", "b", "c"][i % 3], "r": ["eu", "us"][i % 2], "u": f"user{i % 11}"},
                  type="call") for i in range(count)]


def rollup_tables(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """(table, number of group columns) of every rollup table."""
    rows = conn.execute(
        "SELECT c.relname, (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname ~ '^g[0-9]+$') "
        "FROM pg_class c WHERE c.relnamespace = 'rollup'::regnamespace AND c.relkind = 'r' ORDER BY 1").fetchall()
    return [(name, int(n)) for name, n in rows]


def to_previous_layout(conn: psycopg.Connection) -> None:
    """The rollups as sql/templates built them before 006, and 006 not applied
    (nor 010: no hourly levels)."""
    for table, _ in rollup_tables(conn):
        if table.startswith(("h1", "uh1")):
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("rollup", table)))
    conn.execute("UPDATE meter_rollups SET hourly = false")
    for table, n in rollup_tables(conn):
        ident = sql.Identifier("rollup", table)
        for (index,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
                                     (f"rollup.{table}",)).fetchall():
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
        key = ["subject", "bucket", *(f"g{i + 1}" for i in range(n))]
        if table.startswith("u"):
            key.append("value")
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
            ident, sql.SQL(", ").join(map(sql.Identifier, key))))
        conn.execute(sql.SQL("CREATE INDEX ON {} (bucket)").format(ident))
    conn.execute("ALTER TABLE meter_rollups DROP COLUMN failures, DROP COLUMN failure_reason, "
                 "DROP COLUMN failing_since, DROP COLUMN next_attempt")
    conn.execute("DELETE FROM schema_migrations WHERE version = 6")


def contents(conn: psycopg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {table: sorted(conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("rollup", table))).fetchall())
            for table, _ in rollup_tables(conn)}


def test_existing_rollups_are_carried_over_to_hash_keys(url: str) -> None:
    migrate(url)

    async def create_meters() -> None:
        pool = await create_pool(url, size=1)
        async with pool.acquire() as conn:
            for meter in METERS.values():
                await store.create(conn, "default", MeterSpec.model_validate({
                    "slug": meter.slug, "aggregation": meter.aggregation, "eventType": meter.event_type,
                    **({"valueProperty": meter.value_property} if meter.value_property else {}),
                    "groupBy": meter.group_by}))
        await pool.close()

    asyncio.run(create_meters())
    first = events(300)
    events_sql.insert_committed(url, first)
    assert refresh(url) == 300 * len(METERS)
    with psycopg.connect(url, autocommit=True) as conn:
        to_previous_layout(conn)
        before = contents(conn)
        tables = rollup_tables(conn)
    assert len(tables) == 5 + 8 + 3  # tokens and users have subject levels, users has sets

    assert [m.version for m in migrate(url)] == [6]
    check_schema(url)
    with psycopg.connect(url) as conn:
        assert contents(conn) == before
        for table, n in tables:
            indexes = conn.execute(
                "SELECT indisunique, indisprimary, pg_get_indexdef(indexrelid) FROM pg_index "
                "WHERE indrelid = %s::regclass", (f"rollup.{table}",)).fetchall()
            assert len(indexes) == 2, (table, indexes)
            (unique, primary, definition), (_, _, by_bucket) = sorted(indexes, reverse=True)
            assert unique and not primary
            texts = 1 + (0 if table.startswith(("q15s", "d1s")) else n) + (1 if table.startswith("u") else 0)
            assert definition.count("md5(") == texts, definition
            assert "USING btree (((md5(subject))::uuid), bucket" in definition, definition
            assert by_bucket.endswith("USING btree (bucket)"), by_bucket

    # The migrated meters merge new events (one with a 4 KB group value) exactly.
    late = events(120, offset=3)
    late[5].data["k"] = "x" * 4096  # type: ignore[index]
    events_sql.insert_committed(url, late)
    assert refresh(url) == 120 * len(METERS)
    stored = [oracle.Stored(e.seq, e.type, e.subject, e.time, e.data) for e in first + late]  # type: ignore[arg-type]
    with psycopg.connect(url) as conn:  # the m1 totals per subject and k equal the oracle's
        meter_ids = dict(conn.execute("SELECT slug, id FROM meters").fetchall())
        rows = conn.execute(sql.SQL("SELECT subject, g1, sum(s_sum) FROM {} GROUP BY 1, 2").format(
            sql.Identifier("rollup", f"m1_{meter_ids['tokens'].lower()}_v1"))).fetchall()
    want = oracle.answer(METERS["tokens"], stored, oracle.Query(group_by=("subject", "k")))
    assert sorted((s, k, v) for s, k, v in rows if v is not None) == sorted(
        (w.subject, dict(w.group_by)["k"], w.value) for w in want)
