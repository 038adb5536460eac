"""The collector process: its pipelines, their tasks, and one HTTP server.

The HTTP server on ``listen`` carries the push sources (HTTP ingest, OTLP logs) and the
operational endpoints OpenMeter's collector offers on its own port: ``/healthz``
(liveness), ``/readyz`` (every pipeline running) and ``/metrics`` (Prometheus).

Each pipeline's delivery and pull source runs as a task that is restarted after an
unexpected error (logged once, with the traceback), so one broken source never stops
the others or the delivery of what is already buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import AuthMiddleware
from pgmeter.collect import auth
from pgmeter.collect.mapping import MappingError
from pgmeter.collect.pipeline import Pipeline
from pgmeter.config import CollectorConfig, ConfigError, LimitsConfig
from pgmeter.ingest.limits import EventLimits

log = logging.getLogger("pgmeter.collect")

RESTART_SECONDS = 2.0


def event_limits(limits: LimitsConfig) -> EventLimits:
    """The api's event limits from the collector's ``limits`` section (same names and defaults)."""
    return EventLimits(
        id_bytes=limits.event_id_bytes, source_bytes=limits.event_source_bytes,
        type_bytes=limits.event_type_bytes, subject_bytes=limits.event_subject_bytes,
        max_age_micros=int(limits.event_max_age.total_seconds() * 1_000_000),
        max_ahead_micros=int(limits.event_max_ahead.total_seconds() * 1_000_000))


class Collector:
    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        limits = event_limits(config.limits)
        self.pipelines = []
        for pipeline_config in config.pipelines:
            try:
                self.pipelines.append(Pipeline(pipeline_config, Path(config.buffer), limits))
            except MappingError as exc:
                raise ConfigError(f"pipeline {pipeline_config.name}: {exc}") from None
        self.routes: list[Route] = []
        self.runners: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        for pipeline in self.pipelines:
            self.runners.append((f"{pipeline.name}/delivery", pipeline.delivery.run))
            self._add_source(pipeline)
        self.tasks: list[asyncio.Task[None]] = []

    def _add_source(self, pipeline: Pipeline) -> None:
        source = pipeline.config.source
        if source.type == "http":
            from pgmeter.collect.sources.http import HttpSource

            self.routes.append(Route(source.path or "/api/v1/events",
                                     HttpSource(pipeline, self.config.max_body_bytes).handle, methods=["POST"]))
        elif source.type == "otlp_logs":
            from pgmeter.collect.sources.otlp import OtlpLogsSource

            self.routes.append(Route(source.path or "/v1/logs",
                                     OtlpLogsSource(pipeline, self.config.max_body_bytes).handle, methods=["POST"]))
            if source.grpc_listen:
                from pgmeter.collect.sources.otlp_grpc import OtlpGrpcLogsSource

                grpc_source = OtlpGrpcLogsSource(pipeline, source.grpc_listen, self.config.max_body_bytes,
                                                 self.config.auth_tokens)
                self.runners.append((f"{pipeline.name}/otlp-grpc", grpc_source.run))
        elif source.type == "sql":
            from pgmeter.collect.sources.sql_sqlite import SqliteSource, is_sqlite

            if is_sqlite(source.url):
                self.runners.append((f"{pipeline.name}/source", SqliteSource(pipeline, source).run))
            else:
                from pgmeter.collect.sources.sql import SqlSource

                self.runners.append((f"{pipeline.name}/source", SqlSource(pipeline, source).run))
        elif source.type == "file":
            from pgmeter.collect.sources.file import FileSource

            self.runners.append((f"{pipeline.name}/source", FileSource(pipeline, source).run))
        elif source.type == "kubernetes":
            from pgmeter.collect.sources.kubernetes import KubernetesSource

            self.runners.append((f"{pipeline.name}/source", KubernetesSource(pipeline, source).run))
        elif source.type == "s3":
            from pgmeter.collect.sources.s3 import S3Source

            self.runners.append((f"{pipeline.name}/source", S3Source(pipeline, source).run))
        elif source.type == "prometheus":
            from pgmeter.collect.sources.prometheus import PrometheusSource

            self.runners.append((f"{pipeline.name}/source", PrometheusSource(pipeline, source).run))

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("collector task failed; restarting", extra={"task": name})
                await asyncio.sleep(RESTART_SECONDS)

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._supervise(name, run), name=name) for name, run in self.runners]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pipeline in self.pipelines:
            pipeline.buffer.close()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pipeline in self.pipelines:
            stats = pipeline.buffer.stats()
            out[pipeline.name] = {"buffered": stats.events, "bufferedBytes": stats.bytes,
                                  "oldestAgeSeconds": round(stats.oldest_age, 3), "deadLetters": stats.dead_letters,
                                  "endpointReachable": pipeline.delivery.connected}
        return out


def create_app(config: CollectorConfig) -> Starlette:
    collector = Collector(config)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        running = bool(collector.tasks) and all(not t.done() for t in collector.tasks)
        # SQLite reads take the buffer's lock: off the event loop, which serves the sources.
        body = {"status": "ready" if running else "not ready", "pipelines": await asyncio.to_thread(collector.status)}
        return JSONResponse(body, status_code=200 if running else 503)

    async def metrics_endpoint(request: Request) -> Response:
        for pipeline in collector.pipelines:
            await asyncio.to_thread(pipeline.refresh_gauges)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await collector.start()
        log.info("collector started", extra={"pipelines": [p.name for p in collector.pipelines],
                                             "listen": config.listen})
        try:
            yield
        finally:
            await collector.stop()

    routes = [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_endpoint),
              *collector.routes]
    middleware = []
    if config.auth_tokens:
        middleware.append(Middleware(AuthMiddleware, tokens=config.auth_tokens, default_namespace="",
                                     protects=auth.protects))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.collector = collector
    return app
