"""OpenMeter's consumer portal: ``/api/v1/portal/tokens`` and the portal meter query.

A portal token is an HS256 JWT signed with ``portal.tokenSecret``, with OpenMeter's
claims (``sub``, ``exp``, ``iat``, ``iss: openmeter``, ``id``,
``allowed_meter_slugs``) plus ``namespace``, so OpenMeter's SDKs and a TPP's own
UI use it unchanged. The token is handed out once and never stored; its id is
(``portal_tokens``), so tokens can be listed and invalidated, which OpenMeter's
open-source server leaves unimplemented.

The query route is the only one a portal token opens. The auth middleware lets it
through (a portal token is not a namespace token); :func:`portal_query` checks the
token and then answers exactly what ``/api/v1/meters/{slug}/query`` would with the
token's subject as the only subject, so a TPP sees its own usage and nothing else.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pgmeter.api.auth import namespace_of
from pgmeter.api.http import json_body, runtime_of, time_param
from pgmeter.api.meters import find_meter
from pgmeter.api.problems import Problem, bad_request
from pgmeter.api.query import _answer, params_from_query
from pgmeter.config import Settings
from pgmeter.times import format_rfc3339

ISSUER = "openmeter"  # what OpenMeter signs and checks; a token reads the same in both
ALGORITHM = "HS256"
QUERY_PREFIX = "/api/v1/portal/meters/"
LIST_DEFAULT, LIST_MAX = 25, 100
MAX_SLUGS = 100
SLUG = re.compile(r"\A[a-z0-9]+(?:_[a-z0-9]+)*\Z")


@dataclasses.dataclass(frozen=True)
class Claims:
    id: str
    namespace: str
    subject: str
    allowed_meter_slugs: tuple[str, ...]


def _secret(settings: Settings) -> str:
    secret = settings.portal.token_secret
    if not secret:
        raise Problem(501, "portal tokens are not configured: set portal.tokenSecret "
                           "(PGMETER_PORTAL_TOKEN_SECRET)")
    return secret


def _token_json(row: Any, now: datetime, token: str | None = None) -> dict[str, Any]:
    """OpenMeter's ``PortalToken``; ``token`` only at creation."""
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "subject": row["subject"],
        "expiresAt": format_rfc3339(row["expires_at"]),
        "expired": row["invalidated_at"] is not None or row["expires_at"] <= now,
        "createdAt": format_rfc3339(row["created_at"]),
    }
    if row["allowed_meter_slugs"] is not None:
        body["allowedMeterSlugs"] = list(row["allowed_meter_slugs"])
    if token is not None:
        body["token"] = token
    return body


def _subject(value: Any, settings: Settings, name: str = "subject") -> str:
    limit = settings.limits.event_subject_bytes
    if not isinstance(value, str) or not value or len(value.encode()) > limit:
        raise bad_request(f"{name} must be a non-empty string of at most {limit} bytes", parameter=name)
    return value


def _allowed_slugs(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(slug, str) for slug in value):
        raise bad_request("allowedMeterSlugs must be a list of meter slugs", parameter="allowedMeterSlugs")
    if not value:  # OpenMeter: an empty filter is an error, not "no meters"
        raise bad_request("allowedMeterSlugs cannot be an empty array when provided", parameter="allowedMeterSlugs")
    if len(value) > MAX_SLUGS:
        raise bad_request(f"allowedMeterSlugs takes at most {MAX_SLUGS} items", parameter="allowedMeterSlugs")
    for slug in value:
        if len(slug) > 64 or not SLUG.match(slug):
            raise bad_request(f"allowedMeterSlugs: {slug[:64]!r} is not a meter slug", parameter="allowedMeterSlugs")
    return list(dict.fromkeys(value))


async def create_token(request: Request) -> Response:
    runtime = runtime_of(request)
    settings = runtime.settings
    secret = _secret(settings)
    body = await json_body(request)
    subject = _subject(body.get("subject"), settings)
    slugs = _allowed_slugs(body.get("allowedMeterSlugs"))
    now = datetime.now(UTC)
    expires = time_param("expiresAt", body.get("expiresAt"))
    if expires is None:
        expires = now + settings.portal.token_expiration
    elif expires <= now:
        raise bad_request("expiresAt must be in the future", parameter="expiresAt")
    namespace = namespace_of(request)
    token_id = uuid.uuid4()
    async with runtime.pool.acquire() as conn:
        if slugs:
            found = {row["slug"] for row in await conn.fetch(
                "SELECT slug FROM meters WHERE namespace = $1 AND slug = ANY($2::text[]) AND deleted_at IS NULL",
                namespace, slugs)}
            missing = [slug for slug in slugs if slug not in found]
            if missing:
                raise Problem(404, f"meter not found: {missing[0]}", extensions={"parameter": "allowedMeterSlugs"})
        row = await conn.fetchrow(
            "INSERT INTO portal_tokens (namespace, id, subject, allowed_meter_slugs, expires_at, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            namespace, token_id, subject, slugs, expires, now)
    token = jwt.encode({
        "iss": ISSUER, "sub": subject, "iat": int(now.timestamp()), "exp": int(expires.timestamp()),
        "id": str(token_id), "allowed_meter_slugs": slugs or [], "namespace": namespace,
    }, secret, algorithm=ALGORITHM)
    # 200, not 201: what OpenMeter's API and SDKs expect here.
    return JSONResponse(_token_json(row, now, token))


async def list_tokens(request: Request) -> Response:
    runtime = runtime_of(request)
    _secret(runtime.settings)
    raw = request.query_params.get("limit")
    try:
        limit = LIST_DEFAULT if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIST_MAX:
        raise bad_request(f"limit must be an integer from 1 to {LIST_MAX}", parameter="limit")
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM portal_tokens WHERE namespace = $1 ORDER BY created_at DESC, id"
                                " LIMIT $2", namespace_of(request), limit)
    now = datetime.now(UTC)
    return JSONResponse([_token_json(row, now) for row in rows])


async def invalidate_tokens(request: Request) -> Response:
    runtime = runtime_of(request)
    _secret(runtime.settings)
    body = await json_body(request)
    token_id, subject = body.get("id"), body.get("subject")
    if token_id is None and subject is None:
        raise bad_request("either id or subject must be provided")
    parsed_id = None
    if token_id is not None:
        try:
            parsed_id = uuid.UUID(token_id) if isinstance(token_id, str) and len(token_id) <= 36 else None
        except ValueError:
            parsed_id = None
        if parsed_id is None:
            raise bad_request("id must be a portal token id", parameter="id")
    if subject is not None:
        _subject(subject, runtime.settings)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE portal_tokens SET invalidated_at = now() WHERE namespace = $1 AND invalidated_at IS NULL"
            " AND ($2::uuid IS NULL OR id = $2) AND ($3::text IS NULL OR subject = $3)",
            namespace_of(request), parsed_id, subject)
    return Response(status_code=204)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="pgmeter-portal"'})


async def authenticate(request: Request) -> Claims:
    """The portal token of the request, checked: signature, issuer, expiry, not invalidated."""
    runtime = runtime_of(request)
    secret = _secret(runtime.settings)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("a portal token is required (Authorization: Bearer <token>)")
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=[ALGORITHM], issuer=ISSUER,
                            options={"require": ["exp", "sub", "iss"]})
        found = Claims(id=str(uuid.UUID(claims["id"])), namespace=claims["namespace"], subject=claims["sub"],
                       allowed_meter_slugs=tuple(claims.get("allowed_meter_slugs") or ()))
    except (jwt.PyJWTError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _unauthorized(f"invalid portal token: {exc}") from None
    async with runtime.pool.acquire() as conn:
        invalidated = await conn.fetchval(
            "SELECT invalidated_at IS NOT NULL FROM portal_tokens WHERE namespace = $1 AND id = $2",
            found.namespace, uuid.UUID(found.id))
    if invalidated is None or invalidated:
        raise _unauthorized("invalid portal token: invalidated")
    return found


async def portal_query(request: Request) -> Response:
    claims = await authenticate(request)
    slug = request.path_params["meterSlug"]
    if claims.allowed_meter_slugs and slug not in claims.allowed_meter_slugs:
        raise _unauthorized("meter slug not allowed")
    if "subject" in request.query_params:
        raise bad_request("subject comes from the portal token and cannot be given", parameter="subject")
    # From here on the request acts in the token's namespace, for the token's subject only.
    request.scope["state"]["namespace"] = claims.namespace
    request.path_params["meterIdOrSlug"] = slug
    meter = await find_meter(request)
    params = dataclasses.replace(params_from_query(request), subjects=(claims.subject,))
    return await _answer(request, meter, params)


class PortalCORS:
    """CORS for the portal query route only, for the origins in ``portal.corsAllowedOrigins``.

    It wraps the whole app so a preflight (which carries no token) is answered
    before the auth middleware; every other path goes straight through.
    """

    def __init__(self, app: ASGIApp, *, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET"],
                                   allow_headers=["Authorization", "Accept", "Content-Type"], max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(QUERY_PREFIX):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


routes = [
    Route("/api/v1/portal/tokens", create_token, methods=["POST"]),
    Route("/api/v1/portal/tokens", list_tokens, methods=["GET"]),
    Route("/api/v1/portal/tokens/invalidate", invalidate_tokens, methods=["POST"]),
    Route("/api/v1/portal/meters/{meterSlug}/query", portal_query, methods=["GET"]),
]
