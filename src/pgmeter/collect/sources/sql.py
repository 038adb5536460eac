"""SQL source: a Postgres table read incrementally, each row once.

Rows are read in ``(cursor, key)`` order after the last position, and that position is
committed to the buffer *in the same transaction* as the events of the rows read up
to it: a crash before the commit re-reads the rows (and nothing was queued), a crash
after it resumes past them. Nothing is read twice or skipped across restarts - unlike
OpenMeter's example, which re-reads the last 30 seconds by time on every run.

The event id is derived from the row's ``key`` (:mod:`pgmeter.collect.ids`), so two
collectors reading the same table deliver the same ids and pgmeter counts each row
once: replicas need no leader election.

Why ``(cursor, key)`` and not the cursor alone: a timestamp cursor has ties, and rows
tied with the last one read would be skipped. ``settle`` covers the other gap of any
cursor read while writers are running - a row whose transaction commits after a later
cursor value was read: with ``settle: 30s`` only rows whose (timestamp) cursor is at
least that old are read. A bigserial cursor with concurrent writers has the same gap
and no such remedy; use a commit-time timestamp with ``settle`` there.

Values from the configuration (table, columns) are identifiers, quoted; positions are
bound as parameters (text, cast by Postgres to the column's type).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import psycopg
from psycopg import sql

from pgmeter.collect.ids import event_id
from pgmeter.collect.pipeline import Pipeline
from pgmeter.config import CollectSourceConfig, ConfigError

log = logging.getLogger("pgmeter.collect.sql")


def table_key_cursor(pipeline: Pipeline, config: CollectSourceConfig) -> tuple[str, str, str]:
    """An sql source's (table, key, cursor): the cursor defaults to the key, and the
    other way round. ConfigError when one is missing."""
    if not (config.url and config.table and (config.key or config.cursor)):
        raise ConfigError(f"pipeline {pipeline.name}: an sql source needs url, table and key (or cursor)")
    key = config.key or config.cursor or ""
    return config.table, key, config.cursor or key


def state_key(table: str, key: str, cursor: str) -> str:
    """Where an sql source's position is kept in the buffer."""
    return f"sql:{table}:{cursor}:{key}"


class SqlSource:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        self.table, self.key, self.cursor = table_key_cursor(pipeline, config)
        self.pipeline = pipeline
        self.config = config
        self.url = config.url or ""
        self.state_key = state_key(self.table, self.key, self.cursor)
        table = sql.Identifier(*self.table.split("."))
        cursor, key = sql.Identifier(self.cursor), sql.Identifier(self.key)
        where: list[sql.Composable] = [sql.SQL("({}, {}) > (%(cursor)s, %(key)s)").format(cursor, key)]
        if config.settle:
            where.append(sql.SQL("{} <= now() - %(settle)s::interval").format(cursor))
        self._first = self._query(table, cursor, key, where[1:])
        self._next = self._query(table, cursor, key, where)

    @staticmethod
    def _query(table: sql.Identifier, cursor: sql.Identifier, key: sql.Identifier,
               where: list[sql.Composable]) -> sql.Composed:
        condition = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        return sql.SQL("SELECT to_jsonb(t), t.{cursor}::text, t.{key}::text FROM {table} AS t{where} "
                       "ORDER BY t.{cursor}, t.{key} LIMIT %(limit)s").format(
            cursor=cursor, key=key, table=table, where=condition)

    def position(self) -> tuple[str, str] | None:
        saved = self.pipeline.buffer.get_state(self.state_key)
        if saved is None:
            return None
        cursor, key = json.loads(saved)
        return str(cursor), str(key)

    async def run(self) -> None:
        interval = self.config.interval.total_seconds()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    while True:
                        read = await self.read_once(conn)
                        if read < self.config.batch:
                            await asyncio.sleep(interval)
            except psycopg.Error as exc:
                log.warning("sql source cannot read; retrying", extra={"pipeline": self.pipeline.name,
                                                                        "error": str(exc).strip()})
                await asyncio.sleep(interval)

    async def read_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Read the next batch into the buffer; how many rows were read."""
        position = await asyncio.to_thread(self.position)  # the buffer's lock: off the event loop
        params: dict[str, Any] = {"limit": self.config.batch}
        if self.config.settle:
            params["settle"] = f"{self.config.settle.total_seconds()} seconds"
        if position is None:
            rows = await (await conn.execute(self._first, params)).fetchall()
        else:
            params["cursor"], params["key"] = position
            rows = await (await conn.execute(self._next, params)).fetchall()
        if not rows:
            return 0
        records = [(row[0], event_id(self.pipeline.event_source, "sql", self.table, row[2])) for row in rows]
        mapped = self.pipeline.map(records)
        last = rows[-1]
        await self.pipeline.offer(mapped, {self.state_key: json.dumps([last[1], last[2]])}, block=True)
        return len(rows)
