"""The disk buffer between a pipeline's source and its delivery: one SQLite file.

Why SQLite in WAL mode with ``synchronous=FULL``: a source is acknowledged (the HTTP
source answers 204, the SQL source advances its cursor, the file source its offset)
only after the commit that holds its events returned, and FULL makes that commit
survive power loss as well as kill -9 (Redpanda Connect's sqlite buffer runs with
``synchronous=0`` and can lose acknowledged rows on an OS crash).

Three tables:

- ``events``: CloudEvents waiting for delivery, oldest first. A row leaves only when
  the endpoint answered 2xx (:meth:`Buffer.ack`) or refused it for good
  (:meth:`Buffer.dead_letter`).
- ``dead_letters``: what could not be delivered, with the reason (and the endpoint's
  problem detail), and for what a mapping refused, the source record and its
  deterministic id - kept for an operator, never retried on its own;
  ``pgmeter collect dead-letters replay`` (:mod:`pgmeter.collect.dead_letters`) puts
  them back after a fix.
- ``state``: a source's position (SQL cursor, file offset, last Prometheus tick),
  written in the *same transaction* as the events read up to it, so a crash can
  neither skip rows nor read them twice.

Bounded by ``max_bytes`` of queued event text: :meth:`put` raises :class:`BufferFull`
rather than grow past it, and each source decides what that means (the HTTP source
answers 503 with Retry-After; pull sources wait and read again from their persisted
position). Dead letters do not count against the bound.

Writes from many concurrent requests are committed together (group commit): the
fsync dominates, and one fsync for every request waiting is what keeps the HTTP
source near the speed of posting straight to pgmeter.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    payload TEXT NOT NULL,
    record TEXT,
    record_id TEXT
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Rejected(NamedTuple):
    """A dead letter on its way in, from a source or its mapping."""

    payload: str  # what failed: the source record, the mapped event, or the raw line
    reason: str
    record: str | None = None  # the source record as JSON, when a mapping can take it again
    record_id: str | None = None  # and its deterministic id (so a replay keeps the event ids)


# One source's write: (event texts, source state, dead letters).
Write = tuple[list[str], dict[str, str], list[Rejected]]


class BufferFull(Exception):
    """Accepting these events would take the buffer past its size bound."""


@dataclass(frozen=True)
class Queued:
    seq: int
    body: str


@dataclass(frozen=True)
class Stats:
    events: int
    bytes: int
    oldest_age: float  # seconds; 0 when empty
    dead_letters: int


class Buffer:
    """One pipeline's buffer file. Thread-safe; the async methods run SQLite off the loop."""

    def __init__(self, path: Path, max_bytes: int = 1 << 30) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # the connection: held across SQLite calls (and fsyncs)
        # The queued count and bytes, apart: put() runs on the event loop and must never
        # wait for the connection (a commit's fsync in another thread). Measured: it did.
        self._counts = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(dead_letters)")}
        for column in ("record", "record_id"):  # a buffer file from before replay existed
            if column not in columns:
                self._db.execute(f"ALTER TABLE dead_letters ADD COLUMN {column} TEXT")
        row = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM events").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        # Puts reserved in the counts but not yet committed: what a recount keeps (below).
        self._reserved_count = self._reserved_bytes = 0
        # Another process (the dead-letters command) may add events to this file while
        # the collector runs; SQLite's data_version changes when it does, and the counts
        # are then taken again from the table (see _follow_others).
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._pending: list[tuple[Write, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.arrived = asyncio.Event()  # set on every put: wakes delivery from its linger

    # -- writing -------------------------------------------------------------------

    def _write(self, items: list[Write]) -> None:
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for bodies, state, rejects in items:
                db.executemany("INSERT INTO events (body, size, enqueued_at) VALUES (?, ?, ?)",
                               [(b, len(b), now) for b in bodies])
                db.executemany("INSERT INTO state (key, value) VALUES (?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", list(state.items()))
                db.executemany("INSERT INTO dead_letters (at, payload, reason, record, record_id) "
                               "VALUES (?, ?, ?, ?, ?)", [(now, *reject) for reject in rejects])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def put(self, bodies: list[str], state: dict[str, str] | None = None,
                  rejects: list[Rejected] | None = None) -> None:
        """Durably queue ``bodies``, with the source ``state`` they bring it to and the
        ``(payload, reason)`` dead letters found on the way, in one transaction; returns
        once committed. Raises :class:`BufferFull` (and then writes nothing).

        Concurrent callers share one commit (see the module docstring).
        """
        size = sum(len(b) for b in bodies)
        # Checked (and reserved) here so a refused request never waits for a commit. An
        # empty buffer takes any one write, so a source batch larger than the bound
        # cannot wait forever: the bound is max_bytes plus at most one write.
        with self._counts:
            if bodies and self._bytes and self._bytes + size > self.max_bytes:
                raise BufferFull(f"buffer full ({self._bytes} of {self.max_bytes} bytes queued)")
            self._bytes += size
            self._count += len(bodies)
            self._reserved_bytes += size
            self._reserved_count += len(bodies)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(((bodies, state or {}, rejects or []), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._commit_pending())
        try:
            await future
        except BaseException:
            with self._counts:
                self._bytes -= size
                self._count -= len(bodies)
            raise
        self.arrived.set()

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_locked, [write for write, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_locked(self, items: list[Write]) -> None:
        with self._lock:
            try:
                self._write(items)
            finally:  # committed (now in the table) or failed (put takes its share back)
                with self._counts:
                    self._reserved_bytes -= sum(len(b) for bodies, _, _ in items for b in bodies)
                    self._reserved_count -= sum(len(bodies) for bodies, _, _ in items)

    # -- reading -------------------------------------------------------------------

    def peek(self, limit: int, max_bytes: int, after: int = 0) -> list[Queued]:
        """The oldest queued events past sequence ``after``: at most ``limit`` and
        ``max_bytes`` (but at least one)."""
        with self._lock:
            self._follow_others()
            rows = self._db.execute("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        out: list[Queued] = []
        size = 0
        for seq, body in rows:
            if out and size + len(body) > max_bytes:
                break
            size += len(body)
            out.append(Queued(seq, body))
        return out

    def ack(self, seqs: list[int]) -> None:
        """The endpoint accepted these: remove them."""
        self._remove(seqs)

    def dead_letter(self, items: list[tuple[Queued, str, str | None]]) -> None:
        """Move queued events to dead letters: ``(event, reason, endpoint's detail)``."""
        now = time.time()
        with self._lock, self._relaxed():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO dead_letters (at, reason, detail, payload) VALUES (?, ?, ?, ?)",
                                     [(now, reason, detail, q.body) for q, reason, detail in items])
                removed = self._delete([q.seq for q, _, _ in items])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._forget(removed)

    def _remove(self, seqs: list[int]) -> None:
        with self._lock, self._relaxed():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = self._delete(seqs)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._forget(removed)

    @contextlib.contextmanager
    def _relaxed(self) -> Iterator[None]:
        """Commit without fsync (WAL + synchronous=NORMAL: safe from kill -9, not from
        power loss) - for removals only. A removal lost to power loss means the events
        are sent again and deduplicated by id, so it need not wait for the disk; the
        next FULL commit (an insert) syncs the log with it. Measured: the fsync of every
        acknowledgement, under the buffer's lock, held the HTTP source's inserts back."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _delete(self, seqs: list[int]) -> tuple[int, int]:
        count = size = 0
        for start in range(0, len(seqs), 500):
            part = seqs[start:start + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"DELETE FROM events WHERE seq IN ({marks}) RETURNING size", part).fetchall()
            count += len(rows)
            size += sum(r[0] for r in rows)
        return count, size

    def _follow_others(self) -> None:
        """Take the counts again from the table when another connection committed to it
        (called with the connection's lock held, so no write of ours is half done)."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        count, size = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM events").fetchone()
        with self._counts:
            self._count = int(count) + self._reserved_count
            self._bytes = int(size) + self._reserved_bytes

    def _forget(self, removed: tuple[int, int]) -> None:
        with self._counts:
            self._count -= removed[0]
            self._bytes -= removed[1]

    # -- source state and observation ----------------------------------------------

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def stats(self) -> Stats:
        with self._lock:
            self._follow_others()
            row = self._db.execute("SELECT enqueued_at FROM events ORDER BY seq LIMIT 1").fetchone()
            oldest = row[0] if row else None
            dead = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            return Stats(self._count, self._bytes, max(0.0, time.time() - oldest) if oldest else 0.0, int(dead))

    def dead_letters(self, seqs: list[int] | None = None) -> list[dict[str, Any]]:
        """Dead letters, oldest first (only ``seqs``, when given)."""
        query = "SELECT seq, at, reason, detail, payload, record, record_id FROM dead_letters"
        with self._lock:
            if seqs is None:
                rows = self._db.execute(query + " ORDER BY seq").fetchall()
            else:
                rows = []
                for start in range(0, len(seqs), 500):
                    part = seqs[start:start + 500]
                    rows += self._db.execute(f"{query} WHERE seq IN ({','.join('?' * len(part))})", part).fetchall()
                rows.sort()
        return [{"seq": r[0], "at": r[1], "reason": r[2], "detail": r[3], "payload": r[4], "record": r[5],
                 "recordId": r[6]} for r in rows]

    def replay(self, seqs: list[int], at: float, bodies: list[str], rejects: list[Rejected]) -> None:
        """Dead letters ``seqs`` go back: ``bodies`` queued for delivery, what still fails
        (``rejects``) dead-lettered again with its new reason (``at`` kept: the moment the
        record was collected), all in one transaction. Past the size bound if need be:
        an operator's replay is not a source to push back on."""
        now = time.time()
        with self._lock:
            self._follow_others()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM dead_letters WHERE seq = ?", [(seq,) for seq in seqs])
                self._db.executemany("INSERT INTO events (body, size, enqueued_at) VALUES (?, ?, ?)",
                                     [(b, len(b), now) for b in bodies])
                self._db.executemany("INSERT INTO dead_letters (at, payload, reason, record, record_id) "
                                     "VALUES (?, ?, ?, ?, ?)", [(at, *reject) for reject in rejects])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            with self._counts:
                self._count += len(bodies)
                self._bytes += sum(len(b) for b in bodies)

    def close(self) -> None:
        with self._lock:
            self._db.close()
