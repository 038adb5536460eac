"""Request ids, the request-size limit and HTTP latency, for every route.

Written as plain ASGI middleware (not BaseHTTPMiddleware) because it sits on the
ingest hot path: one extra task per request was measurable at 10k requests/s.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import Histogram
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgmeter.api.problems import problem_response, response_for
from pgmeter.logs import request_id

log = logging.getLogger("pgmeter.http")

HTTP_LATENCY = Histogram(
    "http_server_request_duration_seconds",
    "HTTP request latency by route",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class BodyTooLarge(Exception):
    pass


# Per-request work that only depends on the route is cached: matching every route
# and resolving labelled histogram children cost more than a bare endpoint's whole
# request (measured on the ingest path). Both caches are bounded.
_TEMPLATES: dict[tuple[int, str, str], str] = {}
_LATENCY_CHILDREN: dict[tuple[str, str, int], object] = {}
_CACHE_LIMIT = 4096


def _cached_route_template(scope: Scope) -> str:
    key = (id(scope.get("app")), scope["method"], scope["path"])
    template = _TEMPLATES.get(key)
    if template is None:
        template = _route_template(scope)
        if len(_TEMPLATES) >= _CACHE_LIMIT:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    return template


def _observe(method: str, route: str, status: int, elapsed: float) -> None:
    key = (method, route, status)
    child = _LATENCY_CHILDREN.get(key)
    if child is None:
        if len(_LATENCY_CHILDREN) >= _CACHE_LIMIT:
            _LATENCY_CHILDREN.clear()
        child = _LATENCY_CHILDREN[key] = HTTP_LATENCY.labels(method, route, str(status))
    child.observe(elapsed)  # type: ignore[attr-defined]


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", scope["path"]))
    return "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming, declared = _scan_headers(scope)
        rid = incoming or os.urandom(16).hex()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        received = 0
        limit = self.max_body_bytes
        rid_header = (b"x-request-id", rid.encode())

        if b"%00" in scope.get("query_string", b"") or "\x00" in scope["path"]:
            # Postgres text cannot hold NUL, and no parameter of ours can contain one.
            response = problem_response(400, "query parameters and paths must not contain NUL characters (%00)")
            await response(scope, receive, send)
            request_id.reset(token)
            return

        if declared is not None and declared > limit:
            response = problem_response(413, f"request body is {declared} bytes; the limit is {limit}")
            await response(scope, receive, send)
            request_id.reset(token)
            return

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge as exc:
            status = 413
            await problem_response(413, str(exc))(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client left (or was cut off by the server's body deadline): nobody to answer.
            status = 499
        except Exception as exc:
            # Answered here, inside the request context (the answer carries the request
            # id) and without re-raising: Starlette's own last-resort handler re-raises,
            # and the server then logged a second traceback.
            # A response already under way (a streamed answer) can only be cut short.
            response = response_for(exc, scope)
            if not response_started:
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _cached_route_template(scope)
            _observe(scope["method"], route, status, elapsed)
            # Method, route template and status only: never the query string, headers
            # (tokens) or body (event payloads). Successes are debug: at ingest rates
            # a line per request would drown everything else. So are 503s: they mean a
            # dependency is down, which pgmeter.dependencies logs once per outage (and
            # the 500s' traceback is logged where they are caught).
            fields = {"method": scope["method"], "route": route, "status": status,
                      "duration_ms": round(elapsed * 1000, 2)}
            if status == 503 or (status < 400 and log.isEnabledFor(logging.DEBUG)):
                log.debug("request served" if status < 400 else "request refused: unavailable", extra=fields)
            elif status >= 500:
                log.warning("request failed", extra=fields)
            elif status >= 400:
                log.info("request refused", extra=fields)
            request_id.reset(token)


def _scan_headers(scope: Scope) -> tuple[str | None, int | None]:
    """The incoming request id (if safe to echo) and the declared Content-Length, in one pass."""
    incoming: str | None = None
    declared: int | None = None
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            # Echo only ids that are safe in logs and headers.
            if 0 < len(text) <= 128 and all(c.isalnum() or c in "-_." for c in text):
                incoming = text
        elif name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
    return incoming, declared
