"""``GET /api/v1/events``: stored events, newest first, as OpenMeter lists them.

Parameter rules follow openmeter/meterevent (service.go, ListEventsParams.Validate):
``from`` defaults to 32 days ago and may not be older; ``to`` and ``ingestedAtTo``
are exclusive; ``id`` is OpenMeter's ``id LIKE '%<id>%'`` (the value is not escaped
there, so ``%`` and ``_`` in it are wildcards and a backslash escapes the next
character; pgmeter does the same) and ``subject`` an exact match; ``limit`` is
1..100. OpenMeter stores whole seconds and compares ``time >= from.Unix()``, so
bounds are truncated to the second here too; the stored microseconds are returned
as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pgmeter.ingest.validation import MeterRule, validation_error
from pgmeter.query.params import TIME_MAX, TIME_MIN, TIME_RANGE_TEXT
from pgmeter.times import format_rfc3339

MAX_FROM_AGE = timedelta(days=32)
# What Postgres cannot take as text: such a filter matches nothing and would fail the statement.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# The API's time range (query.params.TIME_MIN and TIME_MAX) in microseconds since the epoch.
_MIN_MICROS = (TIME_MIN - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
_MAX_MICROS = (TIME_MAX - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
MAX_LIMIT = 100


class ListError(ValueError):
    """Invalid parameters; the message is the problem's detail."""


@dataclass
class ListParams:
    namespace: str
    start: datetime
    end: datetime | None = None
    ingested_from: datetime | None = None
    ingested_to: datetime | None = None
    id: str | None = None
    subject: str | None = None
    # customerId resolved: the events of any of these subjects (None: no customer filter).
    customer_subjects: tuple[str, ...] | None = None
    limit: int = MAX_LIMIT


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(name: str, raw: str) -> datetime:
    from pgmeter.ingest.cloudevents import micros_to_datetime, parse_time

    try:
        micros = parse_time(raw)
    except ValueError as exc:
        raise ListError(f"{name}: {exc}") from None
    # Checked on the integer: converting a year-10000 instant back to a datetime is
    # what used to overflow into a 500.
    if not _MIN_MICROS <= micros < _MAX_MICROS:
        raise ListError(f"{name} is out of range: {raw!r} (the API takes {TIME_RANGE_TEXT})")
    return micros_to_datetime(micros)


def validate(params: ListParams, now: datetime) -> None:
    """OpenMeter's checks, all of them reported at once."""
    problems: list[str] = []
    minimum = now - MAX_FROM_AGE
    if params.start < minimum:
        problems.append(f"from date is too old: {_rfc3339(params.start)}, must be after {_rfc3339(minimum)}")
    if params.end is not None and params.end < params.start:
        problems.append(f"to date is before from date: {_rfc3339(params.end)} < {_rfc3339(params.start)}")
    if params.ingested_from is not None and params.ingested_from < minimum:
        problems.append(f"ingestedAtFrom date is too old, must be after: {_rfc3339(params.ingested_from)}: "
                        f"{_rfc3339(minimum)}")
    if (params.ingested_from is not None and params.ingested_to is not None
            and params.ingested_to < params.ingested_from):
        problems.append(f"ingestedAtTo date is before ingestedAtFrom date: {_rfc3339(params.ingested_to)} < "
                        f"{_rfc3339(params.ingested_from)}")
    for name, value in (("id", params.id), ("subject", params.subject)):
        if value is not None and _UNSTORABLE.search(value):
            problems.append(f"{name} must not contain NUL characters or unpaired surrogates")
    if params.limit < 1:
        problems.append("limit must be greater than 0")
    if params.limit > MAX_LIMIT:
        problems.append(f"limit must be less than or equal to {MAX_LIMIT}")
    if problems:
        raise ListError("validate input: " + "\n".join(problems))


def _second(value: datetime) -> datetime:
    return value.replace(microsecond=0)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC, as Go prints it (see :mod:`pgmeter.times`)."""
    return format_rfc3339(value, utc=True)


async def load_meters(conn: asyncpg.Connection, namespace: str) -> list[MeterRule]:
    rows = await conn.fetch(
        "SELECT slug, aggregation, event_type, value_property FROM meters "
        "WHERE namespace = $1 AND deleted_at IS NULL ORDER BY slug", namespace)
    return [MeterRule.of(r["slug"], r["aggregation"], r["event_type"], r["value_property"]) for r in rows]


async def list_events(pool: asyncpg.Pool, params: ListParams) -> list[dict[str, Any]]:
    clauses = ["namespace = $1", "time >= $2"]
    args: list[Any] = [params.namespace, _second(params.start)]

    def add(clause: str, value: Any) -> None:
        args.append(value)
        clauses.append(clause.format(f"${len(args)}"))

    if params.end is not None:
        add("time < {}", _second(params.end))
    if params.ingested_from is not None:
        add("ingested_at >= {}", _second(params.ingested_from))
    if params.ingested_to is not None:
        add("ingested_at < {}", _second(params.ingested_to))
    if params.id is not None:
        # OpenMeter's exact semantics: a LIKE pattern, wildcards included (module docstring).
        add("id LIKE '%' || {} || '%'", params.id)
    if params.subject is not None:
        add("subject = {}", params.subject)
    if params.customer_subjects is not None:
        add("subject = ANY({}::text[])", list(params.customer_subjects))
    args.append(params.limit)
    sql = (f"SELECT id, source, type, subject, time, data, ingested_at, stored_at FROM events "
           f"WHERE {' AND '.join(clauses)} ORDER BY time DESC, seq DESC LIMIT ${len(args)}")
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, *args)
        meters = await load_meters(conn, params.namespace) if rows else []
    return [_item(row, meters) for row in rows]


def _item(row: asyncpg.Record, meters: list[MeterRule]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": row["id"],
        "source": row["source"],
        "type": row["type"],
        "subject": row["subject"],
        "time": format_time(row["time"]),
    }
    data = row["data"]
    if data is not None:
        event["datacontenttype"] = "application/json"
        event["data"] = data
    item: dict[str, Any] = {
        "event": event,
        "ingestedAt": format_time(row["ingested_at"]),
        "storedAt": format_time(row["stored_at"]),
    }
    error = validation_error(row["type"], data, meters)
    if error:
        item["validationError"] = error
    return item
