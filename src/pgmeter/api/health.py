"""Liveness, readiness, the OpenOva smoke route and Prometheus metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.runtime import Runtime

READY_TIMEOUT = 2.0


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return JSONResponse({"status": "ok"})


async def _check_postgres(runtime: Runtime) -> None:
    async with runtime.pool.acquire(timeout=READY_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1")


async def _check_nats(runtime: Runtime) -> None:
    if not runtime.nats.is_connected:
        raise ConnectionError("not connected")
    await runtime.nats.flush(timeout=READY_TIMEOUT)


async def _check_valkey(runtime: Runtime) -> None:
    assert runtime.valkey is not None
    await runtime.valkey.ping()


async def readiness(runtime: Runtime) -> dict[str, str]:
    checks = {"postgres": _check_postgres(runtime), "nats": _check_nats(runtime)}
    if runtime.valkey is not None:
        checks["valkey"] = _check_valkey(runtime)
    for name, check in runtime.readiness.items():
        checks[name] = check()
    results: dict[str, str] = {}
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(check, READY_TIMEOUT) for check in checks.values()), return_exceptions=True
    )
    for name, outcome in zip(checks, outcomes, strict=False):
        results[name] = "ok" if not isinstance(outcome, BaseException) else (
            f"error: {type(outcome).__name__} {outcome}".strip())
    return results


async def readyz(request: Request) -> Response:
    results = await readiness(request.app.state.runtime)
    ready = all(value == "ok" for value in results.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": results},
                        status_code=200 if ready else 503)


async def api_health(request: Request) -> Response:
    """``GET /api/v1/health``: the Catalyst slot-45 smoke probe expects exactly this."""
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]

api_routes = [Route("/api/v1/health", api_health, methods=["GET"])]
