"""``/api/v1/features``: OpenMeter's features (a key, optionally a meter and its filters).

DELETE archives (irreversible); an archived feature answers 404 and frees its key,
while entitlements built on it keep working.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import namespace_of
from pgmeter.api.http import json_body, runtime_of
from pgmeter.api.problems import Problem
from pgmeter.entitlements import service, store
from pgmeter.entitlements.api import shapes

KEY = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")


def feature_json(feature: store.Feature) -> dict[str, Any]:
    body: dict[str, Any] = {"id": feature.id, "key": feature.key, "name": feature.name}
    if feature.meter_slug is not None:
        body["meterSlug"] = feature.meter_slug
    if feature.filters:
        body["meterGroupByFilters"] = feature.filters
        body["advancedMeterGroupByFilters"] = {k: {"$eq": v} for k, v in feature.filters.items()}
    if feature.metadata is not None:
        body["metadata"] = feature.metadata
    body.update(shapes.times(createdAt=feature.created_at, updatedAt=feature.updated_at,
                             archivedAt=feature.archived_at))
    return body


def _filters(body: dict[str, Any]) -> dict[str, str] | None:
    legacy = body.get("meterGroupByFilters")
    advanced = body.get("advancedMeterGroupByFilters")
    filters: dict[str, str] = {}
    if advanced:
        # Equality filters only ($eq); pgmeter's meter filters are exact matches.
        if not isinstance(advanced, dict) or len(advanced) > 16:
            raise shapes.field_error("advancedMeterGroupByFilters", "must be an object of at most 16 filters")
        for key, value in advanced.items():
            if not isinstance(value, dict) or set(value) != {"$eq"} or not isinstance(value["$eq"], str) \
                    or not value["$eq"] or not shapes.storable(value["$eq"]) or not shapes.storable(key):
                raise shapes.field_error(f"advancedMeterGroupByFilters.{key[:64]}",
                                         "only {\"$eq\": \"value\"} filters are supported")
            filters[key] = value["$eq"]
        return filters
    if legacy is not None:
        if not isinstance(legacy, dict) or len(legacy) > 16:
            raise shapes.field_error("meterGroupByFilters", "must be an object of at most 16 strings")
        for key, value in legacy.items():
            if not isinstance(value, str) or len(value) > 1024 or len(key) > 256 or not shapes.storable(value) \
                    or not shapes.storable(key):
                raise shapes.field_error(f"meterGroupByFilters.{key[:64]}", "must be a string")
            filters[key] = value
    return filters or None


async def create_feature(request: Request) -> Response:
    body = await json_body(request)
    key = shapes.string(body, "key", required=True, max_len=64)
    assert key is not None
    if not KEY.match(key):
        raise shapes.field_error("key", "must match ^[a-z0-9]+(?:_[a-z0-9]+)*$")
    name = shapes.string(body, "name", required=True)
    assert name is not None
    meter_slug = shapes.string(body, "meterSlug", max_len=64)
    unit_cost = body.get("unitCost")
    if unit_cost is not None:
        raise shapes.field_error("unitCost", "is not supported")
    async with runtime_of(request).api_pool.acquire() as conn:
        feature = await service.create_feature(conn, namespace_of(request), key, name, meter_slug,
                                               _filters(body), shapes.metadata(body))
    return JSONResponse(feature_json(feature), status_code=201)


async def list_features(request: Request) -> Response:
    meter_slugs = shapes.strings(request.query_params.getlist("meterSlug"), "meterSlug")
    include_archived = shapes.flag(request, "includeArchived")
    order_by = shapes.choice(request, "orderBy", ["id", "key", "name", "createdAt", "updatedAt"], "key")
    descending = shapes.choice(request, "order", ["ASC", "DESC"], "ASC") == "DESC"
    paged = shapes.single(request, "page") is not None
    page, size = shapes.pagination(request)
    limit = shapes.positive(request, "limit", 100, shapes.MAX_PAGE_SIZE)
    offset = shapes.offset(request)
    if paged:  # page wins over limit/offset, as OpenMeter
        limit, offset = size, (page - 1) * size
    async with runtime_of(request).api_pool.acquire() as conn:
        total, features = await store.list_features(conn, namespace_of(request), meter_slugs=meter_slugs,
                                                    include_archived=include_archived, order_by=order_by,
                                                    descending=descending, limit=limit, offset=offset)
    items = [feature_json(f) for f in features]
    return JSONResponse(shapes.page_body(total, page, size, items) if paged else items)


async def _find(request: Request) -> store.Feature:
    ref = request.path_params["featureId"]
    async with runtime_of(request).api_pool.acquire() as conn:
        feature = await store.live_feature(conn, namespace_of(request), ref)
    if feature is None:
        raise Problem(404, f"feature not found: {ref}")
    return feature


async def get_feature(request: Request) -> Response:
    return JSONResponse(feature_json(await _find(request)))


async def delete_feature(request: Request) -> Response:
    feature = await _find(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        await service.archive_feature(conn, feature)
    return Response(status_code=204)


routes = [
    Route("/api/v1/features", shapes.guarded(create_feature), methods=["POST"]),
    Route("/api/v1/features", shapes.guarded(list_features), methods=["GET"]),
    Route("/api/v1/features/{featureId}", shapes.guarded(get_feature), methods=["GET"]),
    Route("/api/v1/features/{featureId}", shapes.guarded(delete_feature), methods=["DELETE"]),
]
