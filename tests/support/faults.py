"""Faults that hit work in flight, for tests/test_faults.py and bench/chaos.py.

A kill of an idle component proves nothing, so a fault test first makes sure there
is work in flight: :func:`hold_sink_writes` takes a lock that every sink write
transaction needs (``event_dedup`` in EXCLUSIVE mode: reads go on, every INSERT or
COPY waits), :func:`wait_for_blocked_writer` waits until a sink transaction is
really waiting on it, and only then does the test compare the events acknowledged
(204) with the events committed and strike.

:func:`kill_postmaster` is ``kill -9`` of PostgreSQL's postmaster followed by the
wait a restart needs: the orphaned backends notice the death of their postmaster
and exit, and until they have, a new postmaster refuses the data directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import nats
import psutil
import psycopg

from pgmeter.devstack.process import ManagedProcess

# Every sink transaction claims its keys here (sink/store.py); EXCLUSIVE conflicts with
# the ROW EXCLUSIVE lock any INSERT or COPY takes, and with nothing a reader takes.
_HOLD = "LOCK TABLE event_dedup IN EXCLUSIVE MODE"


@contextmanager
def hold_sink_writes(url: str) -> Iterator[int]:
    """Keep every sink write transaction waiting until the block exits; yields our backend pid.

    The holding connection may die under us (a Postgres kill): leaving is then quiet.
    """
    conn = psycopg.connect(url, connect_timeout=5)
    try:
        conn.execute(_HOLD)
        pid = conn.info.backend_pid
        yield pid
    finally:
        try:
            conn.rollback()
            conn.close()
        except psycopg.Error:
            pass


def blocked_writers(url: str, holder_pid: int) -> int:
    """How many other backends of this database wait on a lock that ``holder_pid`` holds."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND %s = ANY(pg_blocking_pids(pid))", (holder_pid,)).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_blocked_writer(url: str, holder_pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while blocked_writers(url, holder_pid) == 0:
        if time.monotonic() > deadline:
            raise AssertionError("no sink transaction started waiting on the held lock")
        time.sleep(0.02)


def kill_postmaster(process: ManagedProcess, timeout: float = 30) -> int:
    """``kill -9`` the postmaster and wait for its orphaned backends to exit.

    Returns how many server processes were running under it at the moment of the kill.
    """
    assert process.pid is not None and process.running(), "postmaster is not running"
    children = psutil.Process(process.pid).children()
    process.kill()
    gone, alive = psutil.wait_procs(children, timeout=timeout)
    assert not alive, f"backends still running {timeout:.0f}s after the postmaster died: {alive}"
    return len(children)


def consumer_idle(nats_url: str, stream: str, consumer: str) -> bool:
    """Whether the sink consumer has nothing left to deliver and nothing unacknowledged.

    Only then can no redelivery come any more: the moment to count for duplicates.
    False while NATS cannot be asked.
    """
    async def check() -> bool:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream().consumer_info(stream, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0
        finally:
            await nc.close()

    try:
        return asyncio.run(check())
    except Exception:
        return False
