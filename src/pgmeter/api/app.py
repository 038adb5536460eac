"""The ASGI application one pgmeter process serves.

Every role answers ``/healthz``, ``/readyz`` and ``/metrics``; the ``api`` role also
serves the OpenMeter-compatible ``/api/v1`` routes. Background roles (sink,
refresher, lago-sync) start in the lifespan, so one process can run any mix of
them: ``pgmeter dev`` runs all, production runs one role per Deployment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from pgmeter import roles as role_registry
from pgmeter.api import health
from pgmeter.api.auth import AuthMiddleware
from pgmeter.api.middleware import RequestContextMiddleware
from pgmeter.api.problems import EXCEPTION_HANDLERS
from pgmeter.config import Settings
from pgmeter.runtime import open_runtime


class _ByMethod:
    """One path's routes as one ASGI app: each request goes to its method's route."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = {method: route for route in routes for method in route.methods or ()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.routes[scope["method"]].handle(scope, receive, send)


def merge_paths(routes: list[BaseRoute]) -> list[BaseRoute]:
    """Routes that share a path become one route with every method.

    Starlette answers a wrong method from the first route of the path alone, so a
    405's ``Allow`` named one route's methods (``OPTIONS /api/v1/events`` said POST,
    though GET is served too); OpenMeter lists every method of the path.
    """
    by_path: dict[str, list[Route]] = {}
    merged: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Route) and route.methods:
            if route.path not in by_path:
                by_path[route.path] = []
                merged.append(route)  # a placeholder, replaced below
            by_path[route.path].append(route)
        else:
            merged.append(route)
    for index, route in enumerate(merged):
        if isinstance(route, Route) and route.methods and len(by_path[route.path]) > 1:
            group = by_path[route.path]
            methods = sorted({method for member in group for method in member.methods or ()})
            merged[index] = Route(route.path, _ByMethod(group), methods=methods)
    return merged


def api_routes() -> list[BaseRoute]:
    return merge_paths([*health.api_routes, *role_registry.api_routes()])


def create_app(settings: Settings, roles: frozenset[str]) -> Starlette:
    routes: list[BaseRoute] = list(health.routes)
    if "api" in roles:
        routes += api_routes()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_runtime(settings, roles) as runtime:
            app.state.runtime = runtime
            await role_registry.start(runtime)
            yield

    cors: list[Middleware] = []
    if "api" in roles and settings.portal.cors_allowed_origins:
        from pgmeter.api.portal import PortalCORS

        # Outermost, so a browser's preflight (no token) is answered before auth.
        cors.append(Middleware(PortalCORS, origins=settings.portal.cors_allowed_origins))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            *cors,
            Middleware(RequestContextMiddleware, max_body_bytes=settings.ingest.max_body_bytes),
            Middleware(AuthMiddleware, tokens=settings.auth_tokens, default_namespace=settings.namespace),
        ],
    )
