"""Liveness, readiness, the OpenOva smoke route and Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import nats
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.dependencies import describe
from pgmeter.runtime import Runtime, nats_read_loop_alive

READY_TIMEOUT = 2.0
# Publishes waiting longer than this for their JetStream ack mean the broker is stalled.
PUBLISH_STALL = 2.0
# Dependencies whose failure makes this process unready. Valkey is not one of them:
# "Valkey down slows queries, never fails them" (DESIGN), so it is reported degraded.
REQUIRED = ("postgres", "nats")


class NotReady(Exception):
    """A readiness check failed; the message says what, never where."""


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return JSONResponse({"status": "ok"})


async def _check_postgres(runtime: Runtime) -> None:
    async with runtime.api_pool.acquire(timeout=READY_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1", timeout=READY_TIMEOUT)


async def _check_nats(runtime: Runtime) -> None:
    """The shared client is connected and reading, its publishes get acks, and the server answers.

    Never ``flush()`` the shared client: when a flush times out, nats-py cancels the
    PONG's future and the late PONG then kills the client's read loop (nats-py
    2.16), after which every publish times out while ``is_connected`` stays true.
    Whether the server itself answers is asked on a connection of the probe's own.
    """
    nc = runtime.nats
    if not nc.is_connected:
        raise NotReady("not connected")
    if not nats_read_loop_alive(nc):
        raise NotReady("the client stopped reading (reconnecting)")
    publisher = runtime.publisher
    if publisher is not None and publisher.stalled_for() > PUBLISH_STALL:
        raise NotReady("publishes are not acknowledged")
    await _probe_nats_server(runtime.settings.nats.url, **runtime.settings.nats.credentials())


async def _probe_nats_server(url: str, **credentials: str) -> None:
    async def quiet(exc: Exception) -> None:
        pass  # the probe's outcome is its answer; nats-py would log a traceback

    probe = await nats.connect(url, name="pgmeter-readyz", allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=READY_TIMEOUT * 0.75, error_cb=quiet, **credentials)
    await probe.close()


async def _check_valkey(runtime: Runtime) -> None:
    assert runtime.valkey is not None
    await runtime.valkey.ping()


def _outcome(result: BaseException | None) -> str:
    if result is None:
        return "ok"
    if isinstance(result, NotReady):
        return f"failed: {result}"
    return f"failed: {describe(result)}"


async def readiness(runtime: Runtime) -> dict[str, str]:
    """Each dependency's check: "ok" or "failed: <what>" (never an address or a server message)."""
    checks: dict[str, Awaitable[None]] = {"postgres": _check_postgres(runtime), "nats": _check_nats(runtime)}
    if runtime.valkey is not None:
        checks["valkey"] = _check_valkey(runtime)
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(check, READY_TIMEOUT) for check in checks.values()), return_exceptions=True
    )
    results: dict[str, str] = {}
    for name, outcome in zip(checks, outcomes, strict=True):
        failure = outcome if isinstance(outcome, BaseException) else None
        results[name] = _outcome(failure)
        if name in runtime.dependencies:
            state = runtime.dependency(name)
            if failure is None:
                state.recovered()
            else:
                state.failed(results[name].removeprefix("failed: "))
    return results


async def readyz(request: Request) -> Response:
    results = await readiness(request.app.state.runtime)
    failed = {name for name, value in results.items() if value != "ok"}
    ready = not failed & set(REQUIRED)
    status = "ok" if not failed else "degraded" if ready else "unavailable"
    return JSONResponse({"status": status, "checks": results}, status_code=200 if ready else 503)


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
