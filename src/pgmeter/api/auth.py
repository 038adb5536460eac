"""Optional bearer-token auth, each token bound to one namespace.

With no tokens configured (the default, and ``pgmeter dev``), every request works
in ``settings.namespace``. With tokens, every ``/api/v1`` route but the health
probe, the OpenAPI document and the portal query (it checks its own JWT) needs
``Authorization: Bearer <token>`` and works only in that token's namespace:
handlers never take the namespace from the request itself, so a token
cannot write or read another namespace's events, meters or usage.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from pgmeter.api.problems import problem_response

# No data behind these: the probe and the API's own description (the console renders it).
OPEN_PATHS = frozenset({"/api/v1/health", "/api/v1/openapi.json"})
# The portal query carries a portal token (a JWT), not a namespace token; the route
# checks it itself (pgmeter.api.portal) and takes the namespace from it.
PORTAL_QUERY_PREFIX = "/api/v1/portal/meters/"


def api_protects(path: str) -> bool:
    """The api's rule: every ``/api/`` path needs a token but the open ones. The console
    at / and its static files hold no data: they load without a token."""
    return path.startswith("/api/") and path not in OPEN_PATHS and not path.startswith(PORTAL_QUERY_PREFIX)


def namespace_of(request: Request) -> str:
    """The namespace this request may act in (set by :class:`AuthMiddleware`)."""
    return request.scope["state"]["namespace"]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, tokens: dict[str, str], default_namespace: str,
                 protects: Callable[[str], bool] = api_protects) -> None:
        """``protects(path)``: whether a path needs a token (the collector passes its own rule)."""
        self.app = app
        self.tokens = [(token.encode(), namespace) for token, namespace in tokens.items()]
        self.default_namespace = default_namespace
        self.protects = protects

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        path: str = scope["path"]
        if not self.tokens or not self.protects(path):
            scope["state"]["namespace"] = self.default_namespace
            await self.app(scope, receive, send)
            return
        namespace = self._namespace_for(scope)
        if namespace is None:
            response = problem_response(
                401, "a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="pgmeter"'})
            await response(scope, receive, send)
            return
        scope["state"]["namespace"] = namespace
        await self.app(scope, receive, send)

    def _namespace_for(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return bearer_namespace(self.tokens, value)
        return None


def bearer_namespace(tokens: list[tuple[bytes, str]], authorization: bytes) -> str | None:
    """The namespace of the token in an ``Authorization: Bearer <token>`` value, or None.
    (Also for the collector's OTLP/gRPC source, whose metadata carries the same header.)"""
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token:
        return None
    found = None
    # Compare against every token in constant time; do not stop early.
    for candidate, namespace in tokens:
        if hmac.compare_digest(candidate, token.strip()):
            found = namespace
    return found
