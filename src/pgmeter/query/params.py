"""A meter query's parameters and results, independent of HTTP.

The API parses requests into :class:`QueryParams`; the Valkey cache and the Lago
sync build them directly. Rules that do not depend on the transport (known
group-by keys, a valid zone, ``from < to``) are checked in :func:`validate`, so
every caller gets the same answers.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from typing import Any


class WindowSize(StrEnum):
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


class QueryError(ValueError):
    """A bad query parameter; ``parameter`` names it (the API answers 400)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class QueryParams:
    from_: datetime | None = None
    to: datetime | None = None
    window_size: WindowSize | None = None
    window_time_zone: str = "UTC"
    subjects: tuple[str, ...] = ()
    # "subject" and/or meter group-by keys, in request order (it orders CSV columns).
    group_by: tuple[str, ...] = ()
    # key -> accepted values (one value from GET, a list meaning IN from POST).
    filter_group_by: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def groups_by_subject(self) -> bool:
        # A subject filter always groups by subject (OpenMeter).
        return bool(self.subjects) or "subject" in self.group_by

    @property
    def meter_keys(self) -> tuple[str, ...]:
        """The meter group-by keys to group by, in request order, without repeats."""
        seen: list[str] = []
        for key in self.group_by:
            if key != "subject" and key not in seen:
                seen.append(key)
        return tuple(seen)


@dataclass(slots=True)
class QueryRow:
    value: Decimal
    window_start: datetime
    window_end: datetime
    subject: str | None
    group_by: dict[str, str]


@dataclass(frozen=True)
class QueryResult:
    rows: list[QueryRow]
    # The data version the answer reflects: the meter's merge watermark at read time.
    # Not a cache key by itself (the tail can grow below it), kept for diagnostics.
    watermark: int = 0


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$")


def parse_time(parameter: str, text: Any) -> datetime:
    """An RFC 3339 date-time with an offset; the fraction is kept to microseconds."""
    if not isinstance(text, str):
        raise QueryError(parameter, f"{parameter} must be an RFC 3339 date-time string")
    match = _RFC3339.match(text)
    if not match:
        raise QueryError(parameter, f"{parameter} is not an RFC 3339 date-time: {text!r}")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    if offset in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if offset[0] == "+" else -1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise QueryError(parameter, f"{parameter} has an invalid offset: {text!r}")
        tz = UTC if hours == minutes == 0 else timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tz)
    except ValueError:
        raise QueryError(parameter, f"{parameter} is not a valid date-time: {text!r}") from None


def zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise QueryError("windowTimeZone", f"invalid time zone: {name!r}") from None


def validate(params: QueryParams, group_keys: list[str] | dict[str, str]) -> None:
    """The transport-independent rules; raises :class:`QueryError`."""
    if params.from_ is not None and params.to is not None and params.from_ >= params.to:
        raise QueryError("from", "from must be before to" if params.from_ > params.to
                         else "from and to must differ")
    zone(params.window_time_zone)
    for key in params.group_by:
        if key == "customer_id":
            raise QueryError("groupBy", "invalid group by: customer_id (needs filterCustomerId; "
                                        "pgmeter has no customers)")
        if key != "subject" and key not in group_keys:
            raise QueryError("groupBy", f"invalid group by: {key}")
    for key, values in params.filter_group_by.items():
        if key not in group_keys:
            raise QueryError(f"filterGroupBy[{key}]", f"invalid filterGroupBy key: {key} "
                                                      "(not a group-by key of the meter)")
        if not values:
            raise QueryError(f"filterGroupBy[{key}]", f"filterGroupBy[{key}] needs at least one value")
