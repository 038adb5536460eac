"""A local HTTP server that follows Lago's documented contract for batch events.

Lago itself cannot run here, so the sync is tested against this stand-in. It
implements what the sync relies on, as lago-api behaves (Postgres event store):

- ``Authorization: Bearer <key>``; a missing or unknown key is 401.
- ``POST /api/v1/events/batch`` with ``{"events": [...]}``: a missing root key is
  400; an empty list or more than 100 events is a 422 on ``events``.
- ``transaction_id``, ``external_subscription_id`` and ``code`` are required;
  ``timestamp`` must be Unix seconds (number or numeric string).
- ``transaction_id`` is unique per ``external_subscription_id``: a repeat is a 422
  ``{"<index>": {"transaction_id": ["value_already_exist"]}}``, every duplicate
  reported.
- The batch is all-or-nothing: any error stores none of it.
- Rate limiting answers 429 with ``X-RateLimit-Limit/Remaining/Reset``.

Tests steer it with ``outage`` (5xx for the next N calls), ``rate_limit`` (429 for
the next N calls), ``fail_after_store`` (store, then answer 500) and
``hold_answers`` (store, then keep the client waiting, so a test can kill it
between Lago's commit and the client's bookkeeping).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import defaultdict
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.devstack.process import free_port
from tests.support.app import ThreadedServer


class FakeLago:
    def __init__(self, api_key: str = "lago-test-key") -> None:
        self.api_key = api_key
        self.port = free_port()
        self.lock = threading.Lock()
        self.stored: list[dict[str, Any]] = []
        self._ids: set[tuple[str, str]] = set()
        self._lago_ids = itertools.count(1)
        self.calls = 0
        self.outage = 0             # answer 503 to the next N calls
        self.rate_limit = 0         # answer 429 to the next N calls
        self.rate_limit_reset = 0   # X-RateLimit-Reset seconds sent with them
        self.fail_after_store = 0   # store the batch, then answer 500, N times
        # While set, a stored batch's answer is held back (so a test can kill the
        # client between Lago's commit and the client's bookkeeping).
        self.hold_answers = threading.Event()
        app = Starlette(routes=[Route("/api/v1/events/batch", self._batch, methods=["POST"])])
        self._server = ThreadedServer(app, "127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeLago:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """Everything received, summed per (external_subscription_id, code)."""
        sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        with self.lock:
            for event in self.stored:
                value = Decimal(str(event["properties"]["value"]))
                sums[(event["external_subscription_id"], event["code"])] += value
        return dict(sums)

    async def _batch(self, request: Request) -> Response:
        with self.lock:
            self.calls += 1
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"status": 401, "error": "Unauthorized"}, status_code=401)
            if self.outage > 0:
                self.outage -= 1
                return JSONResponse({"status": 503, "error": "Service Unavailable"}, status_code=503)
            if self.rate_limit > 0:
                self.rate_limit -= 1
                return JSONResponse(
                    {"status": 429, "error": "Too Many Requests"}, status_code=429,
                    headers={"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": str(self.rate_limit_reset)},
                )
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"status": 400, "error": "BadRequest: invalid JSON"}, status_code=400)
        if not isinstance(body, dict) or "events" not in body:
            return JSONResponse({"status": 400, "error": "BadRequest: param is missing or the value is "
                                 "empty: events"}, status_code=400)
        events = body["events"]
        if not isinstance(events, list) or not events:
            return _unprocessable({"events": ["no_events"]})
        if len(events) > 100:
            return _unprocessable({"events": ["too_many_events"]})
        with self.lock:
            errors: dict[str, dict[str, list[str]]] = {}
            seen_in_batch: set[tuple[str, str]] = set()
            for index, event in enumerate(events):
                problems = _validate(event)
                key = (str(event.get("external_subscription_id")), str(event.get("transaction_id")))
                if not problems and (key in self._ids or key in seen_in_batch):
                    problems["transaction_id"] = ["value_already_exist"]
                seen_in_batch.add(key)
                if problems:
                    errors[str(index)] = problems
            if errors:
                return _unprocessable(errors)
            stored = []
            for event in events:
                record = {**event, "lago_id": f"lago-{next(self._lago_ids)}"}
                self._ids.add((event["external_subscription_id"], event["transaction_id"]))
                self.stored.append(record)
                stored.append(record)
            if self.fail_after_store > 0:
                self.fail_after_store -= 1
                return JSONResponse({"status": 500, "error": "Internal Server Error"}, status_code=500)
        while self.hold_answers.is_set():
            await asyncio.sleep(0.02)
        return JSONResponse({"events": stored})


def _validate(event: Any) -> dict[str, list[str]]:
    if not isinstance(event, dict):
        return {"event": ["invalid_format"]}
    problems: dict[str, list[str]] = {}
    for field in ("transaction_id", "external_subscription_id", "code"):
        if not event.get(field):
            problems[field] = ["value_is_mandatory"]
    timestamp = event.get("timestamp")
    if timestamp is not None:
        try:
            float(timestamp)
        except (TypeError, ValueError):
            problems["timestamp"] = ["invalid_format"]
    properties = event.get("properties", {})
    if not isinstance(properties, dict) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in properties.values()):
        problems["properties"] = ["invalid_format"]
    return problems


def _unprocessable(details: dict[str, Any]) -> Response:
    return JSONResponse({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                         "error_details": details}, status_code=422)
