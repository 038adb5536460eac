"""Wire shapes of customers, features, entitlements and grants: reading and rendering.

Every input field has a limit checked here and refused with 400 problem+json
naming the field; the rules OpenMeter applies after the door are in
:mod:`pgmeter.entitlements.service`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgmeter.api.http import time_param
from pgmeter.api.problems import Problem, bad_request
from pgmeter.entitlements.periods import interval_iso, interval_name
from pgmeter.entitlements.service import Refused
from pgmeter.times import format_rfc3339

MAX_KEY = 256
MAX_NAME = 256
MAX_DESCRIPTION = 1024
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 1024
MAX_SUBJECT_KEYS = 100
MAX_AMOUNT = Decimal(10) ** 15
MAX_PAGE_SIZE = 1000


def refused(exc: Refused) -> Problem:
    return Problem(exc.status, exc.detail, extensions=exc.extensions or None)


def field_error(name: str, message: str) -> Problem:
    return Problem(400, f"{name}: {message}", extensions={
        "validationErrors": [{"field": name, "message": message, "code": "invalid", "severity": "critical"}]})


def storable(value: str) -> bool:
    """Text Postgres can hold: no NUL, no unpaired surrogates."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_json(value: Any) -> bool:
    """JSON jsonb accepts: storable text and no \u0000 escape."""
    text = json.dumps(value, ensure_ascii=False)
    return storable(text) and "\\u0000" not in text


def string(body: dict[str, Any], name: str, *, required: bool = False, max_len: int = MAX_NAME,
           min_len: int = 1, path: str | None = None) -> str | None:
    value = body.get(name)
    label = path or name
    if value is None:
        if required:
            raise field_error(label, "is required")
        return None
    if not isinstance(value, str):
        raise field_error(label, "must be a string")
    if not storable(value):
        raise field_error(label, "must be valid UTF-8 text without NUL characters")
    if not min_len <= len(value) <= max_len:
        raise field_error(label, f"must be {min_len} to {max_len} characters long")
    return value


def boolean(body: dict[str, Any], name: str, default: bool | None = False) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise field_error(name, "must be a boolean")
    return value


def metadata(body: dict[str, Any], name: str = "metadata") -> dict[str, str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise field_error(name, "must be an object of strings")
    if len(value) > MAX_METADATA_ENTRIES:
        raise field_error(name, f"takes at most {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_KEY or len(item) > MAX_METADATA_VALUE \
                or not storable(key) or not storable(item):
            label = key[:64].encode("utf-8", "replace").decode()
            raise field_error(f"{name}.{label}", f"values must be strings of at most {MAX_METADATA_VALUE} "
                                                    f"characters (keys at most {MAX_KEY})")
    return value


EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)


def bounded(name: str, value: datetime | None) -> datetime | None:
    """Times between 1900 and 3000: every period, expiry and recurrence stays computable."""
    if value is not None and not EARLIEST <= value < LATEST:
        raise field_error(name, "must be between 1900-01-01 and 3000-01-01")
    return value


def timestamp(body: dict[str, Any], name: str, *, required: bool = False) -> datetime | None:
    value = body.get(name)
    if value is None:
        if required:
            raise field_error(name, "is required")
        return None
    return bounded(name, time_param(name, value))


def query_time(request: Request, name: str) -> datetime | None:
    return bounded(name, time_param(name, single(request, name)))


def amount(value: Any, name: str, *, required: bool = True) -> Decimal | None:
    if value is None:
        if required:
            raise field_error(name, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise field_error(name, "must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise field_error(name, "must be a number") from None
    if number < 0:
        raise field_error(name, "must be at least 0")
    if number > MAX_AMOUNT:
        raise field_error(name, f"must be at most {MAX_AMOUNT:.0f}")
    return number


def integer(value: Any, name: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise field_error(name, "must be an integer")
    if not lo <= value <= hi:
        raise field_error(name, f"must be between {lo} and {hi}")
    return int(value)


def obj(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise field_error(name, "must be an object")
    return value


def strings(values: list[str], name: str, max_items: int = 100) -> list[str]:
    if len(values) > max_items:
        raise bad_request(f"{name} takes at most {max_items} items", parameter=name)
    for value in values:
        if not value or len(value) > MAX_KEY or not storable(value):
            raise bad_request(f"{name} items must be 1 to {MAX_KEY} characters", parameter=name)
    return values


def single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise bad_request(f"{name} may be given once", parameter=name)
    return values[0] if values else None


def flag(request: Request, name: str, default: bool = False) -> bool:
    value = single(request, name)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise bad_request(f"{name} must be true or false", parameter=name)
    return value.lower() == "true"


def choice(request: Request, name: str, options: list[str], default: str) -> str:
    value = single(request, name)
    if value is None:
        return default
    if value not in options:
        raise bad_request(f"{name} must be one of {', '.join(options)}", parameter=name)
    return value


def positive(request: Request, name: str, default: int, hi: int | None = None) -> int:
    value = single(request, name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) < 1 or len(value) > 9:
        raise bad_request(f"{name} must be a positive integer", parameter=name)
    if hi is not None and int(value) > hi:
        raise bad_request(f"{name} must be at most {hi}", parameter=name)
    return int(value)


def offset(request: Request, name: str = "offset") -> int:
    value = single(request, name)
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise bad_request(f"{name} must be a non-negative integer of at most 9 digits", parameter=name)
    return int(value)


def pagination(request: Request) -> tuple[int, int]:
    return positive(request, "page", 1), positive(request, "pageSize", 100, MAX_PAGE_SIZE)


def page_body(total: int, page: int, page_size: int, items: list[Any]) -> dict[str, Any]:
    return {"totalCount": total, "page": page, "pageSize": page_size, "items": items}


def number(value: Decimal) -> int | float:
    """float64 on the wire; integers print without a decimal point."""
    return int(value) if value == value.to_integral_value() else float(value)


def period(interval: str, anchor: datetime) -> dict[str, Any]:
    return {"interval": interval_name(interval), "anchor": format_rfc3339(anchor), "intervalISO": interval_iso(interval)}


def times(**values: datetime | None) -> dict[str, str]:
    return {name: format_rfc3339(value) for name, value in values.items() if value is not None}


MAX_PATH_PARAM = 256
MAX_QUERY_VALUE = 1024


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Door checks shared by every route of this room, and refusals as problems.

    Path and query values are text for Postgres: no NUL, bounded length. A path
    parameter that breaks this can name nothing (404); a query value is a 400.
    """
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        for name, value in request.path_params.items():
            if "\x00" in value or len(value) > MAX_PATH_PARAM:
                raise Problem(404, f"{name} names nothing here: at most {MAX_PATH_PARAM} characters, no NUL")
        for name, value in request.query_params.multi_items():
            if "\x00" in value or len(value) > MAX_QUERY_VALUE:
                raise bad_request(f"{name[:64]} must be at most {MAX_QUERY_VALUE} characters without NUL",
                                  parameter=name[:64])
        try:
            return await handler(request)
        except Refused as exc:
            raise refused(exc) from None
    return wrapped
