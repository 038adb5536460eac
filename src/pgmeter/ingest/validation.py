"""Why a stored event does not count for any meter: OpenMeter's ``validationError``.

OpenMeter never rejects an event for its meters at ingest; it stores everything and,
when events are listed, checks each against the current meters with ``ParseEvent``
(openmeter/meter/parse.go). The messages below are that function's, word for word,
because dashboards and support scripts match on them. Values are read with the
jsonb path of the meter's JSONPath (:func:`pgmeter.meters.jsonpath.compile_path`),
so a path means the same thing here as in the SQL that aggregates it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from pgmeter.meters.jsonpath import InvalidJSONPath, compile_path

_MISSING = object()
# strconv.ParseFloat's syntax: decimal (no underscores without a base prefix),
# hexadecimal with a binary exponent, and inf/infinity/nan in any case.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z", re.ASCII)
_HEX = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+\Z", re.ASCII)
_SPECIAL = re.compile(r"[+-]?(?:inf|infinity|nan)\Z", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class MeterRule:
    """What validation needs to know about one active meter."""

    slug: str
    aggregation: str
    event_type: str
    value_property: str | None
    steps: tuple[str, ...] | None  # the compiled value path; None if absent or unusable

    @classmethod
    def of(cls, slug: str, aggregation: str, event_type: str, value_property: str | None) -> MeterRule:
        steps: tuple[str, ...] | None = None
        if value_property:
            try:
                steps = tuple(compile_path(value_property))
            except InvalidJSONPath:
                steps = None
        return cls(slug, aggregation, event_type, value_property, steps)


def parse_go_float(text: str) -> float | None:
    """``strconv.ParseFloat(text, 64)``: the value, or ``None`` where Go returns an error.

    Out-of-range literals (``1e400``) are errors in Go, not infinities.
    """
    if _DECIMAL.match(text):
        value = float(text)
        return None if math.isinf(value) else value
    if _SPECIAL.match(text):
        return float(text)
    if _HEX.match(text):
        try:
            return float.fromhex(text)
        except (OverflowError, ValueError):
            return None
    return None


def lookup(data: Any, steps: tuple[str, ...] | list[str]) -> Any:
    """The value at a jsonb path (``#>`` semantics), or ``_MISSING``."""
    current = data
    for step in steps:
        if isinstance(current, dict):
            if step not in current:
                return _MISSING
            current = current[step]
        elif isinstance(current, list) and step.isdigit():
            index = int(step)
            if index >= len(current):
                return _MISSING
            current = current[index]
        else:
            return _MISSING
    return current


def _go_type(value: Any) -> str:
    # fmt's %T of what encoding/json decodes into an interface{}.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "map[string]interface {}"
    if isinstance(value, list):
        return "[]interface {}"
    return type(value).__name__


def _number_error(value: float) -> str | None:
    if math.isnan(value):
        return "invalid event: value cannot be NaN"
    if math.isinf(value):
        return "invalid event: value cannot be infinity"
    return None


def parse_error(meter: MeterRule, data: Any) -> str | None:
    """``meter.ParseEvent``'s error for this event's data, or ``None`` if the meter can read it."""
    if meter.aggregation == "COUNT":
        return None
    if data is None:
        return "invalid event: null and missing value property"
    if not meter.value_property:
        return "invalid event: non count meter value property is missing"
    value = _MISSING if meter.steps is None else lookup(data, meter.steps)
    if value is _MISSING:
        return f"invalid event: missing value property: {json.dumps(meter.value_property, ensure_ascii=False)}"
    if value is None:
        return "invalid event: value cannot be null"
    if meter.aggregation == "UNIQUE_COUNT":
        return None
    if isinstance(value, str):
        parsed = parse_go_float(value)
        if parsed is None:
            return f"invalid event: value cannot be parsed as float64: {value}"
        return _number_error(parsed)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"invalid event: unsupported value property type: {_go_type(value)}"
    try:
        return _number_error(float(value))
    except OverflowError:
        return f"invalid event: value cannot be parsed as float64: {value}"


def validation_error(event_type: str, data: Any, meters: list[MeterRule]) -> str | None:
    """Every reason the event is skipped, joined by newlines as Go's ``errors.Join``."""
    errors: list[str] = []
    matched = False
    for meter in meters:
        if meter.event_type == event_type:
            matched = True
            error = parse_error(meter, data)
            if error:
                errors.append(error)
    if not matched:
        errors.append(f"no meter found for event type: {event_type}")
    return "\n".join(errors) or None
