"""SQL source on a SQLite file (Python's DB-API sqlite3): incremental, persisted cursor,
read-only, replicas counted once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pgmeter.collect.ids import event_id
from pgmeter.config import ConfigError
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for

MAPPING = '{type: "api.call", subject: .customer, time: .at, data: {tokens: .tokens, raw: .raw}}'


def insert(db: Path, first: int, count: int, customer: str | None = "c-1") -> None:
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO usage_rows VALUES (?, ?, ?, ?, ?)",
                         [(i, customer, i, f"2026-11-27T10:00:{i % 60:02d}Z", bytes([i % 256]))
                          for i in range(first, first + count)])


def pipeline(name: str, db: Path, to: str, **source: object) -> dict[str, object]:
    # db is absolute: sqlite:////tmp/.../billing.db, as SQLAlchemy spells it.
    return {"name": name, "source": {"type": "sql", "url": f"sqlite:///{db}", "table": "main.usage_rows",
                                     "key": "row_id", "interval": "50ms", "batch": 40, **source},
            "mapping": MAPPING, "eventSource": "billing-db", "to": {"url": to, "linger": "10ms"}}


def test_rows_are_read_once_across_restarts_and_by_replicas(tmp_path: Path) -> None:
    db = tmp_path / "billing.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE usage_rows (row_id INTEGER PRIMARY KEY, customer TEXT, tokens INTEGER, "
                     "at TEXT NOT NULL, raw BLOB)")
    insert(db, 1, 90)
    with RecordingEndpoint(lambda b: (204, {}, b"")) as endpoint, \
            RecordingEndpoint(lambda b: (204, {}, b"")) as replica:
        config = collector_config(tmp_path / "buf", [pipeline("rows", db, endpoint.url)],
                                  limits={"eventMaxAge": "100000h"})
        with CollectorServer(config):
            wait_for(lambda: len(endpoint.accepted) == 90, what="first 90 rows")
        insert(db, 91, 2, customer=None)  # subject null: dead-lettered, the rest goes on
        insert(db, 93, 8)  # past 9 and 10: an integer position compares as an integer
        replica_config = collector_config(tmp_path / "replica", [pipeline("rows", db, replica.url)],
                                          limits={"eventMaxAge": "100000h"})
        with CollectorServer(config) as collector, CollectorServer(replica_config):
            wait_for(lambda: len(endpoint.accepted) == 98 and len(replica.accepted) == 98, what="the new rows")
            dead = collector.collector.pipelines[0].buffer.dead_letters()
    ids = [e["id"] for e in endpoint.accepted]
    expected = [*range(1, 91), *range(93, 101)]
    assert ids == [event_id("billing-db", "sql", "main.usage_rows", str(i)) for i in expected]  # each once, in order
    assert endpoint.accepted[4]["data"] == {"tokens": 5, "raw": "05"}
    assert [e["id"] for e in replica.accepted] == ids  # a replica derives the same ids
    assert [d["reason"].split(":")[0] for d in dead] == ["invalid event", "invalid event"]
    with sqlite3.connect(db) as conn:  # read-only: the collector wrote nothing to the producer's file
        assert conn.execute("SELECT count(*) FROM usage_rows").fetchone() == (100,)
    assert not (tmp_path / "billing.db-wal").exists() or (tmp_path / "billing.db-wal").stat().st_size == 0


def test_settle_is_refused_for_sqlite(tmp_path: Path) -> None:
    from pgmeter.collect.app import Collector

    with pytest.raises(ConfigError, match="settle is for Postgres"):
        Collector(collector_config(tmp_path / "buf", [pipeline("rows", tmp_path / "x.db", "http://127.0.0.1:1",
                                                                settle="30s")]))
