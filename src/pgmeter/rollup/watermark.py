"""The highest events.seq below which no insert can still be in flight.

Sequence values are handed out when a row is written but become visible only at
commit, so seq 101 can be visible while seq 100 is still in flight; a refresher
that trusted what it sees would skip 100 for good. The Citus / pg_incremental
answer: read the sequence, then briefly request a SHARE lock on ``events``. Every
writer holds ROW EXCLUSIVE on the table from before it drew its seq, so once the
lock is granted every transaction that holds a seq at or below the value read has
committed or aborted, and any later statement's snapshot sees all of them.

The lock is taken inside a savepoint and released at once by rolling back to it,
with a short lock_timeout: the request queues new writers behind it, so it must
never wait long. Once established, the fact is permanent (the sequence has
CACHE 1 and only grows), so callers keep the value and reuse it until they need
a newer one.

A SHARE request also waits for VACUUM and ANALYZE (SHARE UPDATE EXCLUSIVE),
which autovacuum runs on busy partitions all the time, and after deadlock_timeout
it cancels them, so a busy table would never be vacuumed; and while it waits, new
writers queue behind it. So the lock table (pg_locks, read after the sequence)
is consulted first, as pg_incremental does in C (WaitForLockers):

- no transaction holds ROW EXCLUSIVE on ``events`` or a partition: every writer
  that drew a seq up to W has ended already, and no lock is needed;
- writers, and nothing else that a SHARE request would wait for: the SHARE lock
  waits them out (short lock_timeout);
- anything else (vacuum, DDL), or the lock timed out: wait until each of the
  listed writers has ended, polling, without queueing any lock.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

LOCK_TIMEOUT_MS = 200
WRITER_WAIT_S = 10.0
POLL_S = 0.01

# The writers (transactions holding ROW EXCLUSIVE on events or one of its
# partitions), and whether anything else holds or awaits a lock that a SHARE
# request would queue behind. Our own backend is excluded.
_LOCKERS = """
SELECT coalesce(array_agg(DISTINCT virtualtransaction) FILTER (WHERE mode = 'RowExclusiveLock' AND granted),
                '{}') AS writers,
       coalesce(bool_or(mode NOT IN ('AccessShareLock', 'RowShareLock', 'RowExclusiveLock')
                        OR NOT granted), false) AS others
  FROM pg_locks
 WHERE locktype = 'relation'
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND relation IN (SELECT relid FROM pg_partition_tree('events'))
   AND pid <> pg_backend_pid()
"""
# Which of those transactions are still running (each holds a lock on its own id).
_RUNNING = "SELECT count(*) FROM pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY($1::text[])"


class WritersBusy(Exception):
    """A writer held ``events`` longer than the wait allows; try again later."""


async def wait_out_writers(conn: asyncpg.Connection, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                           writer_wait_s: float = WRITER_WAIT_S) -> int:
    """Return W such that every event with ``seq <= W`` is committed (or never will be).

    Runs its own short transaction; must not be called inside one whose snapshot
    the caller goes on using (a REPEATABLE READ snapshot would predate the wait).
    """
    async with conn.transaction():
        high = int(await conn.fetchval("SELECT pg_sequence_last_value('events_seq')") or 0)
        lockers = await conn.fetchrow(_LOCKERS)
        writers: list[str] = list(lockers["writers"])
        if not writers:
            return high
        if not lockers["others"]:
            await conn.execute("SAVEPOINT wait_out_writers")
            try:
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await conn.execute("LOCK TABLE events IN SHARE MODE")
                return high
            except asyncpg.LockNotAvailableError:
                pass
            finally:
                await conn.execute("ROLLBACK TO SAVEPOINT wait_out_writers")
    deadline = time.monotonic() + writer_wait_s
    while await conn.fetchval(_RUNNING, writers):
        if time.monotonic() > deadline:
            raise WritersBusy(f"a writer held events for more than {writer_wait_s:g} s")
        await asyncio.sleep(POLL_S)
    return high
