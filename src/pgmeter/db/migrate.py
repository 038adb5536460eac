"""Numbered plain-SQL migrations from ``sql/``, applied in order, once.

Each file ``NNN_name.sql`` runs in its own transaction and is recorded in
``schema_migrations``. A session advisory lock serialises runners, so replicas
that start together apply every file exactly once; the losers wait, then find
nothing left to do. Services call :func:`check_schema` at start and refuse to run
on a schema that is behind or ahead of the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import psycopg

# Arbitrary constant: the advisory lock key all migration runners agree on.
MIGRATION_LOCK_KEY = 7_283_110_001
_FILE_PATTERN = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class SchemaError(Exception):
    """The database schema does not match what this build of pgmeter expects."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def known_migrations() -> list[Migration]:
    """The migrations shipped with this build, in order."""
    found = []
    for entry in resources.files("pgmeter.sql").iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are handed out per piece of work, so a branch may skip some (another
    # branch's); what must hold is that no number is used twice.
    if len(set(versions)) != len(versions):
        raise SchemaError(f"migration numbers must be unique; found {versions}")
    return found


def _ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    int PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def applied_versions(conn: psycopg.Connection) -> list[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def migrate(dsn: str) -> list[Migration]:
    """Apply every pending migration; return the ones this call applied."""
    applied: list[Migration] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            with conn.transaction():
                _ensure_table(conn)
            done = set(applied_versions(conn))
            known = known_migrations()
            newest_known = known[-1].version if known else 0
            if done and max(done) > newest_known:
                raise SchemaError(
                    f"database schema is at version {max(done)}, newer than this pgmeter "
                    f"knows ({newest_known}); upgrade pgmeter instead of migrating back"
                )
            for migration in known:
                if migration.version in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                applied.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied


def check_schema(dsn: str) -> None:
    """Raise :class:`SchemaError` unless the database is exactly at this build's schema."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = applied_versions(conn)
    known = [m.version for m in known_migrations()]
    if not done:
        raise SchemaError("database is not migrated; run `pgmeter migrate` first")
    if max(done) > max(known):
        raise SchemaError(
            f"database schema is at version {max(done)}, newer than this pgmeter knows "
            f"({max(known)}); run a newer pgmeter"
        )
    missing = sorted(set(known) - set(done))
    if missing:
        raise SchemaError(
            f"database schema is missing migrations {missing}; run `pgmeter migrate` first"
        )
