"""Reading CloudEvents the way OpenMeter's ingest endpoint does.

OpenMeter validates the body against its OpenAPI schema and then decodes it with the
CloudEvents Go SDK; a request is accepted only if every event in it is valid. This
module reproduces those rules in one pass over the parsed JSON, collecting every
problem (with the event's index and the field) instead of stopping at the first,
so a producer sees everything that is wrong with a batch in one answer.

It sits on the ingest hot path, so it is plain Python over dicts (no model layer)
and produces the compact tuples the JetStream message carries (see ``wire``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pgmeter.ingest import jsonfast
from pgmeter.ingest.limits import TEXT_FIELDS, EventLimits
from pgmeter.times import parse_rfc3339

# OpenMeter's three content types; the media type is compared without parameters.
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
CONTENT_TYPES = frozenset({CLOUDEVENT, CLOUDEVENTS_BATCH, JSON})

SPEC_VERSIONS = frozenset({"1.0", "0.3"})

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)

# An escaped NUL in JSON text that is not itself an escaped backslash followed by "u0000".
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# What the fast path needs from the limits, unpacked once per request: the character
# counts under which id, source, type and subject are surely within their byte
# limits (a quarter of them: UTF-8 takes at most 4 bytes a character), and the
# accepted event times [lo, hi] in microseconds.
Door = tuple[int, int, int, int, int, int]


def door(limits: EventLimits, now: int) -> Door:
    lo, hi = limits.window(now)
    return (limits.id_bytes // 4, limits.source_bytes // 4, limits.type_bytes // 4,
            limits.subject_bytes // 4, lo, hi)


# One validated event as it travels to the sink:
# (id, source, type, subject, time in microseconds since the Unix epoch, data as JSON text or None)
EventTuple = tuple[str, str, str, str, int, str | None]


@dataclass(frozen=True)
class FieldError:
    """One problem with one event: reported in ``extensions.validationErrors``."""

    index: int
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


class BodyError(ValueError):
    """The body as a whole is unusable (bad JSON, wrong top-level shape, no events)."""


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    if content_type in CONTENT_TYPES:
        return content_type
    return (content_type or "").split(";", 1)[0].strip().lower()


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and jsonb) does not.
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with options constructs a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_body(body: bytes) -> Any:
    """Parse strict JSON (UTF-8, as RFC 8259 requires); raise :class:`BodyError` with a readable reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("invalid event: the request body is not valid UTF-8") from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise BodyError("invalid event: the request body is nested too deeply") from None
    except ValueError as exc:
        if not text.strip():
            raise BodyError("invalid event: the request body is empty") from None
        raise BodyError(f"invalid event: malformed JSON: {exc}") from None


def events_of(media: str, parsed: Any) -> list[Any]:
    """The list of raw events the body holds for ``media``, following OpenMeter.

    ``application/json`` takes one event or an array, and an empty array (or anything
    that is neither) is "no events found"; the batch type takes an array and accepts
    an empty one; the single type takes exactly one object.
    """
    if media == CLOUDEVENT:
        if not isinstance(parsed, dict):
            raise BodyError("invalid event: application/cloudevents+json takes one CloudEvent "
                            "(a JSON object)")
        return [parsed]
    if media == CLOUDEVENTS_BATCH:
        if not isinstance(parsed, list):
            raise BodyError("invalid event: application/cloudevents-batch+json takes a JSON array "
                            "of CloudEvents")
        return parsed
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list) and parsed:
        return parsed
    raise BodyError("invalid event: no events found")


def parse_time(value: str) -> int:
    """RFC 3339 (any offset, any fractional digits) -> microseconds since the epoch, UTC.

    Digits beyond microseconds are dropped (truncated, as Go truncates to seconds).
    Raises ``ValueError`` for anything else (see :func:`pgmeter.times.parse_rfc3339`).
    """
    return (parse_rfc3339(value) - EPOCH) // ONE_MICROSECOND


def now_micros() -> int:
    return (datetime.now(UTC) - EPOCH) // ONE_MICROSECOND


def micros_to_datetime(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def _check_string(event: dict[str, Any], name: str, index: int, errors: list[FieldError]) -> str:
    value = event.get(name)
    if value is None:
        errors.append(FieldError(index, name, "is required"))
    elif not isinstance(value, str):
        errors.append(FieldError(index, name, f"must be a string, not {_json_type(value)}"))
    elif not value:
        errors.append(FieldError(index, name, "must not be empty"))
    elif "\x00" in value:
        errors.append(FieldError(index, name, "must not contain NUL characters"))
    else:
        return value
    return ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def data_text(data: dict[str, Any]) -> str:
    """The JSON text stored for ``data``; raises ``ValueError`` for what jsonb cannot hold."""
    # ensure_ascii=False keeps the text short; lone surrogates then fail in encode().
    text = jsonfast.dumps(data)
    text.encode("utf-8")
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise ValueError("must not contain NUL characters (\\u0000); PostgreSQL cannot store them")
    return text


# An absolute URI (RFC 3986): a scheme, then no spaces or control characters, and
# every % starting an escape. OpenMeter's document says ``format: uri``.
_URI = re.compile(r"\A[A-Za-z][A-Za-z0-9+.\-]*:[^\x00-\x20\x7f]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def is_uri(text: str) -> bool:
    """Whether ``dataschema`` is a URI; refused ones are 400s at the door."""
    return bool(_URI.match(text)) and not _BAD_ESCAPE.search(text)


def _fast(event: dict[str, Any], now: int, bounds: Door) -> EventTuple | None:
    """The common case, checked with as little work as possible; ``None`` means "look closer".

    Strings are not checked for unpaired surrogates here: the request is encoded to
    UTF-8 as one piece before publishing, and only if that fails is each event
    checked (:func:`find_unencodable`). Lengths are compared in characters only: a
    string longer than a quarter of its byte limit goes the slow way, which encodes it.
    """
    get = event.get
    event_id, source, event_type, subject = get("id"), get("source"), get("type"), get("subject")
    if not (type(event_id) is str and type(source) is str and type(event_type) is str and type(subject) is str
            and event_id and source and event_type and subject):
        return None
    spec = get("specversion")
    if not (spec == "1.0" or spec == "0.3") or type(spec) is not str:
        return None
    if "\x00" in event_id or "\x00" in source or "\x00" in event_type or "\x00" in subject:
        return None
    id_chars, source_chars, type_chars, subject_chars, lo, hi = bounds
    if (len(event_id) > id_chars or len(source) > source_chars or len(event_type) > type_chars
            or len(subject) > subject_chars):
        return None
    raw_time = get("time")
    if raw_time is None:
        time = now
    elif type(raw_time) is str:
        try:
            time = parse_time(raw_time)
        except ValueError:
            return None
        if not lo <= time <= hi:
            return None
    else:
        return None
    content_type = get("datacontenttype", JSON)
    if content_type != JSON:
        return None
    schema = get("dataschema")
    if schema is not None and (type(schema) is not str or not is_uri(schema)):
        return None
    data = get("data")
    if data is None:
        return (event_id, source, event_type, subject, time, None)
    if type(data) is not dict:
        return None
    try:
        text = jsonfast.dumps(data)
    except ValueError:
        return None
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        return None
    return (event_id, source, event_type, subject, time, text)


def validate_event(event: Any, index: int, now: int, errors: list[FieldError], limits: EventLimits,
                   bounds: Door | None = None) -> EventTuple | None:
    """Check one raw event; append its problems to ``errors`` or return its tuple.

    ``now`` is when the request was received (microseconds): an event without a time
    gets it, and the accepted time window is counted from it. ``bounds`` is
    ``door(limits, now)``, passed in by :func:`validate_events` so a batch builds it once.
    """
    if bounds is None:
        bounds = door(limits, now)
    if type(event) is dict:
        fast = _fast(event, now, bounds)
        if fast is not None:
            return fast
    if not isinstance(event, dict):
        errors.append(FieldError(index, "", f"an event must be a JSON object, not {_json_type(event)}"))
        return None
    before = len(errors)
    event_id = _check_string(event, "id", index, errors)
    source = _check_string(event, "source", index, errors)
    spec = _check_string(event, "specversion", index, errors)
    if spec and spec not in SPEC_VERSIONS:
        errors.append(FieldError(index, "specversion", f"unsupported CloudEvents version {spec!r}; "
                                 "use \"1.0\""))
    event_type = _check_string(event, "type", index, errors)
    subject = _check_string(event, "subject", index, errors)
    for name, value in zip(TEXT_FIELDS, (event_id, source, event_type, subject), strict=True):
        too_long = limits.check_text(name, value) if value else None
        if too_long:
            errors.append(FieldError(index, name, too_long))

    raw_time = event.get("time")
    if raw_time is None:
        time = now
    elif not isinstance(raw_time, str):
        errors.append(FieldError(index, "time", f"must be an RFC 3339 string, not {_json_type(raw_time)}"))
        time = 0
    else:
        try:
            time = parse_time(raw_time)
        except ValueError as exc:
            errors.append(FieldError(index, "time", str(exc)))
            time = 0
        else:
            outside = limits.check_time(time, now)
            if outside:
                errors.append(FieldError(index, "time", outside))

    # Absent is application/json; an explicit null is refused, as OpenMeter's
    # CloudEvents decoder does.
    content_type = event.get("datacontenttype", JSON)
    if not isinstance(content_type, str) or media_type(content_type) != JSON:
        errors.append(FieldError(index, "datacontenttype",
                                 f"must be application/json, not {json.dumps(content_type)}"))
    schema = event.get("dataschema")
    if schema is not None and not isinstance(schema, str):
        errors.append(FieldError(index, "dataschema", f"must be a URI string, not {_json_type(schema)}"))
    elif schema is not None and not is_uri(schema):
        errors.append(FieldError(index, "dataschema", f"must be a URI (scheme:rest, RFC 3986), not {schema!r}"[:300]))

    data = event.get("data")
    text: str | None = None
    if data is not None:
        if not isinstance(data, dict):
            errors.append(FieldError(index, "data", f"must be a JSON object or null, not {_json_type(data)}"))
        else:
            try:
                text = data_text(data)
            except UnicodeEncodeError:
                errors.append(FieldError(index, "data", "contains an unpaired UTF-16 surrogate"))
            except ValueError as exc:
                errors.append(FieldError(index, "data", str(exc)))
    if len(errors) != before:
        return None
    return (event_id, source, event_type, subject, time, text)


def find_unencodable(events: list[EventTuple]) -> list[FieldError]:
    """The fields that cannot be encoded as UTF-8 (unpaired surrogates from ``\\udXXX`` escapes)."""
    errors: list[FieldError] = []
    names = ("id", "source", "type", "subject")
    for index, event in enumerate(events):
        for name, value in zip(names, event[:4], strict=False):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                errors.append(FieldError(index, name, "contains an unpaired UTF-16 surrogate"))
        if event[5] is not None:
            try:
                event[5].encode("utf-8")
            except UnicodeEncodeError:
                errors.append(FieldError(index, "data", "contains an unpaired UTF-16 surrogate"))
    return errors


def validate_events(raw: list[Any], limits: EventLimits,
                    now: int | None = None) -> tuple[list[EventTuple], list[FieldError]]:
    """Validate every event; the request is accepted only when ``errors`` is empty.

    ``now`` defaults to the current time: the moment the request was received.
    """
    now = now_micros() if now is None else now
    bounds = door(limits, now)
    errors: list[FieldError] = []
    valid: list[EventTuple] = []
    for index, event in enumerate(raw):
        checked = validate_event(event, index, now, errors, limits, bounds)
        if checked is not None:
            valid.append(checked)
    return valid, errors


def describe(errors: list[FieldError], total: int, limit: int = 10) -> str:
    """A one-line ``detail`` naming each bad event and field (the first ``limit`` of them)."""
    bad = len({error.index for error in errors})
    parts = [f"event {e.index}: {e.field + ' ' if e.field else ''}{e.message}" for e in errors[:limit]]
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    noun = "event" if total == 1 else "events"
    return f"invalid event: {bad} of {total} {noun} invalid: " + "; ".join(parts) + more
