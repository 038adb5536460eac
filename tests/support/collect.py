"""Run ``pgmeter collect`` for a test: in a thread (fast) or as a subprocess (for kill -9)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import psycopg
import uvicorn
import yaml

from pgmeter.collect.app import Collector, create_app
from pgmeter.config import CollectorConfig
from pgmeter.devstack.process import free_port
from tests.support.app import PgmeterProcess, ServedApp, ThreadedServer


def collector_config(buffer: Path, pipelines: list[dict[str, Any]], **extra: Any) -> CollectorConfig:
    return CollectorConfig(listen=f"127.0.0.1:{free_port()}", buffer=buffer, pipelines=pipelines, **extra)


class CollectorServer(ServedApp):
    """The collector app under a real uvicorn server, on its own thread."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config

    @property
    def base_url(self) -> str:
        return f"http://{self.config.listen}"

    @property
    def collector(self) -> Collector:
        assert self._server is not None
        return self._server.config.app.state.collector  # type: ignore[union-attr]

    def start(self) -> CollectorServer:
        app = create_app(self.config)
        host, _, port = self.config.listen.rpartition(":")
        self._server = ThreadedServer(app, host, int(port), uvicorn.Config(
            app, host=host, port=int(port), log_config=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=1))
        self._server.start()
        return self


class CollectorProcess(PgmeterProcess):
    """``python -m pgmeter collect --config FILE`` as a child process, started ready."""

    def __init__(self, config: CollectorConfig, workdir: Path, name: str = "collector") -> None:
        self.config = config
        self.file = workdir / f"{name}.yaml"
        self.file.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
        super().__init__(["collect", "--config", str(self.file)], f"http://{config.listen}", workdir / f"{name}.log")

    def start(self, timeout: float = 30) -> Self:
        super().start()
        self.wait_ready(timeout)
        return self


def stored_ids(database_url: str) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM events ORDER BY id").fetchall()]


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class RecordingEndpoint:
    """A real HTTP endpoint that answers from a script (``concurrent``: several requests at
    once, the answer run in threads), for delivery's answers to
    status codes pgmeter would only give under a fault (Retry-After, OpenMeter's 400
    without indexes). ``answer(batch) -> (status, headers, body)``; batches that got a
    2xx are recorded in ``accepted`` and every attempt in ``attempts`` (time, ids, status)."""

    def __init__(self, answer: Callable[[list[dict[str, Any]]], tuple[int, dict[str, str], bytes]], *,
                 concurrent: bool = False) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.answer = answer
        self.accepted: list[dict[str, Any]] = []
        self.attempts: list[tuple[float, list[str], int, str | None]] = []

        async def ingest(request: Request) -> Response:
            batch = json.loads(await request.body())
            if concurrent:  # the answer may block: in a thread, so requests overlap
                status, headers, body = await asyncio.to_thread(self.answer, batch)
            else:
                status, headers, body = self.answer(batch)
            self.attempts.append((time.monotonic(), [e["id"] for e in batch], status,
                                  request.headers.get("authorization")))
            if 200 <= status < 300:
                self.accepted.extend(batch)
            return Response(body, status_code=status, headers=headers,
                            media_type="application/problem+json" if body else None)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/api/v1/events", ingest, methods=["POST"])])
        self._server = ThreadedServer(app, "127.0.0.1", self.port)

    def __enter__(self) -> RecordingEndpoint:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
