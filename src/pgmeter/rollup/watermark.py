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
"""

from __future__ import annotations

import asyncpg

LOCK_TIMEOUT_MS = 1000


class WritersBusy(Exception):
    """A writer held ``events`` longer than the lock timeout; try again later."""


async def wait_out_writers(conn: asyncpg.Connection, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> int:
    """Return W such that every event with ``seq <= W`` is committed (or never will be).

    Runs its own short transaction; must not be called inside one whose snapshot
    the caller goes on using (a REPEATABLE READ snapshot would predate the wait).
    """
    async with conn.transaction():
        high = await conn.fetchval("SELECT pg_sequence_last_value('events_seq')")
        await conn.execute("SAVEPOINT wait_out_writers")
        try:
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            await conn.execute("LOCK TABLE events IN SHARE MODE")
        except asyncpg.LockNotAvailableError:
            raise WritersBusy(f"a writer held events for more than {lock_timeout_ms} ms") from None
        finally:
            await conn.execute("ROLLBACK TO SAVEPOINT wait_out_writers")
    return int(high or 0)
