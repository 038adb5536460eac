"""The least event time among the events not merged yet (sql/011_event_floor.sql).

Every reader of "the events with ``seq > last_seq``" (a merge, the query tail, the
lag gauge) also bounds ``time`` from below by :func:`time_floor`, so Postgres prunes
the partitions that cannot hold such an event instead of probing the seq index of
each of them (a year of daily partitions is 365 probes, planned and locked). The
bound comes from ``event_floor``, which a statement trigger on ``events`` fills in
the writer's transaction; it is exact, late events included: a late event's old
time is the floor until the event is merged.

Every write into ``events`` must go through the partitioned parent (the sink's
do), or record its own ``event_floor`` rows: the trigger does not see a statement
on a partition, nor a table loaded and then attached (bench/query.py's bulk load
shows how).

The floor is read in the caller's snapshot and passed as a bind parameter (not a
subquery), so partitions are pruned when the statement is planned, not only when
it runs.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

# No event's time is before this (it was a Python datetime): the floor when the seed
# row (unknown times) applies.
EARLIEST = datetime.min.replace(tzinfo=UTC)
_EARLIEST = "'0001-01-01 00:00:00+00'::timestamptz"  # EARLIEST in SQL ('-infinity' has no datetime)


def floor_sql(namespace: str, event_type: str, last_seq: str) -> str:
    """:func:`time_floor` as one SQL expression over three SQL expressions, so a
    statement that reads the meter's rollup can read its floor too (no round trip of
    its own). NULL when no event is unmerged; the seed row (unknown times) gives
    ``EARLIEST``."""
    return (f"(SELECT CASE WHEN min(min_time) IS NOT NULL THEN greatest(min(min_time), {_EARLIEST}) END "
            f"FROM event_floor WHERE hi_seq > {last_seq} "
            f"AND ((namespace = {namespace} AND type = {event_type}) OR namespace IS NULL))")


_FLOOR = "SELECT " + floor_sql("$1", "$2", "$3")

_FLOOR_ANY = """
SELECT greatest(min(min_time), $2::timestamptz) AS floor FROM event_floor WHERE hi_seq > $1
"""

# Rows no reader needs any more, those at or below every meter's last_seq (or the
# watermark $1 when there is no meter), folded into one row per pair at that seq:
# a meter created later (last_seq 0) still finds every pair's least time. Rows are
# deleted and re-inserted in one statement; a concurrent compaction deletes each row
# once, so it only ever leaves two rows where one would do.
_COMPACT = """
WITH upto AS (
    SELECT coalesce((SELECT min(last_seq) FROM meter_rollups), $1::bigint) AS seq
),
gone AS (
    DELETE FROM event_floor
     WHERE hi_seq <= (SELECT seq FROM upto)
    RETURNING namespace, type, min_time
)
INSERT INTO event_floor (namespace, type, hi_seq, min_time)
SELECT namespace, type, (SELECT seq FROM upto), min(min_time)
  FROM gone
 GROUP BY namespace, type
"""


async def time_floor(conn: asyncpg.Connection, namespace: str, event_type: str, last_seq: int) -> datetime | None:
    """A lower bound of the time of every event of (namespace, type) with seq >
    ``last_seq`` in this snapshot; None when there is no such event."""
    found: datetime | None = await conn.fetchval(_FLOOR, namespace, event_type, last_seq)
    return found


async def any_floor(conn: asyncpg.Connection, last_seq: int) -> datetime | None:
    """The same bound over every pair; None when no event has seq > ``last_seq``."""
    return await conn.fetchval(_FLOOR_ANY, last_seq, EARLIEST)


async def compact(conn: asyncpg.Connection, watermark: int) -> int:
    """Fold the rows every meter is past into one per pair; returns rows written."""
    status = await conn.execute(_COMPACT, watermark)
    return int(status.split()[-1])
