"""An independent, in-memory answer to meter queries, written from the spec.

Pure Python (``zoneinfo`` for windows, ``Decimal`` for values), sharing no code
with pgmeter: its own JSONPath reader, its own value rules and its own window
arithmetic, straight from the OpenMeter API reference (sections 2.3 and 3). The
oracle tests compare pgmeter's answers with these, query by query.

Value rules, as pgmeter documents them (OpenMeter's, plus its recommended fixes):
- numbers: a JSON number, or a string that Go's ``strconv.ParseFloat(s, 64)`` reads
  without error as a finite value (OpenMeter parses values with it; reference §2.3);
  everything else is skipped. That is Go's float literal syntax - decimal or hex
  with a ``p`` exponent, ``_`` between digits, no spaces, any length - and a
  magnitude that does not round past float64's largest value. The value itself is
  the exact decimal the text spells (pgmeter sums exactly; Go would round to float64).
- group-by values: a string, number or bool as text, else ""
- UNIQUE_COUNT values: a string, number or bool as text; null, missing, objects
  and arrays are excluded
- LATEST: the valid value with the greatest (time at whole seconds, seq)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

FLOAT64_MAX = Decimal("1.7976931348623157e308")
# Go's float literals as strconv.ParseFloat reads them (readFloat + underscoreOK in
# strconv/atof.go): digits may be separated by single underscores; a hex mantissa
# may also start with one right after the prefix, and needs a binary exponent.
_DIGITS = r"[0-9](?:_?[0-9])*"
_HEX_DIGITS = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_GO_DECIMAL = re.compile(rf"[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?\Z")
_GO_HEX = re.compile(rf"[+-]?0[xX](?:_?{_HEX_DIGITS}(?:\.(?:{_HEX_DIGITS})?)?|\.{_HEX_DIGITS})[pP][+-]?{_DIGITS}\Z")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]")
MINUTE = timedelta(minutes=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_path(data: Any, path: str) -> tuple[bool, Any]:
    """(found, value) at a JSONPath of the form $.a.b, $.a[0], $['a']."""
    assert path.startswith("$")
    rest, value = path[1:], data
    while rest:
        match = _STEP.match(rest)
        assert match, f"oracle cannot read {path}"
        rest = rest[match.end():]
        name, index, quoted = match.groups()
        if index is not None:
            if not isinstance(value, list) or int(index) >= len(value):
                return False, None
            value = value[int(index)]
        else:
            key = name if name is not None else quoted
            if not isinstance(value, dict) or key not in value:
                return False, None
            value = value[key]
    return True, value


def _decimal(value: Any) -> Decimal:
    # Generated data uses floats with short reprs; JSON carries exactly that text.
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def number(data: Any, path: str) -> Decimal | None:
    found, value = read_path(data, path)
    if not found or value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = _decimal(value)
    elif isinstance(value, str):
        return go_float(value)
    else:
        return None
    return result if abs(result) <= FLOAT64_MAX else None


def go_float(text: str) -> Decimal | None:
    """The exact value of ``text`` if ``strconv.ParseFloat(text, 64)`` reads it as a finite
    number, else ``None``. Inf and NaN spellings parse in Go but are skipped all the same."""
    plain = text.replace("_", "")
    if _GO_DECIMAL.match(text):
        # Go's ErrRange: the literal rounds past float64's largest value. Python's
        # float() rounds correctly, as Go does; underflow is no error (it gives 0).
        return None if math.isinf(float(plain)) else Decimal(plain)
    if _GO_HEX.match(text):
        try:
            return Decimal(float.fromhex(plain))  # a hex literal rounds to float64 in Go too
        except OverflowError:
            return None
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return format(_decimal(value), "f")
    return None


def group_value(data: Any, path: str) -> str:
    found, value = read_path(data, path)
    return (_text(value) if found else None) or ""


def unique_value(data: Any, path: str) -> str | None:
    found, value = read_path(data, path)
    return _text(value) if found else None


# -- windows ----------------------------------------------------------------------

@cache
def window_start(t: datetime, size: str, zone: ZoneInfo) -> datetime:
    local = t.astimezone(zone)
    if size == "MINUTE":
        start = local.replace(second=0, microsecond=0)
    elif size == "HOUR":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif size == "DAY":
        start = datetime(local.year, local.month, local.day, tzinfo=zone)
    elif size == "MONTH":
        start = datetime(local.year, local.month, 1, tzinfo=zone)
    else:
        raise ValueError(size)
    return start.astimezone(UTC)


def window_end(start: datetime, size: str, zone: ZoneInfo) -> datetime:
    if size == "MINUTE":
        return start + MINUTE
    if size == "HOUR":
        return start + timedelta(hours=1)
    local = start.astimezone(zone)
    if size == "DAY":
        day = local.date() + timedelta(days=1)
    else:
        day = date(local.year + local.month // 12, local.month % 12 + 1, 1)
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


# -- queries ----------------------------------------------------------------------

@dataclass(frozen=True)
class MeterDef:
    slug: str
    aggregation: str
    event_type: str
    value_property: str | None = None
    group_by: dict[str, str] = field(default_factory=dict)
    event_from: datetime | None = None


@dataclass(frozen=True)
class Stored:
    """An event as stored: what the oracle reads."""

    seq: int
    type: str
    subject: str
    time: datetime
    data: Any
    # Memo of values read from data, by (rule, path): thousands of queries read them.
    memo: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def second(self) -> datetime:
        """The event's time in UTC, to the second (what the range bounds compare)."""
        key = ("s", "")
        if key not in self.memo:
            self.memo[key] = _second(self.time)
        return self.memo[key]  # type: ignore[no-any-return]

    def window(self, size: str, zone: ZoneInfo) -> datetime:
        key = ("w", f"{size} {zone.key}")
        if key not in self.memo:
            self.memo[key] = window_start(self.time, size, zone)
        return self.memo[key]  # type: ignore[no-any-return]

    def group(self, path: str) -> str:
        key = ("g", path)
        if key not in self.memo:
            self.memo[key] = group_value(self.data, path)
        return self.memo[key]  # type: ignore[no-any-return]

    def number(self, path: str) -> Decimal | None:
        key = ("n", path)
        if key not in self.memo:
            self.memo[key] = number(self.data, path)
        return self.memo[key]  # type: ignore[no-any-return]

    def unique(self, path: str) -> str | None:
        key = ("u", path)
        if key not in self.memo:
            self.memo[key] = unique_value(self.data, path)
        return self.memo[key]  # type: ignore[no-any-return]


@dataclass
class Query:
    from_: datetime | None = None
    to: datetime | None = None
    window_size: str | None = None
    zone: str = "UTC"
    subjects: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    filter_group_by: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # advancedMeterGroupByFilters as sent: {key: filter object}.
    advanced: dict[str, Any] = field(default_factory=dict)
    # filterCustomerId: customer id -> the subjects attributed to it (key and subjectKeys).
    customers: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    value: Decimal
    window_start: datetime
    window_end: datetime
    subject: str | None
    group_by: tuple[tuple[str, str], ...]
    customer: str | None = None


def _second(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(microsecond=0)


def answer(meter: MeterDef, events: Iterable[Stored], query: Query) -> list[Row]:
    zone = ZoneInfo(query.zone)
    lower = query.from_
    if meter.event_from is not None and (lower is None or lower < meter.event_from):
        lower = meter.event_from
    lo = _second(lower) if lower is not None else None
    hi = _second(query.to) if query.to is not None else None
    by_subject = bool(query.subjects) or "subject" in query.group_by
    keys = [k for k in dict.fromkeys(query.group_by) if k not in ("subject", "customer_id")]
    owner = {subject: cid for cid, subjects in query.customers.items() for subject in subjects}

    groups: dict[tuple[Any, ...], list[Stored]] = defaultdict(list)
    for event in events:
        if event.type != meter.event_type:
            continue
        t = event.second
        if (lo is not None and t < lo) or (hi is not None and t >= hi):
            continue
        if query.subjects and event.subject not in query.subjects:
            continue
        if query.customers and event.subject not in owner:
            continue
        if any(values and event.group(meter.group_by[k]) not in values
               for k, values in query.filter_group_by.items()):
            continue
        if any(string_filter(f, event.group(meter.group_by[k])) is False for k, f in query.advanced.items()):
            continue
        start = event.window(query.window_size, zone) if query.window_size else None
        key = (start, event.subject if by_subject else None, owner.get(event.subject),
               tuple(event.group(meter.group_by[k]) for k in keys))
        groups[key].append(event)

    rows = []
    for (start, subject, customer, values), members in groups.items():
        value = _aggregate(meter, members)
        if value is None:
            continue
        if query.window_size:
            ws, we = start, window_end(start, query.window_size, zone)
        else:
            seconds = [e.second for e in members]
            ws = lower if lower is not None else min(seconds).replace(second=0)
            we = query.to if query.to is not None else max(seconds).replace(second=0) + MINUTE
        rows.append(Row(value, ws, we, subject, tuple(zip(keys, values, strict=False)), customer))
    rows.sort(key=lambda r: (r.window_start, r.subject or "", r.customer or "", tuple(v for _, v in r.group_by)))
    if not rows and not query.window_size and not by_subject and not keys and not query.customers \
            and meter.aggregation in ("COUNT", "UNIQUE_COUNT"):
        rows.append(Row(Decimal(0), lower if lower is not None else EPOCH,
                        query.to if query.to is not None else EPOCH + MINUTE, None, ()))
    return rows


def _aggregate(meter: MeterDef, events: list[Stored]) -> Decimal | None:
    if meter.aggregation == "COUNT":
        return Decimal(len(events))
    assert meter.value_property is not None
    if meter.aggregation == "UNIQUE_COUNT":
        distinct = {e.unique(meter.value_property) for e in events} - {None}
        return Decimal(len(distinct))
    valued = [(e, e.number(meter.value_property)) for e in events]
    valued = [(e, v) for e, v in valued if v is not None]
    if not valued:
        return None
    numbers = [v for _, v in valued]
    if meter.aggregation == "SUM":
        return sum(numbers, Decimal(0))
    if meter.aggregation == "AVG":
        return sum(numbers, Decimal(0)) / len(numbers)
    if meter.aggregation == "MIN":
        return min(numbers)
    if meter.aggregation == "MAX":
        return max(numbers)
    if meter.aggregation == "LATEST":
        return max(valued, key=lambda ev: (ev[0].second, ev[0].seq))[1]
    raise ValueError(meter.aggregation)


# -- advancedMeterGroupByFilters ----------------------------------------------------
#
# OpenMeter's FilterString over a group-by value, written from its documentation and
# the semantics of its ClickHouse query: one operator per object; a null operator is
# absent; an object without one (and an $and/$or whose members are all such) puts
# no condition, and such members are left out of their $and/$or. LIKE patterns:
# % any run, _ one character, a backslash takes the next character literally.
# $ilike lowers ASCII letters only; ordering compares UTF-8 bytes. pgmeter's
# extensions: $exists (value non-empty), $contains/$ncontains (ASCII-case-insensitive
# substring).


def _ascii_lower(text: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def _like_tokens(pattern: str) -> list[tuple[str, str]]:
    tokens, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            tokens.append(("char", pattern[index + 1]))
            index += 2
            continue
        tokens.append(("many", "") if char == "%" else ("one", "") if char == "_" else ("char", char))
        index += 1
    return tokens


def like(value: str, pattern: str) -> bool:
    """SQL LIKE by dynamic programming over (pattern token, value position)."""
    tokens = _like_tokens(pattern)
    reachable = {0}  # positions in value after the tokens so far
    for kind, char in tokens:
        following: set[int] = set()
        for position in reachable:
            if kind == "many":
                following.update(range(position, len(value) + 1))
            elif position < len(value) and (kind == "one" or value[position] == char):
                following.add(position + 1)
        reachable = following
        if not reachable:
            return False
    return len(value) in reachable


def string_filter(f: dict[str, Any], value: str) -> bool | None:
    """Whether ``value`` passes filter ``f``; None when ``f`` puts no condition."""
    present = {op: arg for op, arg in f.items() if arg is not None}
    if not present:
        return None
    (op, arg), = present.items()
    if op in ("$and", "$or"):
        verdicts = [v for v in (string_filter(child, value) for child in arg) if v is not None]
        if not verdicts:
            return None
        return all(verdicts) if op == "$and" else any(verdicts)
    raw = value.encode()
    return {
        "$eq": lambda: value == arg,
        "$ne": lambda: value != arg,
        "$in": lambda: value in arg,
        "$nin": lambda: value not in arg,
        "$like": lambda: like(value, arg),
        "$nlike": lambda: not like(value, arg),
        "$ilike": lambda: like(_ascii_lower(value), _ascii_lower(arg)),
        "$nilike": lambda: not like(_ascii_lower(value), _ascii_lower(arg)),
        "$contains": lambda: _ascii_lower(arg) in _ascii_lower(value),
        "$ncontains": lambda: _ascii_lower(arg) not in _ascii_lower(value),
        "$gt": lambda: raw > arg.encode(),
        "$gte": lambda: raw >= arg.encode(),
        "$lt": lambda: raw < arg.encode(),
        "$lte": lambda: raw <= arg.encode(),
        "$exists": lambda: (value != "") == arg,
    }[op]()
