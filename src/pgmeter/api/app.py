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
from starlette.routing import BaseRoute

from pgmeter import roles as role_registry
from pgmeter.api import health
from pgmeter.api.auth import AuthMiddleware
from pgmeter.api.middleware import RequestContextMiddleware
from pgmeter.api.problems import EXCEPTION_HANDLERS
from pgmeter.config import Settings
from pgmeter.runtime import open_runtime


def api_routes() -> list[BaseRoute]:
    return [*health.api_routes, *role_registry.api_routes()]


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
