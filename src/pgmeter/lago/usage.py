"""Billable usage for the Lago sync, read through the query engine the API uses."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from pgmeter.meters.store import Meter
from pgmeter.query.engine import run_query
from pgmeter.query.params import QueryParams, WindowSize


async def read_usage(pool: asyncpg.Pool, meter: Meter, start: datetime, end: datetime,
                     window: str, subjects: list[str] | None) -> dict[tuple[str, datetime], Decimal]:
    """Usage per (subject, UTC window start) in [start, end), in windows of ``window``.

    The pool (not the caller's connection) gives the engine its own REPEATABLE READ
    snapshot, in which rollups and the unmerged tail are read consistently.
    """
    params = QueryParams(from_=start, to=end, window_size=WindowSize(window), window_time_zone="UTC",
                         subjects=tuple(subjects or ()), group_by=("subject",))
    result = await run_query(pool, meter, params)
    return {(row.subject or "", row.window_start): row.value for row in result.rows}
