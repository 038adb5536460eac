"""SQL source for SQLite files, through Python's DB-API module (``sqlite3``).

The same contract as the Postgres source (:mod:`pgmeter.collect.sources.sql`): rows in
``(cursor, key)`` order after the last position, the position committed with the
events, ids derived from the row's ``key`` (the same text as Postgres's ``::text``
for integers and text, so a table moved between the two keeps its ids). Chosen by the
URL, spelt as SQLAlchemy does: ``sqlite:////absolute/path.db``, ``sqlite:///relative.db``.

SQLite specifics: the file is opened read-only (``mode=ro``: the collector never
writes to a producer's database); the position is kept with its SQLite types (an
integer stays an integer, so it compares as one); ``settle`` is refused, as SQLite
has no clock type to compare with. Blobs reach the mapping as hex text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any
from urllib.parse import quote

from pgmeter.collect.ids import event_id
from pgmeter.collect.pipeline import Pipeline
from pgmeter.collect.sources.sql import state_key, table_key_cursor
from pgmeter.config import CollectSourceConfig, ConfigError

log = logging.getLogger("pgmeter.collect.sql")


def is_sqlite(url: str | None) -> bool:
    return bool(url and url.startswith("sqlite:"))


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class SqliteSource:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        self.table, self.key, self.cursor = table_key_cursor(pipeline, config)
        if config.settle:
            raise ConfigError(f"pipeline {pipeline.name}: settle is for Postgres timestamps, not SQLite")
        self.pipeline = pipeline
        self.config = config
        self.state_key = state_key(self.table, self.key, self.cursor)
        # SQLAlchemy's spelling, the one people know: sqlite:///relative.db, sqlite:////abs.db.
        path = (config.url or "").removeprefix("sqlite:")
        path = path[3:] if path.startswith("///") else path
        self.uri = f"file:{quote(path)}?mode=ro"
        table = ".".join(_quote(part) for part in self.table.split("."))
        cursor, key = _quote(self.cursor), _quote(self.key)
        self._first = f"SELECT * FROM {table} ORDER BY {cursor}, {key} LIMIT ?"
        self._next = f"SELECT * FROM {table} WHERE ({cursor}, {key}) > (?, ?) ORDER BY {cursor}, {key} LIMIT ?"

    async def run(self) -> None:
        interval = self.config.interval.total_seconds()
        while True:
            try:
                read = await self.read_once()
            except sqlite3.Error as exc:
                log.warning("sql source cannot read %s; retrying", self.uri,
                            extra={"pipeline": self.pipeline.name, "error": str(exc)})
                read = 0
            if read < self.config.batch:
                await asyncio.sleep(interval)

    async def read_once(self) -> int:
        """Read the next batch into the buffer; how many rows were read."""
        saved = await asyncio.to_thread(self.pipeline.buffer.get_state, self.state_key)
        rows = await asyncio.to_thread(self._select, None if saved is None else json.loads(saved))
        if not rows:
            return 0
        records = [(row, event_id(self.pipeline.event_source, "sql", self.table, str(row[self.key]))) for row in rows]
        mapped = self.pipeline.map(records)
        position = json.dumps([rows[-1][self.cursor], rows[-1][self.key]])
        await self.pipeline.offer(mapped, {self.state_key: position}, block=True)
        return len(rows)

    def _select(self, position: list[Any] | None) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.uri, uri=True, timeout=5)
        try:
            if position is None:
                result = db.execute(self._first, (self.config.batch,))
            else:
                result = db.execute(self._next, (*position, self.config.batch))
            names = [column[0] for column in result.description]
            return [{name: value.hex() if isinstance(value, bytes) else value
                     for name, value in zip(names, row, strict=True)} for row in result.fetchall()]
        finally:
            db.close()
