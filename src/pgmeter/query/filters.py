"""OpenMeter's string filter language (``advancedMeterGroupByFilters``), parsed and compiled to SQL.

A filter is one JSON object with at most one operator: ``$eq $ne $gt $gte $lt $lte``
take a string, ``$in $nin`` a list of strings, ``$like $nlike $ilike $nilike`` a SQL
LIKE pattern (``%`` any run, ``_`` one character, ``\\`` escapes the next character),
``$and $or`` a list of filters. Rules as OpenMeter's ``pkg/filter.FilterString`` and
its ClickHouse meter query define them:

- more than one operator in an object is "filter is invalid: multiple operators are
  set"; an empty string anywhere is "filter is invalid: format mismatch";
- an operator whose value is JSON null counts as absent, and an object without an
  operator filters nothing (so does an ``$and``/``$or`` whose members all filter
  nothing; such members are dropped from the list, they do not match everything);
- ``$ilike``/``$nilike`` compare ASCII-lowercased text (ClickHouse's ``LOWER``),
  ``$gt``... compare bytes (UTF-8 order), equality is exact.

pgmeter also takes ``$exists`` (a boolean: the group-by value is not / is the empty
string that a missing property yields), ``$contains`` and ``$ncontains`` (a
case-insensitive substring), which OpenMeter's internal filter has but its v1 API
silently drops; any other key is refused rather than ignored, because an ignored
operator means silently unfiltered usage. ``$in: []`` matches nothing and
``$nin: []`` everything.

Values are bind parameters; only fixed fragments reach the SQL text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgmeter.query.params import QueryError, check_text

PARAMETER = "advancedMeterGroupByFilters"
STRING_OPS = frozenset({"$eq", "$ne", "$like", "$nlike", "$ilike", "$nilike", "$contains", "$ncontains",
                        "$gt", "$gte", "$lt", "$lte"})
LIST_OPS = frozenset({"$in", "$nin"})
NESTED_OPS = frozenset({"$and", "$or"})
OPERATORS = STRING_OPS | LIST_OPS | NESTED_OPS | {"$exists"}
LIKE_OPS = frozenset({"$like", "$nlike", "$ilike", "$nilike"})
# Bounds at the door (docs/limits.md): a filter is a small expression, not a program.
MAX_DEPTH = 8          # nesting of $and/$or
MAX_TERMS = 1000       # operators plus list items over all keys of one query
MAX_VALUE_CHARS = 1000  # one string value or pattern


@dataclass(frozen=True)
class StringFilter:
    """One parsed filter object: ``op`` None means it filters nothing."""

    op: str | None = None
    value: Any = None  # str, tuple[str, ...], bool, or tuple[StringFilter, ...]

    def canonical(self) -> Any:
        """A JSON-able form, equal for equal filters (the cache key)."""
        if self.op is None:
            return {}
        if self.op in NESTED_OPS:
            return {self.op: [child.canonical() for child in self.value]}
        return {self.op: list(self.value) if isinstance(self.value, tuple) else self.value}


def _error(key: str, message: str) -> QueryError:
    return QueryError(PARAMETER, f"invalid filter for group by {key}: {message}")


class _Budget:
    def __init__(self) -> None:
        self.terms = 0

    def spend(self, key: str, n: int = 1) -> None:
        self.terms += n
        if self.terms > MAX_TERMS:
            raise QueryError(PARAMETER, f"{PARAMETER} has more than {MAX_TERMS} operators and values")


def _string(key: str, op: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(key, f"{op} takes a string")
    if len(value) > MAX_VALUE_CHARS:
        raise _error(key, f"{op} value is longer than {MAX_VALUE_CHARS} characters")
    check_text(PARAMETER, value)
    return value


def _check_pattern(key: str, op: str, pattern: str) -> None:
    # Postgres refuses a pattern that ends in a lone escape; say so instead of a 500.
    index = 0
    while index < len(pattern):
        if pattern[index] == "\\":
            if index + 1 == len(pattern):
                raise _error(key, f"{op} pattern must not end with the escape character \\")
            index += 1
        index += 1


def _parse(key: str, raw: Any, depth: int, budget: _Budget) -> StringFilter:
    if not isinstance(raw, dict):
        raise _error(key, "a filter must be an object such as {\"$eq\": \"value\"}")
    unknown = sorted(name for name in raw if name not in OPERATORS)
    if unknown:
        raise _error(key, f"unknown operator {unknown[0]!r} (use one of {', '.join(sorted(OPERATORS))})")
    present = {name: value for name, value in raw.items() if value is not None}
    if len(present) > 1:
        raise _error(key, "filter is invalid: multiple operators are set")
    if not present:
        return StringFilter()
    (op, value), = present.items()
    budget.spend(key)
    if op == "$exists":
        if not isinstance(value, bool):
            raise _error(key, "$exists takes a boolean")
        return StringFilter(op, value)
    if op in STRING_OPS:
        text = _string(key, op, value)
        if text == "":
            raise _error(key, "filter is invalid: format mismatch")
        if op in LIKE_OPS:
            _check_pattern(key, op, text)
        return StringFilter(op, text)
    if not isinstance(value, list):
        raise _error(key, f"{op} takes a list")
    if op in LIST_OPS:
        budget.spend(key, len(value))
        items = tuple(_string(key, op, item) for item in value)
        if "" in items:
            raise _error(key, "filter is invalid: format mismatch")
        return StringFilter(op, items)
    if depth >= MAX_DEPTH:
        raise _error(key, f"filter complexity exceeds maximum allowed depth ({MAX_DEPTH})")
    return StringFilter(op, tuple(_parse(key, child, depth + 1, budget) for child in value))


def parse(raw: Any) -> dict[str, StringFilter]:
    """``{key: filter}`` from the decoded JSON object; raises :class:`QueryError`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise QueryError(PARAMETER, f"{PARAMETER} must be an object of {{groupByKey: filter}}")
    budget = _Budget()
    return {key: _parse(key, value, 0, budget) for key, value in raw.items()}


def parse_json(text: str) -> dict[str, StringFilter]:
    """The GET form: the JSON object as a string (an empty string is no filter)."""
    if text == "":
        return {}
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise QueryError(PARAMETER, f"{PARAMETER} must be a JSON object") from None
    return parse(raw)


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def compile_sql(f: StringFilter, column: str, param: Callable[[Any, str], str]) -> str | None:
    """A boolean SQL expression over ``column`` (a text expression, never NULL), or
    None when the filter filters nothing. ``param(value, cast)`` binds a value."""
    op, value = f.op, f.value
    lowered = f"lower({column} COLLATE \"C\")"  # ASCII-only, as ClickHouse's LOWER
    if op is None:
        return None
    if op == "$eq":
        return f"{column} = {param(value, 'text')}"
    if op == "$ne":
        return f"{column} <> {param(value, 'text')}"
    if op == "$exists":
        return f"{column} <> ''" if value else f"{column} = ''"
    if op == "$in":
        return f"{column} = ANY({param(list(value), 'text[]')})"
    if op == "$nin":
        return f"NOT ({column} = ANY({param(list(value), 'text[]')}))"
    if op == "$like":
        return f"{column} LIKE {param(value, 'text')}"
    if op == "$nlike":
        return f"{column} NOT LIKE {param(value, 'text')}"
    if op in ("$ilike", "$nilike", "$contains", "$ncontains"):
        pattern = value if op in ("$ilike", "$nilike") else f"%{_escape_like(value)}%"
        negate = "NOT " if op in ("$nilike", "$ncontains") else ""
        return f"{lowered} {negate}LIKE lower({param(pattern, 'text')} COLLATE \"C\")"
    if op in ("$gt", "$gte", "$lt", "$lte"):
        symbol = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
        return f"{column} COLLATE \"C\" {symbol} {param(value, 'text')}"
    parts = [part for part in (compile_sql(child, column, param) for child in value) if part is not None]
    if not parts:
        return None
    return "(" + (" AND " if op == "$and" else " OR ").join(parts) + ")"
