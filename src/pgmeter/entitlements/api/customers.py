"""``/api/v1/customers`` and the deprecated ``/api/v1/subjects``, as OpenMeter serves them.

A customer's usage is the events whose subject is its key or one of its
``usageAttribution.subjectKeys``; a subject belongs to at most one live customer.
Deletes are soft: a deleted customer is still found by id (with ``deletedAt``),
never by key, and refuses updates and a second delete with 412.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import namespace_of
from pgmeter.api.http import json_body, runtime_of
from pgmeter.api.problems import Problem, bad_request
from pgmeter.entitlements import balance, service, store
from pgmeter.entitlements.api import shapes
from pgmeter.entitlements.api.entitlements import V1_ADMIN, at_param, customer_of_path, value_json, values_now
from pgmeter.meters.ulid import new_ulid

CURRENCY = re.compile(r"^[A-Z]{3}$")
# ISO 4217 codes that are not fiat money (precious metals, testing, SDRs, fund units).
NON_FIAT = {"XAU", "XAG", "XPT", "XPD", "XTS", "XXX", "XDR", "XBA", "XBB", "XBC", "XBD", "XSU", "XUA"}
ADDRESS_FIELDS = ("country", "postalCode", "state", "city", "line1", "line2", "phoneNumber")


def customer_json(customer: store.Customer) -> dict[str, Any]:
    body: dict[str, Any] = {"id": customer.id, "name": customer.name}
    if customer.description is not None:
        body["description"] = customer.description
    if customer.key is not None:
        body["key"] = customer.key
    body["usageAttribution"] = {"subjectKeys": customer.subject_keys}
    for name, value in (("primaryEmail", customer.primary_email), ("currency", customer.currency),
                        ("billingAddress", customer.billing_address), ("metadata", customer.metadata)):
        if value is not None:
            body[name] = value
    body.update(shapes.times(createdAt=customer.created_at, updatedAt=customer.updated_at,
                             deletedAt=customer.deleted_at))
    return body


def customer_fields(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    if "key" in body and body["key"] == "":
        raise shapes.field_error("key", "key cannot be empty")
    fields: dict[str, Any] = {
        "name": shapes.string(body, "name", required=True, max_len=shapes.MAX_NAME),
        "key": shapes.string(body, "key", max_len=shapes.MAX_KEY),
        "description": shapes.string(body, "description", max_len=shapes.MAX_DESCRIPTION, min_len=0),
        "primary_email": shapes.string(body, "primaryEmail", max_len=shapes.MAX_NAME),
        "metadata": shapes.metadata(body),
    }
    currency = shapes.string(body, "currency", max_len=3)
    if currency is not None and (not CURRENCY.match(currency) or currency in NON_FIAT):
        raise shapes.field_error("currency", f"customer currency \"{currency}\" must be fiat")
    fields["currency"] = currency
    address = shapes.obj(body, "billingAddress")
    if address is not None:
        for name, value in address.items():
            if name not in ADDRESS_FIELDS or not isinstance(value, str) or len(value) > 256 \
                    or not shapes.storable(value):
                raise shapes.field_error(f"billingAddress.{name[:64]}", "unknown field or not a string of at most "
                                                                        "256 characters")
    fields["billing_address"] = address
    attribution = shapes.obj(body, "usageAttribution") or {}
    keys = attribution.get("subjectKeys", [])
    if keys is None:
        keys = []
    if not isinstance(keys, list) or len(keys) > shapes.MAX_SUBJECT_KEYS:
        raise shapes.field_error("usageAttribution.subjectKeys",
                                 f"must be a list of at most {shapes.MAX_SUBJECT_KEYS} strings")
    for key in keys:
        if not isinstance(key, str) or not 1 <= len(key) <= shapes.MAX_KEY or not shapes.storable(key):
            raise shapes.field_error("usageAttribution.subjectKeys",
                                     f"subject key must be at least 1 character: {key!r}")
    if fields["key"] is None and not keys:
        raise shapes.field_error("key", "either key or usageAttribution.subjectKeys must be provided")
    return fields, sorted(set(keys))


async def create_customer(request: Request) -> Response:
    fields, keys = customer_fields(await json_body(request))
    async with runtime_of(request).api_pool.acquire() as conn:
        customer = await service.create_customer(conn, namespace_of(request), fields, keys)
    return JSONResponse(customer_json(customer), status_code=201)


async def list_customers(request: Request) -> Response:
    filters = {}
    for name in ("key", "name", "primaryEmail", "subject"):
        value = shapes.single(request, name)
        if value is not None:
            if len(value) > shapes.MAX_KEY:
                raise bad_request(f"{name} must be at most {shapes.MAX_KEY} characters", parameter=name)
            filters[name] = value.replace("\x00", "")
    page, size = shapes.pagination(request)
    order_by = shapes.choice(request, "orderBy", ["id", "name", "createdAt"], "name")
    descending = shapes.choice(request, "order", ["ASC", "DESC"], "ASC") == "DESC"
    async with runtime_of(request).api_pool.acquire() as conn:
        total, customers = await store.list_customers(
            conn, namespace_of(request), filters=filters, include_deleted=shapes.flag(request, "includeDeleted"),
            order_by=order_by, descending=descending, page=page, page_size=size)
    return JSONResponse(shapes.page_body(total, page, size, [customer_json(c) for c in customers]))


async def get_customer(request: Request) -> Response:
    return JSONResponse(customer_json(await customer_of_path(request)))


async def update_customer(request: Request) -> Response:
    customer = await customer_of_path(request)
    if customer.deleted_at is not None:
        raise Problem(412, f"customer {customer.id} is deleted: update after delete")
    fields, keys = customer_fields(await json_body(request))
    async with runtime_of(request).api_pool.acquire() as conn:
        updated = await service.update_customer(conn, customer, fields, keys)
    return JSONResponse(customer_json(updated))


async def delete_customer(request: Request) -> Response:
    customer = await customer_of_path(request)
    if customer.deleted_at is not None:
        raise Problem(412, f"customer {customer.id} is already deleted")
    async with runtime_of(request).api_pool.acquire() as conn:
        await service.delete_customer(conn, customer)
    return Response(status_code=204)


async def customer_access(request: Request) -> Response:
    customer = await customer_of_path(request, live=True)
    now = datetime.now(UTC)
    async with runtime_of(request).api_pool.acquire() as conn:
        _, ents = await store.list_entitlements(conn, customer.namespace, customer_ids=[customer.id], active_at=now)
    values = await balance.gather_limited([value_json(request, ent, now, V1_ADMIN) for ent in ents])
    return JSONResponse({"entitlements": {ent.feature_key: v for ent, v in zip(ents, values, strict=True)}})


async def customer_value(request: Request) -> Response:
    runtime = runtime_of(request)
    values = values_now(request)
    now = values is not None
    if values is not None:
        # Valkey first, as the entitlement routes (pgmeter.quota.reader).
        key = values.key_for(runtime, namespace_of(request), customer=request.path_params["customerIdOrKey"],
                             feature_key=request.path_params["featureKey"])
        hit, now = await values.cached(runtime, key, v2=V1_ADMIN.v2)
        if hit is not None:
            return JSONResponse(hit[0], headers=hit[1])
    customer = await customer_of_path(request, live=True)
    at = at_param(request)
    async with runtime.api_pool.acquire() as conn:
        ent = await store.entitlement_for_feature_at(conn, customer.namespace, customer.id,
                                                     request.path_params["featureKey"], at)
    if values is not None and now and ent is not None and ent.type == "metered" and ent.active_at(at):
        found = await values.computed(runtime, ent.namespace, ent.id, v2=V1_ADMIN.v2)
        if found is not None:
            return JSONResponse(found[0], headers=found[1])
    return JSONResponse(await value_json(request, ent, at, V1_ADMIN))


# -- deprecated subjects ---------------------------------------------------------

def subject_json(row: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": row["id"], "key": row["key"]}
    if row["display_name"] is not None:
        body["displayName"] = row["display_name"]
    body["metadata"] = json.loads(row["metadata"]) if row["metadata"] is not None else None
    if row["stripe_customer_id"] is not None:
        body["stripeCustomerId"] = row["stripe_customer_id"]
    return body


_SUBJECT = "id, key, display_name, metadata::text AS metadata, stripe_customer_id"


async def upsert_subjects(request: Request) -> Response:
    raw = await request.body()
    try:
        items = json.loads(raw)
    except ValueError:
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(items, list) or len(items) > 100 or not all(isinstance(i, dict) for i in items):
        raise bad_request("request body must be an array of at most 100 subjects")
    namespace = namespace_of(request)
    out = []
    async with runtime_of(request).api_pool.acquire() as conn, conn.transaction():
        for index, item in enumerate(items):
            key = shapes.string(item, "key", required=True, max_len=shapes.MAX_KEY, path=f"[{index}].key")
            display = shapes.string(item, "displayName", max_len=shapes.MAX_NAME, path=f"[{index}].displayName")
            meta = item.get("metadata")
            if meta is not None and (not isinstance(meta, dict) or len(json.dumps(meta)) > 16384
                                     or not shapes.storable_json(meta)):
                raise shapes.field_error(f"[{index}].metadata", "must be an object of at most 16 KiB of "
                                                                "valid UTF-8 text without NUL characters")
            stripe = shapes.string(item, "stripeCustomerId", max_len=256, path=f"[{index}].stripeCustomerId")
            if stripe is not None and not stripe.startswith("cus_"):
                raise shapes.field_error(f"[{index}].stripeCustomerId", "must start with cus_")
            row = await conn.fetchrow(f"SELECT {_SUBJECT} FROM subjects WHERE namespace = $1 AND key = $2 "
                                      "AND deleted_at IS NULL", namespace, key)
            if row is None:
                row = await conn.fetchrow(
                    f"INSERT INTO subjects (id, namespace, key, display_name, metadata, stripe_customer_id) "
                    f"VALUES ($1, $2, $3, $4, $5::text::jsonb, $6) RETURNING {_SUBJECT}",
                    new_ulid(), namespace, key, display, json.dumps(meta) if meta is not None else None, stripe)
            else:
                # Only the properties present change; null clears one.
                sets, args = [], [row["id"]]
                for name, column, value in (("displayName", "display_name", display),
                                            ("metadata", "metadata", json.dumps(meta) if meta is not None else None),
                                            ("stripeCustomerId", "stripe_customer_id", stripe)):
                    if name in item:
                        args.append(value)
                        cast = "::text::jsonb" if column == "metadata" else ""
                        sets.append(f"{column} = ${len(args)}{cast}")
                if sets:
                    row = await conn.fetchrow(f"UPDATE subjects SET {', '.join(sets)}, updated_at = now() "
                                              f"WHERE id = $1 RETURNING {_SUBJECT}", *args)
            out.append(subject_json(row))
    return JSONResponse(out)


async def list_subjects(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT {_SUBJECT} FROM subjects WHERE namespace = $1 AND deleted_at IS NULL "
                                'ORDER BY key COLLATE "C"', namespace_of(request))
    return JSONResponse([subject_json(r) for r in rows])


async def _subject(request: Request) -> Any:
    ref = request.path_params["subjectIdOrKey"]
    async with runtime_of(request).api_pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {_SUBJECT} FROM subjects WHERE namespace = $1 AND deleted_at IS NULL "
                                  "AND (id = $2 OR key = $2) ORDER BY (id = $2) DESC LIMIT 1",
                                  namespace_of(request), ref)
    if row is None:
        raise Problem(404, f"subject not found: {ref}")
    return row


async def get_subject(request: Request) -> Response:
    return JSONResponse(subject_json(await _subject(request)))


async def delete_subject(request: Request) -> Response:
    row = await _subject(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        await conn.execute("UPDATE subjects SET deleted_at = now() WHERE id = $1", row["id"])
    return Response(status_code=204)


routes = [
    Route("/api/v1/customers", shapes.guarded(create_customer), methods=["POST"]),
    Route("/api/v1/customers", shapes.guarded(list_customers), methods=["GET"]),
    Route("/api/v1/customers/{customerIdOrKey}", shapes.guarded(get_customer), methods=["GET"]),
    Route("/api/v1/customers/{customerIdOrKey}", shapes.guarded(update_customer), methods=["PUT"]),
    Route("/api/v1/customers/{customerIdOrKey}", shapes.guarded(delete_customer), methods=["DELETE"]),
    Route("/api/v1/customers/{customerIdOrKey}/access", shapes.guarded(customer_access), methods=["GET"]),
    Route("/api/v1/customers/{customerIdOrKey}/entitlements/{featureKey}/value", shapes.guarded(customer_value),
          methods=["GET"]),
    Route("/api/v1/subjects", shapes.guarded(upsert_subjects), methods=["POST"]),
    Route("/api/v1/subjects", shapes.guarded(list_subjects), methods=["GET"]),
    Route("/api/v1/subjects/{subjectIdOrKey}", shapes.guarded(get_subject), methods=["GET"]),
    Route("/api/v1/subjects/{subjectIdOrKey}", shapes.guarded(delete_subject), methods=["DELETE"]),
]
