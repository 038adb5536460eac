"""Time arithmetic of entitlements, as OpenMeter does it.

Usage periods and grant recurrences are ``anchor + N * interval``, computed from the
anchor each time with month-end clamping (Jan 31 + 1 month = Feb 29 in 2024, + 2
months = Mar 31), never by stepping from the previous boundary. Grant expirations
are Go's ``AddDate``, which does *not* clamp (Jan 31 + 1 month = Mar 2 in 2024).
Everything here is pure and works on aware UTC datetimes.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MINUTE = timedelta(minutes=1)
MAX_INTERVAL_YEARS = 100
_ISO = re.compile(r"^P(?!$)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
                  r"(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")
NAMED = {"DAY": "P1D", "WEEK": "P1W", "MONTH": "P1M", "YEAR": "P1Y"}


class IntervalError(ValueError):
    """Not an interval OpenMeter accepts."""


@dataclass(frozen=True)
class Interval:
    """An ISO-8601 duration split the way OpenMeter adds it: calendar parts clamp."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0
    minutes: int = 0
    seconds: int = 0

    @property
    def fixed(self) -> timedelta:
        return timedelta(weeks=self.weeks, days=self.days, hours=self.hours, minutes=self.minutes,
                         seconds=self.seconds)

    def at_least_an_hour(self) -> bool:
        return bool(self.years or self.months) or self.fixed >= timedelta(hours=1)

    def add_to(self, t: datetime, n: int = 1) -> datetime:
        """``t + n * self``: years, then months (each clamped to the month's end), then the rest."""
        if self.years:
            t = add_months(t, 12 * self.years * n)
        if self.months:
            t = add_months(t, self.months * n)
        return t + self.fixed * n


def parse_interval(text: str) -> Interval:
    """``DAY``/``WEEK``/``MONTH``/``YEAR`` (any case) or an ISO-8601 duration."""
    iso = NAMED.get(text.upper(), text) if isinstance(text, str) else None
    match = _ISO.match(iso) if iso else None
    if not match:
        raise IntervalError(f"invalid interval: {text!r}")
    parts = [int(p) if p else 0 for p in match.groups()]
    interval = Interval(*parts)
    if interval == Interval():
        raise IntervalError(f"invalid interval: {text!r}")
    # A bound that keeps every boundary computable (and is far beyond any real plan).
    if interval.years * 12 + interval.months > 12 * MAX_INTERVAL_YEARS or \
            interval.fixed > timedelta(days=366 * MAX_INTERVAL_YEARS):
        raise IntervalError(f"interval {text!r} is longer than {MAX_INTERVAL_YEARS} years")
    return interval


def interval_iso(text: str) -> str:
    return NAMED.get(text.upper(), text)


def interval_name(text: str) -> str:
    """The named form (``MONTH``) when there is one, else the ISO text."""
    upper = text.upper()
    if upper in NAMED:
        return upper
    for name, iso in NAMED.items():
        if iso == text:
            return name
    return text


def add_months(t: datetime, months: int) -> datetime:
    """Go's AddMonthsNoOverflow: the day is clamped to the target month's last day."""
    index = t.year * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return t.replace(year=year, month=month + 1, day=day)


def add_date(t: datetime, years: int = 0, months: int = 0, days: int = 0) -> datetime:
    """Go's ``time.AddDate``: out-of-range days roll into the next month (no clamping)."""
    index = (t.year + years) * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    first = t.replace(year=year, month=month + 1, day=1)
    return first + timedelta(days=t.day - 1 + days)


def expiration(effective_at: datetime, duration: str, count: int) -> datetime:
    """A grant's ``expiresAt`` from ``expiration{duration, count}``."""
    if duration == "HOUR":
        return effective_at + timedelta(hours=count)
    if duration == "DAY":
        return add_date(effective_at, days=count)
    if duration == "WEEK":
        return add_date(effective_at, days=7 * count)
    if duration == "MONTH":
        return add_date(effective_at, months=count)
    if duration == "YEAR":
        return add_date(effective_at, years=count)
    raise IntervalError(f"invalid expiration duration: {duration!r}")


def floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def ceil_minute(t: datetime) -> datetime:
    floored = floor_minute(t)
    return floored if floored == t else floored + MINUTE


@dataclass(frozen=True)
class Recurrence:
    anchor: datetime
    interval: Interval

    def _index_at_or_before(self, t: datetime) -> int:
        """The largest n with ``anchor + n*interval <= t``."""
        # An estimate from the average length, then corrected by stepping: cheap and exact.
        approx = self.interval.add_to(self.anchor, 1) - self.anchor
        n = int((t - self.anchor) / approx) if approx > timedelta(0) else 0
        while self.interval.add_to(self.anchor, n) > t:
            n -= 1
        while self.interval.add_to(self.anchor, n + 1) <= t:
            n += 1
        return n

    def at(self, n: int) -> datetime:
        return self.interval.add_to(self.anchor, n)

    def prev_at_or_before(self, t: datetime) -> datetime:
        return self.at(self._index_at_or_before(t))

    def next_after(self, t: datetime) -> datetime:
        """The first boundary strictly after ``t``."""
        return self.at(self._index_at_or_before(t) + 1)

    def next_at_or_after(self, t: datetime) -> datetime:
        prev = self.prev_at_or_before(t)
        return prev if prev == t else self.next_after(t)

    def period_at(self, t: datetime) -> tuple[datetime, datetime]:
        """[start, end) with start <= t < end."""
        n = self._index_at_or_before(t)
        return self.at(n), self.at(n + 1)

    def between(self, lo: datetime, hi: datetime, *, include_lo: bool, include_hi: bool) -> list[datetime]:
        """Boundaries in the range, ends included as asked."""
        out = []
        t = self.next_at_or_after(lo)
        n = self._index_at_or_before(t)
        while True:
            t = self.at(n)
            if t > hi or (t == hi and not include_hi):
                break
            if t > lo or (t == lo and include_lo):
                out.append(t)
            n += 1
        return out


def utc(t: datetime) -> datetime:
    return t.astimezone(UTC)
