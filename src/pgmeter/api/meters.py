"""``/api/v1/meters``: OpenMeter's meter CRUD, subjects and group-by values.

Shapes and status codes follow OpenMeter (see the API reference, section 2), with
its recommended fixes: create answers 201 (OpenMeter's code says 200 and breaks
its own SDK), and group-by keys ``subject`` and ``customer_id`` are rejected.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import namespace_of
from pgmeter.api.http import json_body, runtime_of, single_param, time_param
from pgmeter.api.problems import Problem, bad_request
from pgmeter.meters import store
from pgmeter.meters.model import Aggregation, MeterSpec, check_limits
from pgmeter.query.engine import distinct_values
from pgmeter.query.params import TooManyRows
from pgmeter.times import format_rfc3339

# {meterIdOrSlug}: a slug or a ULID, at most 64 characters (OpenMeter's validator).
# OpenMeter's pattern takes a ULID in either case; ids are stored upper case, so a
# lower- or mixed-case one is a valid request that finds nothing (404, as OpenMeter).
ID_OR_SLUG = re.compile(r"\A(?:[a-z0-9]+(?:_[a-z0-9]+)*|[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25})\Z")
MAX_PAGE_SIZE = 1000  # OpenMeter's Pagination.pageSize maximum
GROUP_VALUES_MAX_AGE = timedelta(days=90)
GROUP_VALUES_MAX_SPAN = timedelta(days=30)
GROUP_VALUES_DEFAULT_SPAN = timedelta(hours=24)


def meter_json(meter: store.Meter) -> dict[str, Any]:
    """OpenMeter's ``Meter``: optional fields are omitted when unset."""
    body: dict[str, Any] = {"id": meter.id, "slug": meter.slug, "name": meter.name}
    if meter.description is not None:
        body["description"] = meter.description
    body["aggregation"] = str(meter.aggregation)
    body["eventType"] = meter.event_type
    if meter.event_from is not None:
        body["eventFrom"] = format_rfc3339(meter.event_from)
    if meter.value_property and meter.aggregation is not Aggregation.COUNT:
        body["valueProperty"] = meter.value_property
    if meter.group_by:
        body["groupBy"] = meter.group_by
    body["metadata"] = meter.metadata
    body["annotations"] = meter.annotations
    body["createdAt"] = format_rfc3339(meter.created_at)
    body["updatedAt"] = format_rfc3339(meter.updated_at)
    if meter.deleted_at is not None:
        body["deletedAt"] = format_rfc3339(meter.deleted_at)
    if meter.failure is not None:
        # pgmeter's extension, present only while the refresher sets the meter aside.
        body["pgmeterState"] = {
            "status": "failing", "reason": meter.failure.reason, "since": format_rfc3339(meter.failure.since),
            "nextAttempt": format_rfc3339(meter.failure.next_attempt), "failures": meter.failure.failures}
    return body


def validation_problem(exc: ValidationError) -> Problem:
    errors = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        errors.append({"code": error["type"], "message": message, **({"field": field} if field else {})})
    detail = "; ".join(f"{e['field']}: {e['message']}" if "field" in e else e["message"] for e in errors)
    return Problem(400, detail, extensions={"validationErrors": errors})


def limits_problem(request: Request, spec: MeterSpec) -> Problem | None:
    """A 400 naming each configurable limit (``limits`` settings) the definition breaks."""
    limits = runtime_of(request).settings.limits
    problems = check_limits(spec, group_by_keys=limits.meter_group_by_keys,
                            json_path_bytes=limits.json_path_bytes, json_path_depth=limits.json_path_depth)
    if not problems:
        return None
    errors = [{"code": "limit", "field": field, "message": message} for field, message in problems]
    return Problem(400, "; ".join(f"{field}: {message}" for field, message in problems),
                   extensions={"validationErrors": errors})


def id_or_slug(request: Request) -> str:
    value = request.path_params["meterIdOrSlug"]
    if len(value) > 64 or not ID_OR_SLUG.match(value):
        raise bad_request(f"meterIdOrSlug must be a meter slug or ULID: {value!r}")
    return value


async def find_meter(request: Request, *, active: bool = False) -> store.Meter:
    """The meter named in the path, or a 404 problem. ``active``: deleted is 404 too."""
    key = id_or_slug(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        meter = await store.get(conn, namespace_of(request), key)
    if meter is None or (active and meter.deleted):
        raise Problem(404, f"meter not found: {key}")
    return meter


def page_params(request: Request) -> tuple[int | None, int | None]:
    """``page`` (>= 1) and ``pageSize`` (1 to 1000), as OpenMeter's Pagination checks them."""
    values: list[int | None] = []
    for name in ("page", "pageSize"):
        value = single_param(request, name)
        if value is not None and not (value.isascii() and value.isdigit() and int(value) >= 1):
            raise bad_request(f"{name} must be a positive integer", parameter=name)
        if name == "pageSize" and value is not None and int(value) > MAX_PAGE_SIZE:
            raise bad_request(f"pageSize must be at most {MAX_PAGE_SIZE}", parameter="pageSize")
        values.append(None if value is None else int(value))
    return values[0], values[1]


def _time_param(request: Request, name: str) -> datetime | None:
    return time_param(name, single_param(request, name))


async def list_meters(request: Request) -> Response:
    # An empty value is a wrong value, not the default.
    order = single_param(request, "order")
    order = "ASC" if order is None else order
    if order not in ("ASC", "DESC"):
        raise bad_request("order must be ASC or DESC", parameter="order")
    order_by = single_param(request, "orderBy")
    order_by = "key" if order_by is None else order_by
    if order_by not in store.ORDER_COLUMNS:
        raise bad_request(f"orderBy must be one of {', '.join(store.ORDER_COLUMNS)}", parameter="orderBy")
    include = single_param(request, "includeDeleted")
    include = "false" if include is None else include.lower()
    if include not in ("true", "false"):
        raise bad_request("includeDeleted must be true or false", parameter="includeDeleted")
    # page and pageSize are checked, then ignored: OpenMeter answers one unpaginated array.
    page_params(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        meters = await store.list_meters(conn, namespace_of(request), order_by=order_by,
                                         descending=order == "DESC", include_deleted=include == "true")
    return JSONResponse([meter_json(meter) for meter in meters])


async def create_meter(request: Request) -> Response:
    body = await json_body(request)
    try:
        spec = MeterSpec.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc) from None
    problem = limits_problem(request, spec)
    if problem is not None:
        raise problem
    runtime = runtime_of(request)
    namespace = namespace_of(request)
    async with runtime.api_pool.acquire() as conn:
        try:
            meter = await store.create(conn, namespace, spec,
                                       max_meters=runtime.settings.limits.meters_per_namespace)
        except store.SlugTaken:
            raise Problem(409, f"meter with the same slug already exists: {spec.slug}") from None
        except store.TooManyMeters as exc:
            # 409, not 400: the request is valid, the namespace's state refuses it, and
            # deleting a meter resolves it.
            raise Problem(409, f"namespace {namespace} already has {exc.limit} meters, the most allowed "
                               "(limits.metersPerNamespace); delete one first",
                          extensions={"limit": "metersPerNamespace"}) from None
    return JSONResponse(meter_json(meter), status_code=201,
                        headers={"Location": f"/api/v1/meters/{meter.id}"})


async def get_meter(request: Request) -> Response:
    return JSONResponse(meter_json(await find_meter(request)))


class MeterUpdate(BaseModel):
    """OpenMeter's ``MeterUpdate``; other fields (slug, aggregation...) are immutable
    and ignored, as unknown JSON keys are."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=1024)
    group_by: dict[str, str] | None = Field(default=None, alias="groupBy")
    metadata: dict[str, str] | None = None


def _explicit_nulls(body: dict[str, Any]) -> None:
    """OpenMeter's MeterUpdate: ``name`` is a string of 1 to 256 characters and
    ``description`` and ``groupBy`` are not nullable, so ``""`` or null is a 400, not
    "absent" (only ``metadata`` is nullable)."""
    errors = []
    if "name" in body and (body["name"] is None or body["name"] == ""):
        errors.append(("name", "name must be a string of 1 to 256 characters"))
    for field in ("description", "groupBy"):
        if field in body and body[field] is None:
            errors.append((field, f"{field} must not be null"))
    if errors:
        raise Problem(400, "; ".join(f"{field}: {message}" for field, message in errors),
                      extensions={"validationErrors": [{"code": "invalid", "field": field, "message": message}
                                                       for field, message in errors]})


async def update_meter(request: Request) -> Response:
    meter = await find_meter(request, active=True)
    try:
        body = await json_body(request)
        _explicit_nulls(body)
        update = MeterUpdate.model_validate(body)
        problem = limits_problem(request, store.updated_spec(
            meter, name=update.name, description=update.description, group_by=update.group_by or {},
            metadata=update.metadata))
        if problem is not None:
            raise problem
        async with runtime_of(request).api_pool.acquire() as conn:
            await _guards_allow(request, conn, meter, update.group_by or {})
            # OpenMeter's PUT: groupBy and metadata are replaced (absent clears them),
            # an absent name resets to the slug, an absent description is kept.
            updated = await store.update(
                conn, meter, name=update.name, group_by=update.group_by or {}, metadata=update.metadata,
                description=update.description if update.description is not None else meter.description)
    except ValidationError as exc:
        raise validation_problem(exc) from None
    except LookupError:
        raise Problem(404, f"meter not found: {meter.id}") from None
    return JSONResponse(meter_json(updated))


async def _guards_allow(request: Request, conn: Any, meter: store.Meter, group_by: dict[str, str] | None) -> None:
    """Deletion (``group_by`` None) or a groupBy edit: 409 while something relies on the
    meter (a feature, say), as the guards the rooms registered tell."""
    for guard in runtime_of(request).meter_guards:
        refusal = await guard(conn, meter.id, group_by)
        if refusal is not None:
            raise Problem(409, refusal)


async def delete_meter(request: Request) -> Response:
    meter = await find_meter(request, active=True)
    async with runtime_of(request).api_pool.acquire() as conn:
        await _guards_allow(request, conn, meter, None)
        await store.delete(conn, meter)
    return Response(status_code=204)


async def list_subjects(request: Request) -> Response:
    meter = await find_meter(request)
    start, end = _time_param(request, "from"), _time_param(request, "to")
    if start is not None and end is not None and start >= end:
        raise bad_request("from must be before to", parameter="from")
    return JSONResponse(await _distinct(request, meter, None, start, end))


async def _distinct(request: Request, meter: store.Meter, key: str | None, start: datetime | None,
                    end: datetime | None) -> list[str]:
    runtime = runtime_of(request)
    max_rows = runtime.settings.limits.query_max_rows
    try:
        return await distinct_values(runtime.query_pool, meter, key, start, end, max_rows=max_rows)
    except TooManyRows as exc:
        raise bad_request(str(exc), limit="queryMaxRows", maxRows=exc.limit) from None


async def list_group_by_values(request: Request) -> Response:
    meter = await find_meter(request)
    key = request.path_params["groupByKey"]
    if key not in meter.group_by:
        raise bad_request(f"invalid group by key: {key} is not a group-by key of meter {meter.slug}",
                          parameter="groupByKey")
    start, end = _time_param(request, "from"), _time_param(request, "to")
    now = datetime.now(UTC)
    if start is None and end is None:
        start = now - GROUP_VALUES_DEFAULT_SPAN
    if start is not None and start < now - GROUP_VALUES_MAX_AGE:
        raise bad_request("from must be no more than 90 days ago", parameter="from")
    if start is not None and end is not None:
        if start >= end:
            raise bad_request("from must be before to", parameter="from")
        if end - start > GROUP_VALUES_MAX_SPAN:
            raise bad_request("from and to must be at most 30 days apart", parameter="to")
    return JSONResponse(await _distinct(request, meter, key, start, end))


routes = [
    Route("/api/v1/meters", list_meters, methods=["GET"]),
    Route("/api/v1/meters", create_meter, methods=["POST"]),
    Route("/api/v1/meters/{meterIdOrSlug}", get_meter, methods=["GET"]),
    Route("/api/v1/meters/{meterIdOrSlug}", update_meter, methods=["PUT"]),
    Route("/api/v1/meters/{meterIdOrSlug}", delete_meter, methods=["DELETE"]),
    Route("/api/v1/meters/{meterIdOrSlug}/subjects", list_subjects, methods=["GET"]),
    Route("/api/v1/meters/{meterIdOrSlug}/group-by/{groupByKey}/values", list_group_by_values, methods=["GET"]),
]
