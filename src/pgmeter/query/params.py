"""A meter query's parameters and results, independent of HTTP.

The API parses requests into :class:`QueryParams`; the Valkey cache and the Lago
sync build them directly. Rules that do not depend on the transport (known
group-by keys, a valid zone, ``from < to``) are checked in :func:`validate`, so
every caller gets the same answers.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgmeter.query.filters import StringFilter

from pgmeter.times import parse_rfc3339


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


class TooManyRows(QueryError):
    """The answer would have more rows than ``limits.queryMaxRows`` (the API answers 400)."""

    QUERY_ADVICE = "narrow the range (from, to), use a coarser windowSize, or filter by subject or filterGroupBy"

    def __init__(self, limit: int, advice: str = QUERY_ADVICE) -> None:
        super().__init__("windowSize", f"the answer has more than {limit} rows (limits.queryMaxRows); {advice}")
        self.limit = limit


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
    # key -> advancedMeterGroupByFilters filter (pgmeter.query.filters); never together
    # with filter_group_by. Keys whose filter filters nothing are dropped by validate().
    advanced_filters: Mapping[str, StringFilter] = field(default_factory=dict)
    # filterCustomerId resolved: customer id -> its usage subjects (the customer key and
    # usageAttribution.subjectKeys). Filters to those subjects and groups by customer,
    # aggregating over each customer's subjects together (a distinct count or a latest
    # value across them, not a sum of per-subject values).
    customers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def groups_by_subject(self) -> bool:
        # A subject filter always groups by subject (OpenMeter).
        return bool(self.subjects) or "subject" in self.group_by

    @property
    def meter_keys(self) -> tuple[str, ...]:
        """The meter group-by keys to group by, in request order, without repeats."""
        seen: list[str] = []
        for key in self.group_by:
            if key not in ("subject", "customer_id") and key not in seen:
                seen.append(key)
        return tuple(seen)


@dataclass(slots=True)
class QueryRow:
    value: Decimal
    window_start: datetime
    window_end: datetime
    subject: str | None
    group_by: dict[str, str]
    customer_id: str | None = None  # set when the query groups by customer


@dataclass(frozen=True)
class QueryResult:
    rows: list[QueryRow]
    # The data version the answer reflects: the meter's merge watermark at read time.
    # Not a cache key by itself (the tail can grow below it), kept for diagnostics.
    watermark: int = 0


# The instants a time parameter may name (from, to, ingestedAtFrom...): years 1 to
# 9999 in UTC, less a day at each end so that shifting into any zone (offsets are
# under a day) and rounding to a window stay representable. Beyond them Python
# overflows and asyncpg turns year 1 into -infinity: both used to be 500s.
TIME_MIN = datetime(1, 1, 2, tzinfo=UTC)
TIME_MAX = datetime(9999, 12, 31, tzinfo=UTC)
TIME_RANGE_TEXT = "0001-01-02T00:00:00Z to 9999-12-31T00:00:00Z"


def check_range(parameter: str, value: datetime, text: str) -> datetime:
    """``value`` if it lies in ``[TIME_MIN, TIME_MAX)``, else a :class:`QueryError` naming the parameter."""
    try:
        inside = TIME_MIN <= value < TIME_MAX
    except OverflowError:  # comparing converts to UTC, which can leave Python's range
        inside = False
    if not inside:
        raise QueryError(parameter, f"{parameter} is out of range: {text!r} (the API takes {TIME_RANGE_TEXT})")
    return value


def parse_time(parameter: str, text: Any) -> datetime:
    """An RFC 3339 date-time with an offset (:func:`pgmeter.times.parse_rfc3339`), in range."""
    if not isinstance(text, str):
        raise QueryError(parameter, f"{parameter} must be an RFC 3339 date-time string")
    try:
        value = parse_rfc3339(text)
    except ValueError:
        raise QueryError(parameter, f"{parameter} is not an RFC 3339 date-time: {text!r}") from None
    return check_range(parameter, value, text)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def check_text(parameter: str, value: str) -> None:
    """Refuse a value Postgres cannot take as text (NUL, unpaired surrogates): it could
    match nothing, and sending it would fail the statement (a 500)."""
    if _UNSTORABLE.search(value):
        raise QueryError(parameter, f"{parameter} must not contain NUL characters or unpaired surrogates")


def local_zone_name() -> str:
    """The server's own zone as an IANA name (Go's ``Local``): ``TZ``, else the
    ``/etc/localtime`` link, else UTC (the image has neither, so it is UTC)."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.readlink("/etc/localtime")
        candidates.append(target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else "")
    except OSError:
        pass
    for name in candidates:
        if name and name != "Local":
            try:
                zoneinfo.ZoneInfo(name)
                return name
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                continue
    return "UTC"


def zone_name(value: str | None) -> str:
    """``windowTimeZone`` as sent to an IANA name: absent or empty is UTC and ``Local``
    the server's zone, as Go's ``time.LoadLocation`` has them (OpenMeter)."""
    if not value:
        return "UTC"
    return local_zone_name() if value == "Local" else value


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
    for subject in params.subjects:
        check_text("subject", subject)
    for key in params.group_by:
        if key == "customer_id":
            if not params.customers:  # OpenMeter: customer_id groups only filtered customers
                raise QueryError("groupBy", "invalid group by: customer_id (it needs filterCustomerId)")
            continue
        if key != "subject" and key not in group_keys:
            raise QueryError("groupBy", f"invalid group by: {key}")
    if params.filter_group_by and params.advanced_filters:
        raise QueryError("advancedMeterGroupByFilters",
                         "advanced meter group by filters and filter group by cannot be used together")
    for key in params.advanced_filters:
        if key not in group_keys:
            raise QueryError("advancedMeterGroupByFilters", f"meter does not have group by: {key}")
    for key, values in params.filter_group_by.items():
        if key not in group_keys:
            raise QueryError(f"filterGroupBy[{key}]", f"invalid filterGroupBy key: {key} "
                                                      "(not a group-by key of the meter)")
        # An empty list filters nothing (OpenMeter drops it after checking the key).
        for value in values:
            check_text(f"filterGroupBy[{key}]", value)
