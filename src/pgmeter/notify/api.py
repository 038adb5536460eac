"""``/api/v1/notification/channels|rules|events`` in OpenMeter's shapes.

Door limits (400 problem naming the field): channel ``name`` 1-256 characters, ``url``
http(s) up to 2048, ``customHeaders`` up to 20 of at most 256/1024 characters,
``signingSecret`` ``whsec_`` + 32-100 base64 characters (generated when omitted),
``metadata`` up to 32 string pairs; rule ``channels`` 1-5 ids of live channels,
``features`` up to 100 ids or keys without duplicates, ``thresholds`` 1-10 of
``{type, value}`` (usage kinds > 0, balance_value >= 0, at most 1e15).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import namespace_of
from pgmeter.api.meters import json_body, runtime_of
from pgmeter.api.problems import Problem, bad_request
from pgmeter.entitlements.api import shapes
from pgmeter.meters.ulid import is_ulid, new_ulid
from pgmeter.notify.rules import RESET, THRESHOLD, THRESHOLD_TYPES, USAGE_KINDS

BASE = "/api/v1/notification"
_CHANNEL = ("id, type, name, url, disabled, custom_headers::text AS custom_headers, signing_secret, "
            "metadata::text AS metadata, created_at, updated_at, deleted_at")
_RULE = ("id, type, name, disabled, channels, features, thresholds::text AS thresholds, metadata::text AS metadata, "
         "created_at, updated_at, deleted_at")


def _field(name: str, detail: str) -> Problem:
    return bad_request(f"{name} {detail}", field=name)


def _text(body: dict[str, Any], name: str, hi: int, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= hi or not shapes.storable(value):
        raise _field(name, f"must be a string of 1 to {hi} characters (no NUL)")
    return value


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    value = body.get("metadata")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 32 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 256 and len(v) <= 1024 and shapes.storable(k + v)
            for k, v in value.items()):
        raise _field("metadata", "must be an object of at most 32 string pairs (keys 256, values 1024 characters)")
    return value


def _secret(value: Any) -> str:
    if value is None:
        return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    if not isinstance(value, str) or not value.startswith("whsec_") or not 32 <= len(value) - 6 <= 100:
        raise _field("signingSecret", "must be whsec_ followed by 32 to 100 base64 characters")
    try:
        base64.b64decode(value[6:], validate=True)
    except binascii.Error:
        raise _field("signingSecret", "must be whsec_ followed by base64") from None
    return value


def channel_input(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("type") != "WEBHOOK":
        raise _field("type", "must be WEBHOOK")
    url = _text(body, "url", 2048)
    assert url is not None
    if not url.startswith(("http://", "https://")):
        raise _field("url", "must be an http(s) URL")
    headers = body.get("customHeaders")
    if headers is not None and (not isinstance(headers, dict) or len(headers) > 20 or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 256 and len(v) <= 1024
            and shapes.storable(k + v) and k.isascii() and v.isascii() and "\n" not in k + v and "\r" not in k + v
            for k, v in headers.items())):
        raise _field("customHeaders", "must be an object of at most 20 headers (names 256, values 1024 characters)")
    disabled = body.get("disabled", False)
    if not isinstance(disabled, bool):
        raise _field("disabled", "must be a boolean")
    return {"name": _text(body, "name", 256), "url": url, "disabled": disabled,
            "custom_headers": headers,
            "signing_secret": _secret(body.get("signingSecret")), "metadata": _metadata(body)}


def channel_json(row: asyncpg.Record) -> dict[str, Any]:
    body: dict[str, Any] = {"id": row["id"], "type": row["type"], "name": row["name"], "disabled": row["disabled"],
                            "config": {}, "url": row["url"], "signingSecret": row["signing_secret"],
                            "customHeaders": json.loads(row["custom_headers"] or "{}")}
    body["config"] = {"type": "WEBHOOK", "url": row["url"], "signingSecret": row["signing_secret"],
                      "customHeaders": body["customHeaders"]}
    if row["metadata"]:
        body["metadata"] = json.loads(row["metadata"])
    body.update(shapes.times(createdAt=row["created_at"], updatedAt=row["updated_at"], deletedAt=row["deleted_at"]))
    return body


def _threshold(value: Any, index: int) -> dict[str, Any]:
    name = f"thresholds[{index}]"
    if not isinstance(value, dict) or value.get("type") not in THRESHOLD_TYPES:
        raise _field(name, f"must be {{type, value}} with type one of {sorted(THRESHOLD_TYPES)}")
    raw = value.get("value")
    try:
        number = Decimal(str(raw)) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
    except InvalidOperation:
        number = None
    low_ok = number is not None and (number > 0 if value["type"] in USAGE_KINDS else number >= 0)
    if number is None or not number.is_finite() or not low_ok or number > Decimal("1e15"):
        raise _field(f"{name}.value", "must be a number > 0 (>= 0 for balance_value), at most 1e15")
    return {"type": value["type"], "value": raw}


async def rule_input(conn: asyncpg.Connection, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    kind = body.get("type")
    if kind not in (THRESHOLD, RESET):
        raise _field("type", f"must be {THRESHOLD} or {RESET}")
    channels = body.get("channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= 5 or not all(
            isinstance(c, str) and 0 < len(c) <= 64 and shapes.storable(c) for c in channels) \
            or len(set(channels)) != len(channels):
        raise _field("channels", "must list 1 to 5 distinct channel ids")
    live = {r["id"] for r in await conn.fetch(
        "SELECT id FROM notification_channels WHERE namespace = $1 AND id = ANY($2::text[]) AND deleted_at IS NULL",
        namespace, channels)}
    missing = [c for c in channels if c not in live]
    if missing:
        raise _field("channels", f"names channels that do not exist: {', '.join(missing)}")
    features = body.get("features") or []
    if not isinstance(features, list) or len(features) > 100 or not all(
            isinstance(f, str) and 0 < len(f) <= 64 and shapes.storable(f) for f in features) \
            or len(set(features)) != len(features):
        raise _field("features", "must list at most 100 distinct feature ids or keys")
    feature_ids = []
    for ref in features:
        found = await conn.fetchval("SELECT id FROM features WHERE namespace = $1 AND (id = $2 OR key = $2) "
                                    "AND archived_at IS NULL ORDER BY id = $2 DESC LIMIT 1", namespace, ref)
        if found is None:
            raise _field("features", f"names a feature that does not exist: {ref}")
        feature_ids.append(found)
    thresholds = None
    if kind == THRESHOLD:
        raw = body.get("thresholds")
        if not isinstance(raw, list) or not 1 <= len(raw) <= 10:
            raise _field("thresholds", "must list 1 to 10 thresholds")
        thresholds = [_threshold(t, i) for i, t in enumerate(raw)]
    disabled = body.get("disabled", False)
    if not isinstance(disabled, bool):
        raise _field("disabled", "must be a boolean")
    return {"type": kind, "name": _text(body, "name", 256), "disabled": disabled, "channels": channels,
            "features": feature_ids, "thresholds": thresholds, "metadata": _metadata(body)}


async def rule_json(conn: asyncpg.Connection, row: asyncpg.Record) -> dict[str, Any]:
    channels = await conn.fetch("SELECT id, type, name FROM notification_channels WHERE id = ANY($1::text[])",
                                row["channels"])
    features = await conn.fetch("SELECT id, key FROM features WHERE id = ANY($1::text[])", row["features"])
    body: dict[str, Any] = {
        "id": row["id"], "type": row["type"], "name": row["name"], "disabled": row["disabled"],
        "channels": [{"id": c["id"], "type": c["type"], "name": c["name"]} for c in channels],
        "features": [{"id": f["id"], "key": f["key"]} for f in features]}
    if row["thresholds"]:
        body["thresholds"] = json.loads(row["thresholds"])
    if row["metadata"]:
        body["metadata"] = json.loads(row["metadata"])
    body.update(shapes.times(createdAt=row["created_at"], updatedAt=row["updated_at"], deletedAt=row["deleted_at"]))
    return body


async def event_json(conn: asyncpg.Connection, row: asyncpg.Record) -> dict[str, Any]:
    rule = await conn.fetchrow(f"SELECT {_RULE} FROM notification_rules WHERE id = $1", row["rule_id"])
    deliveries = await conn.fetch(
        "SELECT d.state, d.reason, d.next_attempt_at, d.updated_at, d.attempts::text AS attempts, "
        "c.id, c.type, c.name FROM notification_deliveries d JOIN notification_channels c ON c.id = d.channel_id "
        "WHERE d.event_id = $1 ORDER BY c.id", row["id"])
    status = []
    for d in deliveries:
        item: dict[str, Any] = {"channel": {"id": d["id"], "type": d["type"], "name": d["name"]}, "state": d["state"],
                                "reason": d["reason"] or "", "attempts": json.loads(d["attempts"])}
        item.update(shapes.times(updatedAt=d["updated_at"], nextAttempt=d["next_attempt_at"]))
        status.append(item)
    body = {"id": row["id"], "type": row["type"], "rule": await rule_json(conn, rule) if rule else None,
            "deliveryStatus": status, "payload": json.loads(row["payload"])}
    body.update(shapes.times(createdAt=row["created_at"]))
    return body


def _id(request: Request, name: str) -> str:
    value = request.path_params[name]
    if not is_ulid(value):
        raise Problem(404, f"{name} {value[:64]} not found")
    return str(value)


# -- handlers --------------------------------------------------------------------

async def create_channel(request: Request) -> Response:
    namespace, runtime = namespace_of(request), runtime_of(request)
    values = channel_input(await json_body(request))
    async with runtime.api_pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pgmeter.notify-channels:{namespace}")
        count = await conn.fetchval("SELECT count(*) FROM notification_channels WHERE namespace = $1 "
                                    "AND deleted_at IS NULL", namespace)
        if count >= runtime.settings.notifications.max_channels:
            raise bad_request(f"a namespace holds at most {runtime.settings.notifications.max_channels} channels")
        row = await conn.fetchrow(
            f"INSERT INTO notification_channels (id, namespace, type, name, url, disabled, custom_headers, "
            f"signing_secret, metadata) VALUES ($1, $2, 'WEBHOOK', $3, $4, $5, $6::jsonb, $7, $8::jsonb) "
            f"RETURNING {_CHANNEL}", new_ulid(), namespace, values["name"], values["url"], values["disabled"],
            values["custom_headers"], values["signing_secret"], values["metadata"])
    return JSONResponse(channel_json(row), status_code=201)


async def _found(conn: asyncpg.Connection, request: Request, table: str, columns: str, param: str,
                 noun: str) -> asyncpg.Record:
    """The row of ``table`` named by path parameter ``param`` in the caller's namespace, or 404.

    ``table`` and ``columns`` are this module's constants, never input.
    """
    row = await conn.fetchrow(f"SELECT {columns} FROM {table} WHERE namespace = $1 AND id = $2",
                              namespace_of(request), _id(request, param))
    if row is None:
        raise Problem(404, f"{noun} {request.path_params[param]} not found")
    return row


async def _channel(conn: asyncpg.Connection, request: Request) -> asyncpg.Record:
    return await _found(conn, request, "notification_channels", _CHANNEL, "channelId", "channel")


async def get_channel(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        return JSONResponse(channel_json(await _channel(conn, request)))


async def update_channel(request: Request) -> Response:
    values = channel_input(await json_body(request))
    async with runtime_of(request).api_pool.acquire() as conn:
        found = await _channel(conn, request)
        if found["deleted_at"] is not None:
            raise Problem(404, f"channel {found['id']} is deleted")
        row = await conn.fetchrow(
            f"UPDATE notification_channels SET name = $2, url = $3, disabled = $4, custom_headers = $5::jsonb, "
            f"signing_secret = $6, metadata = $7::jsonb, updated_at = now() WHERE id = $1 RETURNING {_CHANNEL}",
            found["id"], values["name"], values["url"], values["disabled"], values["custom_headers"],
            values["signing_secret"], values["metadata"])
    return JSONResponse(channel_json(row))


async def delete_channel(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        found = await _channel(conn, request)
        used = await conn.fetchval("SELECT id FROM notification_rules WHERE $1 = ANY(channels) AND deleted_at IS NULL "
                                   "LIMIT 1", found["id"])
        if used:
            raise Problem(409, f"channel {found['id']} is used by rule {used}")
        await conn.execute("UPDATE notification_channels SET deleted_at = coalesce(deleted_at, now()) WHERE id = $1",
                           found["id"])
    return Response(status_code=204)


async def _page(conn: asyncpg.Connection, request: Request, table: str,
                columns: str) -> tuple[int, int, int, list[asyncpg.Record]]:
    """One page of the namespace's channels or rules (``table`` is one of ours, not input),
    with OpenMeter's ``includeDeleted``/``includeDisabled``: page, size, total and rows."""
    page, size = shapes.pagination(request)
    deleted, disabled = shapes.flag(request, "includeDeleted"), shapes.flag(request, "includeDisabled")
    where = "namespace = $1" + ("" if deleted else " AND deleted_at IS NULL") + ("" if disabled else " AND NOT disabled")
    total = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", namespace_of(request))
    rows = await conn.fetch(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY created_at, id "
                            "LIMIT $2 OFFSET $3", namespace_of(request), size, (page - 1) * size)
    return page, size, total, rows


async def list_channels(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        page, size, total, rows = await _page(conn, request, "notification_channels", _CHANNEL)
    return JSONResponse(shapes.page_body(total, page, size, [channel_json(r) for r in rows]))


async def create_rule(request: Request) -> Response:
    namespace, runtime = namespace_of(request), runtime_of(request)
    body = await json_body(request)
    async with runtime.api_pool.acquire() as conn, conn.transaction():
        values = await rule_input(conn, namespace, body)
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pgmeter.notify-rules:{namespace}")
        count = await conn.fetchval("SELECT count(*) FROM notification_rules WHERE namespace = $1 "
                                    "AND deleted_at IS NULL", namespace)
        if count >= runtime.settings.notifications.max_rules:
            raise bad_request(f"a namespace holds at most {runtime.settings.notifications.max_rules} rules")
        row = await conn.fetchrow(
            f"INSERT INTO notification_rules (id, namespace, type, name, disabled, channels, features, thresholds, "
            f"metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb) RETURNING {_RULE}",
            new_ulid(), namespace, values["type"], values["name"], values["disabled"], values["channels"],
            values["features"], values["thresholds"], values["metadata"])
        return JSONResponse(await rule_json(conn, row), status_code=201)


async def _rule(conn: asyncpg.Connection, request: Request) -> asyncpg.Record:
    return await _found(conn, request, "notification_rules", _RULE, "ruleId", "rule")


async def get_rule(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        return JSONResponse(await rule_json(conn, await _rule(conn, request)))


async def update_rule(request: Request) -> Response:
    body = await json_body(request)
    async with runtime_of(request).api_pool.acquire() as conn, conn.transaction():
        found = await _rule(conn, request)
        if found["deleted_at"] is not None:
            raise Problem(404, f"rule {found['id']} is deleted")
        values = await rule_input(conn, namespace_of(request), body)
        if values["type"] != found["type"]:
            raise _field("type", "cannot change")
        row = await conn.fetchrow(
            f"UPDATE notification_rules SET name = $2, disabled = $3, channels = $4, features = $5, "
            f"thresholds = $6::jsonb, metadata = $7::jsonb, updated_at = now() WHERE id = $1 RETURNING {_RULE}",
            found["id"], values["name"], values["disabled"], values["channels"], values["features"],
            values["thresholds"], values["metadata"])
        return JSONResponse(await rule_json(conn, row))


async def delete_rule(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        found = await _rule(conn, request)
        await conn.execute("UPDATE notification_rules SET deleted_at = coalesce(deleted_at, now()) WHERE id = $1",
                           found["id"])
    return Response(status_code=204)


async def list_rules(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        page, size, total, rows = await _page(conn, request, "notification_rules", _RULE)
        items = [await rule_json(conn, r) for r in rows]
    return JSONResponse(shapes.page_body(total, page, size, items))


_EVENT = "id, type, rule_id, payload::text AS payload, created_at"


async def list_events(request: Request) -> Response:
    page, size = shapes.pagination(request)
    lo = shapes.query_time(request, "from")
    hi = shapes.query_time(request, "to")
    rules = shapes.strings(request.query_params.getlist("rule"), "rule")
    subjects = shapes.strings(request.query_params.getlist("subject"), "subject")
    features = shapes.strings(request.query_params.getlist("feature"), "feature")
    channels = shapes.strings(request.query_params.getlist("channel"), "channel")
    conditions, args = ["e.namespace = $1"], [namespace_of(request)]

    def add(sql: str, value: Any) -> None:
        args.append(value)
        conditions.append(sql.replace("$?", f"${len(args)}"))

    if lo is not None:
        add("e.created_at >= $?", lo)
    if hi is not None:
        add("e.created_at < $?", hi)
    if rules:
        add("e.rule_id = ANY($?::text[])", rules)
    if subjects:
        add("e.subject = ANY($?::text[])", subjects)
    if features:
        add("(e.feature_id = ANY($?::text[]) OR e.payload->'data'->'feature'->>'key' = ANY($?::text[]))", features)
    if channels:
        add("EXISTS (SELECT 1 FROM notification_deliveries d WHERE d.event_id = e.id "
            "AND d.channel_id = ANY($?::text[]))", channels)
    where = " AND ".join(conditions)
    async with runtime_of(request).api_pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM notification_events e WHERE {where}", *args)
        rows = await conn.fetch(f"SELECT {_EVENT} FROM notification_events e WHERE {where} "
                                f"ORDER BY created_at DESC, id DESC LIMIT {size} OFFSET {(page - 1) * size}", *args)
        items = [await event_json(conn, r) for r in rows]
    return JSONResponse(shapes.page_body(total, page, size, items))


async def _event(conn: asyncpg.Connection, request: Request) -> asyncpg.Record:
    return await _found(conn, request, "notification_events", _EVENT, "eventId", "event")


async def get_event(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        return JSONResponse(await event_json(conn, await _event(conn, request)))


async def resend_event(request: Request) -> Response:
    async with runtime_of(request).api_pool.acquire() as conn:
        found = await _event(conn, request)
        await conn.execute("UPDATE notification_deliveries SET state = 'RESENDING', attempt_count = 0, "
                           "next_attempt_at = now(), updated_at = now() WHERE event_id = $1", found["id"])
    dispatcher = runtime_of(request).notify
    if dispatcher is not None:
        dispatcher.wake.set()
    return Response(status_code=202)


routes = [
    Route(f"{BASE}/channels", shapes.guarded(create_channel), methods=["POST"]),
    Route(f"{BASE}/channels", shapes.guarded(list_channels), methods=["GET"]),
    Route(f"{BASE}/channels/{{channelId}}", shapes.guarded(get_channel), methods=["GET"]),
    Route(f"{BASE}/channels/{{channelId}}", shapes.guarded(update_channel), methods=["PUT"]),
    Route(f"{BASE}/channels/{{channelId}}", shapes.guarded(delete_channel), methods=["DELETE"]),
    Route(f"{BASE}/rules", shapes.guarded(create_rule), methods=["POST"]),
    Route(f"{BASE}/rules", shapes.guarded(list_rules), methods=["GET"]),
    Route(f"{BASE}/rules/{{ruleId}}", shapes.guarded(get_rule), methods=["GET"]),
    Route(f"{BASE}/rules/{{ruleId}}", shapes.guarded(update_rule), methods=["PUT"]),
    Route(f"{BASE}/rules/{{ruleId}}", shapes.guarded(delete_rule), methods=["DELETE"]),
    Route(f"{BASE}/events", shapes.guarded(list_events), methods=["GET"]),
    Route(f"{BASE}/events/{{eventId}}", shapes.guarded(get_event), methods=["GET"]),
    Route(f"{BASE}/events/{{eventId}}/resend", shapes.guarded(resend_event), methods=["POST"]),
]
