"""``GET`` and ``POST /api/v1/meters/{meterIdOrSlug}/query``: OpenMeter's meter query.

Parsing only: both forms become one :class:`QueryParams` and go to
:func:`pgmeter.query.engine.run_query`. ``advancedMeterGroupByFilters`` is JSON in
the query string and an object in the body (:mod:`pgmeter.query.filters`).

Two deliberate differences, both so that every call of OpenMeter's Python SDK
works: a POST without a body means ``{}`` (the SDK's ``query_csv_post`` can send
no body; OpenMeter answers it 400), and a bare ``filterGroupBy=`` key holding an
object of strings (what the SDK sends for ``filter_group_by``: the dict's Python
repr) filters, where OpenMeter silently ignores it and answers unfiltered usage;
any other bare value is a 400.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pgmeter.api.http import json_body, runtime_of, time_param
from pgmeter.api.meters import find_meter
from pgmeter.api.problems import Problem, bad_request
from pgmeter.meters.store import Meter
from pgmeter.query import customers
from pgmeter.query import filters as string_filters
from pgmeter.query.cache import Body
from pgmeter.query.params import (
    QueryError,
    QueryParams,
    QueryResult,
    QueryRow,
    TooManyRows,
    WindowSize,
    validate,
    zone_name,
)
from pgmeter.runtime import Runtime
from pgmeter.times import format_rfc3339

MAX_LIST = 100  # subject, groupBy and filterCustomerId items, as OpenMeter
# Rows rendered per chunk of a streamed answer: big enough that chunking costs
# nothing measurable, small enough that the event loop runs every few milliseconds.
CHUNK_ROWS = 1000
_DEEP_OBJECT = re.compile(r"^filterGroupBy\[([^\[\]]+)\]$")
# A bare filterGroupBy= object: bounded before it is parsed (literal_eval recurses).
_MAX_BARE_FILTER = 64 * 1024
_SCALARS = ("from", "to", "windowSize", "windowTimeZone", "clientId")


def _window_size(value: Any) -> WindowSize | None:
    if value is None:
        return None
    try:
        return WindowSize(value)
    except ValueError:
        raise bad_request(f"invalid windowSize {value!r}: use MINUTE, HOUR, DAY or MONTH",
                          parameter="windowSize") from None


def _client_id(value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 36):
        raise bad_request("clientId must be a string of 1 to 36 characters", parameter="clientId")


def _strings(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request(f"{name} must be a list of strings", parameter=name)
    if len(value) > MAX_LIST:
        raise bad_request(f"{name} takes at most {MAX_LIST} items", parameter=name)
    return value


def _bare_filter(text: str) -> dict[str, str]:
    """A bare ``filterGroupBy=`` key: what the Python SDK sends for ``filter_group_by``
    (the dict's Python repr, ``{'model': 'x'}``), or the same object as JSON.

    OpenMeter's deepObject binder ignores the bare key and answers unfiltered usage;
    pgmeter applies it, and refuses anything that is not such an object of strings.
    """
    wrong = bad_request("filterGroupBy= must be an object of strings such as {\"model\": \"x\"} "
                        "(or use the deepObject form filterGroupBy[key]=value)", parameter="filterGroupBy")
    if len(text) > _MAX_BARE_FILTER:
        raise wrong
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise wrong from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise wrong
    return value


def params_from_query(request: Request) -> QueryParams:
    scalars: dict[str, str] = {}
    subjects: list[str] = []
    group_by: list[str] = []
    filters: dict[str, list[str]] = {}
    customers: list[str] = []
    for name, value in request.query_params.multi_items():
        if name == "subject":
            subjects.append(value)
        elif name == "groupBy":
            group_by.append(value)
        elif name.startswith("filterGroupBy"):
            match = _DEEP_OBJECT.match(name)
            if match:
                filters.setdefault(match[1], []).append(value)
            elif name == "filterGroupBy":
                for key, item in _bare_filter(value).items():
                    filters.setdefault(key, []).append(item)
            else:
                raise bad_request(f"{name} is not supported; filter with the deepObject form "
                                  "filterGroupBy[key]=value", parameter="filterGroupBy")
        elif name == "filterCustomerId":
            customers.append(value)
        elif name in _SCALARS or name == string_filters.PARAMETER:
            if name in scalars:
                raise bad_request(f"{name} may be given once", parameter=name)
            scalars[name] = value
    for name, items in (("subject", subjects), ("groupBy", group_by), ("filterCustomerId", customers)):
        if len(items) > MAX_LIST:
            raise bad_request(f"{name} takes at most {MAX_LIST} items", parameter=name)
    _client_id(scalars.get("clientId"))
    return QueryParams(
        from_=time_param("from", scalars.get("from")), to=time_param("to", scalars.get("to")),
        window_size=_window_size(scalars.get("windowSize")),
        window_time_zone=zone_name(scalars.get("windowTimeZone")),
        subjects=tuple(subjects), group_by=tuple(group_by),
        filter_group_by={key: tuple(values) for key, values in filters.items()},
        advanced_filters=_advanced(string_filters.parse_json, scalars.get(string_filters.PARAMETER, "")),
        customers=dict.fromkeys(customers, ()),
    )


def _advanced(parse: Any, raw: Any) -> dict[str, string_filters.StringFilter]:
    try:
        return dict(parse(raw))
    except QueryError as exc:
        raise bad_request(str(exc), parameter=exc.parameter) from None


def params_from_body(body: dict[str, Any]) -> QueryParams:
    filters: dict[str, tuple[str, ...]] = {}
    raw_filters = body.get("filterGroupBy")
    if raw_filters is not None:
        if not isinstance(raw_filters, dict):
            raise bad_request("filterGroupBy must be an object of {key: [values]}", parameter="filterGroupBy")
        for key, values in raw_filters.items():
            values = [values] if isinstance(values, str) else values
            items = tuple(_strings(f"filterGroupBy[{key}]", values))
            # OpenMeter drops a key with an empty list (after checking the key).
            filters[key] = items
    zone = body.get("windowTimeZone")
    if zone is not None and not isinstance(zone, str):
        raise bad_request("windowTimeZone must be a string", parameter="windowTimeZone")
    _client_id(body.get("clientId"))
    customers = _strings("filterCustomerId", body.get("filterCustomerId"))
    return QueryParams(
        from_=time_param("from", body.get("from")), to=time_param("to", body.get("to")),
        window_size=_window_size(body.get("windowSize")), window_time_zone=zone_name(zone),
        subjects=tuple(_strings("subject", body.get("subject"))),
        group_by=tuple(_strings("groupBy", body.get("groupBy"))),
        filter_group_by=filters,
        advanced_filters=_advanced(string_filters.parse, body.get(string_filters.PARAMETER)),
        customers=dict.fromkeys(customers, ()),
    )


def wants_csv(request: Request) -> bool:
    """Exactly the media type text/csv (parameters allowed); a list is not parsed."""
    accept = request.headers.get("accept", "")
    return "," not in accept and accept.split(";")[0].strip().lower() == "text/csv"


def json_number(value: Decimal) -> int | float | Decimal:
    """OpenMeter's values are float64; integers print without a decimal point.

    A sum past float64's range stays a Decimal, printed as its exact digits: an
    infinity has no JSON form (it was a 500).
    """
    if value == value.to_integral_value():
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else value


# Starlette's JSONResponse settings.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _value_json(value: Decimal) -> str:
    number = json_number(value)
    return str(number) if isinstance(number, Decimal) else _ENCODER.encode(number)


def _row_json(row: QueryRow) -> str:
    # customerId only on rows grouped by customer (OpenMeter omits the key otherwise).
    customer = "" if row.customer_id is None else f',"customerId":{_ENCODER.encode(row.customer_id)}'
    return (f'{{"value":{_value_json(row.value)},"windowStart":"{format_rfc3339(row.window_start)}",'
            f'"windowEnd":"{format_rfc3339(row.window_end)}","subject":{_ENCODER.encode(row.subject)}{customer},'
            f'"groupBy":{_ENCODER.encode(row.group_by)}}}')


def iter_json(params: QueryParams, result: QueryResult) -> Iterator[bytes]:
    """The JSON body in chunks of :data:`CHUNK_ROWS` rows, byte for byte what
    Starlette's JSONResponse would render for the whole document at once."""
    head: dict[str, Any] = {}
    if params.from_ is not None:
        head["from"] = format_rfc3339(params.from_)
    if params.to is not None:
        head["to"] = format_rfc3339(params.to)
    if params.window_size is not None:
        head["windowSize"] = str(params.window_size)
    opening = _ENCODER.encode(head)[:-1] + ("," if head else "") + '"data":['
    rows = result.rows
    yield opening.encode()
    for start in range(0, len(rows), CHUNK_ROWS):
        part = ",".join(_row_json(row) for row in rows[start:start + CHUNK_ROWS])
        yield (("," if start else "") + part).encode()
    yield b"]}"


def iter_csv(meter: Meter, params: QueryParams, result: QueryResult) -> Iterator[bytes]:
    """OpenMeter's CSV in chunks: window bounds at whole seconds, values printed like Go's %f."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = list(params.meter_keys)
    by_customer = bool(params.customers)
    writer.writerow(["window_start", "window_end", *(["subject"] if params.groups_by_subject else []),
                     *(["customer_id"] if by_customer else []), *keys, "value"])
    rows = result.rows
    for start in range(0, len(rows), CHUNK_ROWS):
        for row in rows[start:start + CHUNK_ROWS]:
            writer.writerow([
                format_rfc3339(row.window_start.replace(microsecond=0)),
                format_rfc3339(row.window_end.replace(microsecond=0)),
                *([row.subject] if params.groups_by_subject else []),
                *([row.customer_id] if by_customer else []),
                *(row.group_by[key] for key in keys),
                f"{float(row.value):f}",
            ])
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.tell():
        yield out.getvalue().encode()


def _response(body: Body, media_type: str, headers: dict[str, str] | None = None) -> Response:
    if isinstance(body, bytes):
        return Response(body, media_type=media_type, headers=headers)
    return StreamingResponse(body, media_type=media_type, headers=headers)


async def _with_customers(runtime: Runtime, meter: Meter, params: QueryParams) -> QueryParams:
    """filterCustomerId's ids (parsed with no subjects yet) resolved to their subjects."""
    if not params.customers:
        return params
    try:
        # On the primary (api_pool): a customer created a moment ago is known, though a
        # standby may not have it yet. One indexed read.
        found = await customers.attribution(runtime.api_pool, meter.namespace, list(params.customers))
    except customers.UnknownCustomer as exc:
        raise Problem(404, str(exc), extensions={"parameter": "filterCustomerId"}) from None
    return dataclasses.replace(params, customers=found)


async def _answer(request: Request, meter: Meter, params: QueryParams) -> Response:
    try:
        # Checked before the cache sees the parameters (it reads the zone, for one).
        validate(params, meter.group_by)
        runtime = runtime_of(request)
        params = await _with_customers(runtime, meter, params)
        cache = runtime.query_cache
        assert cache is not None, "the api role makes the query cache"
        # Read from the standby when one is configured; its lag goes with the answer.
        lag = {"X-Pgmeter-Replica-Lag": f"{runtime.replica_lag:.3f}"} if runtime.read_pool is not None else {}
        if wants_csv(request):
            body = await cache.respond(runtime.query_pool, meter, params, "csv",
                                       lambda result: iter_csv(meter, params, result))
            return _response(body, "text/csv",
                             {"Content-Disposition": f"attachment; filename={meter.slug}.csv", **lag})
        body = await cache.respond(runtime.query_pool, meter, params, "json",
                                   lambda result: iter_json(params, result))
    except TooManyRows as exc:
        raise bad_request(str(exc), limit="queryMaxRows", maxRows=exc.limit) from None
    except QueryError as exc:
        raise bad_request(str(exc), parameter=exc.parameter) from None
    return _response(body, "application/json", lag)


async def query_get(request: Request) -> Response:
    meter = await find_meter(request)
    return await _answer(request, meter, params_from_query(request))


async def query_post(request: Request) -> Response:
    meter = await find_meter(request)
    body = await json_body(request, empty={})  # no body: {} (module docstring)
    return await _answer(request, meter, params_from_body(body))


routes = [
    Route("/api/v1/meters/{meterIdOrSlug}/query", query_get, methods=["GET"]),
    Route("/api/v1/meters/{meterIdOrSlug}/query", query_post, methods=["POST"]),
]
