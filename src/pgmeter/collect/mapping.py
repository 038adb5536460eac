"""Source record -> CloudEvent(s): a jq program, then the api's own validation.

Why jq: it is the JSON transform people already write in shells and CI, and the `jq`
package binds the real libjq (maintained, released 2026), so a mapping means exactly
what it means on the command line. JSONata's Python ports are young or wrap another
runtime; Bloblang (OpenMeter's collector) exists only in Go.

The program gets the source record as ``.`` and the source's deterministic id as
``$id`` (see :mod:`pgmeter.collect.ids`); it may emit one object, several, an array of
objects, or nothing (``empty``: the record is skipped). Defaults filled after the
program: ``specversion`` "1.0", ``id`` the deterministic id (plus ``-<n>`` for the n-th
event past the first of one record), ``source`` the pipeline's source name.

Every result is then checked exactly as the api checks it
(:func:`pgmeter.ingest.cloudevents.validate_event`); one that fails goes to the
buffer's dead letters with the reason and never blocks the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jq

from pgmeter.collect.buffer import Rejected
from pgmeter.ingest import cloudevents, jsonfast
from pgmeter.ingest.limits import EventLimits


@dataclass
class Mapped:
    events: list[str]  # valid CloudEvents as JSON text, each with an explicit time
    rejected: list[Rejected]


class MappingError(ValueError):
    """The jq program does not compile."""


class Mapping:
    def __init__(self, program: str | None, source: str, limits: EventLimits) -> None:
        self.program = program
        self.source = source
        self.limits = limits
        self._compiled: Any = None
        if program:
            try:
                # Alone first, so an error's line and column are the program's own ($id declared).
                jq.compile(program, args={"id": ""})
                # $id without recompiling per record: the input is [record, id].
                self._compiled = jq.compile(f". as [$__record, $id] | $__record | ({program}\n)")
            except ValueError as exc:
                raise MappingError("mapping does not compile: " + " ".join(str(exc).split())) from None

    def apply(self, record: Any, record_id: str, now: int | None = None) -> Mapped:
        """Map one source record whose deterministic id is ``record_id``."""
        out = Mapped([], [])
        if self._compiled is None:
            results: list[Any] = [record]
        else:
            try:
                results = self._compiled.input_value([record, record_id]).all()
            except ValueError as exc:
                text = _text(record)
                out.rejected.append(Rejected(text, f"mapping failed: {exc}", text, record_id))
                return out
        flat: list[Any] = []
        for result in results:
            flat.extend(result if isinstance(result, list) else [result])
        now = cloudevents.now_micros() if now is None else now
        for n, event in enumerate(flat):
            self.check(event, record_id if n == 0 else f"{record_id}-{n}", now, out)
        if out.rejected:  # kept with the record, so a fixed mapping can take it again
            text = _text(record)
            out.rejected = [r._replace(record=text, record_id=record_id) for r in out.rejected]
        return out

    def check(self, event: Any, default_id: str, now: int, out: Mapped) -> None:
        """Fill defaults, validate as the api does, and file the result in ``out``."""
        if isinstance(event, dict):
            event.setdefault("specversion", "1.0")
            event.setdefault("id", default_id)
            event.setdefault("source", self.source)
        errors: list[cloudevents.FieldError] = []
        checked = cloudevents.validate_event(event, 0, now, errors, self.limits)
        if checked is None:
            reason = "; ".join(f"{e.field + ' ' if e.field else ''}{e.message}" for e in errors)
            out.rejected.append(Rejected(_text(event), f"invalid event: {reason}"))
            return
        out.events.append(event_text(event, checked[4]))


def event_text(event: dict[str, Any], time_micros: int) -> str:
    """The event as buffered: with an explicit time (an event without one gets the moment
    the collector took it, not the moment it is finally delivered)."""
    if "time" not in event:
        event = {**event, "time": rfc3339(time_micros)}
    return jsonfast.dumps(event)  # validated: no NaN, no unpaired surrogates


def rfc3339(micros: int) -> str:
    when = cloudevents.micros_to_datetime(micros)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}Z"


def _text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        return repr(value)
