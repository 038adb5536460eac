"""Migrations apply exactly once, also when several runners start together."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgmeter.db.migrate import SchemaError, check_schema, known_migrations, migrate
from tests.support.services import PostgresServer


@pytest.fixture
def empty_database(pg_server: PostgresServer) -> Iterator[str]:
    name = f"pgmeter_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.url(pg_server.maintenance_db), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url(pg_server.maintenance_db), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_concurrent_runners_apply_each_migration_once(empty_database: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: migrate(empty_database), range(6)))
    applied_per_runner = [len(result) for result in results]
    known = known_migrations()
    # Exactly one runner did the work; the others found nothing left.
    assert sorted(applied_per_runner) == [0] * 5 + [len(known)]
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [m.version for m in known]
        assert conn.execute("SELECT to_regclass('events') IS NOT NULL").fetchone() == (True,)
    assert migrate(empty_database) == []
    check_schema(empty_database)


def test_services_refuse_unmigrated_schema(empty_database: str) -> None:
    with pytest.raises(SchemaError, match="not migrated"):
        check_schema(empty_database)


def test_services_refuse_newer_schema(empty_database: str) -> None:
    migrate(empty_database)
    newest = known_migrations()[-1].version
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')",
                     (newest + 1,))
    with pytest.raises(SchemaError, match="newer than this pgmeter"):
        check_schema(empty_database)
    with pytest.raises(SchemaError, match="newer than this pgmeter"):
        migrate(empty_database)


def test_services_refuse_partially_migrated_schema(empty_database: str) -> None:
    migrate(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 1")
    # With one known migration, losing it means "not migrated" at all.
    expected = r"missing migrations \[1\]" if len(known_migrations()) > 1 else "not migrated"
    with pytest.raises(SchemaError, match=expected):
        check_schema(empty_database)
