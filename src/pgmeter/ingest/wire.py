"""The JetStream message that carries events from the api to the sink.

One message holds the validated events of one or more ingest requests (group
commit), as compact JSON:

    {"v": 1, "at": <ingested_at, µs since epoch>,
     "events": [[id, source, type, subject, <time, µs since epoch>, <data as JSON text or null>], ...]}

The namespace is the last token of the NATS subject. ``data`` travels as JSON
*text* (as OpenMeter's Kafka payload does): the sink hands it to Postgres as is,
without parsing and re-serialising every event. Both ends live here so the format
has one definition; ``v`` lets a future api publish a format an old sink refuses
(into dead letters) instead of misreading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pgmeter.ingest import jsonfast
from pgmeter.ingest.cloudevents import EventTuple, data_text

VERSION = 1
_HEAD = b'{"v":1,"at":'
_MIDDLE = b',"events":['
_TAIL = b"]}"
# Bytes of a message besides its events; the largest "at" has 17 digits.
ENVELOPE_BYTES = len(_HEAD) + 17 + len(_MIDDLE) + len(_TAIL)


class EventTooLarge(ValueError):
    """One event does not fit in a NATS message."""

    def __init__(self, index: int, size: int, budget: int) -> None:
        super().__init__(f"event {index} is {size} bytes once encoded; a broker message holds at most {budget}")
        self.index = index


def _encode(events: list[EventTuple]) -> bytes:
    # The array's brackets are dropped: fragments are joined with "," into one message.
    # Raises UnicodeEncodeError for unpaired surrogates (see cloudevents.find_unencodable).
    return jsonfast.dumps(events).encode("utf-8")[1:-1]


def encode_chunks(events: list[EventTuple], budget: int, max_events: int) -> list[tuple[bytes, int]]:
    """Encode ``events`` into fragments: ``[(fragment, count)]``, each at most ``budget``
    bytes and ``max_events`` events.

    Usually one fragment for the whole request; a larger request is split so that
    every fragment fits in a message, and a single event that cannot fit raises
    :class:`EventTooLarge`.
    """
    if len(events) <= max_events:
        whole = _encode(events)
        if len(whole) <= budget:
            return [(whole, len(events))]
    chunks: list[tuple[bytes, int]] = []
    current: list[bytes] = []
    size = 0
    for index, event in enumerate(events):
        one = _encode([event])
        if len(one) > budget:
            raise EventTooLarge(index, len(one), budget)
        if current and (size + 1 + len(one) > budget or len(current) >= max_events):
            chunks.append((b",".join(current), len(current)))
            current, size = [], 0
        size += len(one) + (1 if current else 0)
        current.append(one)
    if current:
        chunks.append((b",".join(current), len(current)))
    return chunks


def build_message(ingested_at: int, fragments: list[bytes]) -> bytes:
    return b"".join((_HEAD, str(ingested_at).encode(), _MIDDLE, b",".join(fragments), _TAIL))


@dataclass
class BadItem:
    """Part of a message that cannot be stored: ``item`` is the event index, -1 for all of it."""

    item: int
    reason: str
    payload: bytes


@dataclass
class Decoded:
    ingested_at: int = 0
    # (index in the message, event tuple) for every event that passed the checks.
    events: list[tuple[int, EventTuple]] = field(default_factory=list)
    bad: list[BadItem] = field(default_factory=list)


def quick_check(event: Any) -> str | None:
    """Cheap structural checks on one event; the reason it is unusable, or ``None``.

    The api has validated everything already; this guards against messages that
    did not come from it. What it cannot see cheaply (invalid JSON inside ``data``,
    unpaired surrogates) is found by :func:`strict_check` when Postgres or the
    encoder rejects a batch.
    """
    if type(event) is not list or len(event) != 6:
        return "an event must be an array of 6 fields"
    event_id, source, event_type, subject, when, data = event
    if not (type(event_id) is str and type(source) is str and type(event_type) is str and type(subject) is str
            and event_id and source and event_type and subject):
        return "id, source, type and subject must be non-empty strings"
    if "\x00" in event_id or "\x00" in source or "\x00" in event_type or "\x00" in subject:
        return "id, source, type and subject must not contain NUL"
    if type(when) is not int:
        return "time must be an integer (microseconds since the epoch)"
    if data is not None and not (type(data) is str and data[:1] == "{" and data[-1:] == "}"):
        return "data must be a JSON object as text, or null"
    return None


def strict_check(event: EventTuple) -> str | None:
    """Everything Postgres would reject, checked the slow way (used only to isolate)."""
    for name, value in zip(("id", "source", "type", "subject"), event[:4], strict=False):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} contains an unpaired UTF-16 surrogate"
    if event[5] is not None:
        try:
            data = json.loads(event[5])
        except ValueError as exc:
            return f"data is not valid JSON: {exc}"
        if not isinstance(data, dict):
            return "data is not a JSON object"
        try:
            data_text(data)
        except UnicodeEncodeError:
            return "data contains an unpaired UTF-16 surrogate"
        except ValueError as exc:
            return f"data {exc}"
    return None


class BadMessage(ValueError):
    """The message as a whole is unusable (dead-lettered as item -1)."""


def decode_envelope(payload: bytes) -> tuple[int, list[Any]]:
    """``(ingested_at, raw events)`` of a message; raises :class:`BadMessage`.

    Each raw event still needs :func:`quick_check`.
    """
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"message is not valid JSON: {exc}") from None
    if type(message) is not dict or message.get("v") != VERSION:
        raise BadMessage(f"message is not a pgmeter v{VERSION} event batch")
    at, events = message.get("at"), message.get("events")
    if type(at) is not int or at <= 0 or type(events) is not list:
        raise BadMessage("message needs an integer \"at\" and an \"events\" array")
    return at, events


def decode(payload: bytes) -> Decoded:
    """Read one message; whatever cannot be used ends up in ``bad`` with the reason."""
    result = Decoded()
    try:
        result.ingested_at, events = decode_envelope(payload)
    except BadMessage as exc:
        result.bad.append(BadItem(-1, str(exc), payload))
        return result
    for index, event in enumerate(events):
        reason = quick_check(event)
        if reason is None:
            result.events.append((index, tuple(event)))
        else:
            result.bad.append(BadItem(index, reason, item_payload(event)))
    return result


def item_payload(event: Any) -> bytes:
    """The bytes kept in dead_letters for one event of a message."""
    try:
        return json.dumps(event, ensure_ascii=False).encode("utf-8", "backslashreplace")
    except (TypeError, ValueError):
        return repr(event).encode("utf-8", "backslashreplace")
