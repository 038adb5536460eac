"""``/api/v1/events``: OpenMeter's ingest (POST) and event listing (GET).

POST answers ``204`` with an empty body only after JetStream acknowledged every
event of the request (see :mod:`pgmeter.ingest.publisher`); anything that keeps
the events from being stored is a ``503`` with ``Retry-After``, which OpenMeter's
SDKs retry - harmless, because the sink dedups on (namespace, source, id). A bad
event fails the whole request with ``400`` naming every bad event and field.

The POST handler is a plain ASGI app rather than a Starlette request/response
function: it is the hottest path of the service, and skipping the Request and
Response objects was measured at about a tenth of the per-request CPU.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.metrics import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pgmeter.api.auth import namespace_of
from pgmeter.api.problems import bad_request, problem_response
from pgmeter.ingest import cloudevents, listing, metrics
from pgmeter.ingest.publisher import PublishUnavailable
from pgmeter.ingest.publisher import of as publisher_of
from pgmeter.ingest.wire import EventTooLarge
from pgmeter.metric_labels import tenant
from pgmeter.query import customers

RETRY_AFTER_SECONDS = "1"
_ingested: dict[str, Counter] = {}


def _ingested_counter(namespace: str) -> Counter:
    label = tenant(namespace)
    counter = _ingested.get(label)
    if counter is None:
        counter = _ingested[label] = metrics.EVENTS_INGESTED.labels(label)
    return counter


class IngestEvents:
    """``POST /api/v1/events`` as an ASGI app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The moment the request was received: an event's time window counts from
        # here, not from when a slow body finished arriving.
        now = cloudevents.now_micros()
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
                break
        media = cloudevents.media_type(content_type)
        if media not in cloudevents.CONTENT_TYPES:
            await self._problem(scope, receive, send, 400, f"invalid content type: {content_type or '(none)'}; use "
                                "application/cloudevents+json, application/cloudevents-batch+json or application/json")
            return
        body = await self._body(receive)
        try:
            raw = cloudevents.events_of(media, cloudevents.parse_body(body))
        except cloudevents.BodyError as exc:
            await self._problem(scope, receive, send, 400, str(exc))
            return
        runtime = scope["app"].state.runtime
        events, errors = cloudevents.validate_events(raw, runtime.event_limits, now)
        if not errors and events:
            publisher = publisher_of(runtime)
            try:
                chunks = publisher.encode(events)
            except UnicodeEncodeError:
                errors = cloudevents.find_unencodable(events)
            except EventTooLarge as exc:
                await self._problem(scope, receive, send, 413, str(exc))
                return
        if errors:
            await self._problem(scope, receive, send, 400, cloudevents.describe(errors, len(raw)),
                                validationErrors=[error.as_dict() for error in errors])
            return
        if events:  # application/cloudevents-batch+json with [] is accepted, as OpenMeter does
            namespace = scope["state"]["namespace"]
            try:
                await publisher.publish(namespace, chunks)
            except PublishUnavailable as exc:
                await self._problem(scope, receive, send, 503, f"events not stored: {exc}; retry the request")
                return
            _ingested_counter(namespace).inc(len(events))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _body(receive: Receive) -> bytes:
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body
        parts = [body]
        while message.get("more_body", False):
            message = await receive()
            parts.append(message.get("body", b""))
        return b"".join(parts)

    @staticmethod
    async def _problem(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                       **extensions: Any) -> None:
        metrics.INGEST_REJECTED.labels(str(status)).inc()
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
        await problem_response(status, detail, extensions=extensions or None, headers=headers)(scope, receive, send)


def _optional_time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    return None if raw is None else listing.parse_datetime(name, raw)


async def list_events(request: Request) -> Response:
    query = request.query_params
    now = datetime.now(UTC)
    try:
        start = _optional_time(request, "from")
        limit_raw = query.get("limit")
        try:
            limit = listing.MAX_LIMIT if limit_raw is None else int(limit_raw)
        except ValueError:
            raise listing.ListError(f"limit: {limit_raw!r} is not an integer") from None
        params = listing.ListParams(
            namespace=namespace_of(request),
            # OpenMeter's default: the oldest allowed "from", plus a second of slack.
            start=start if start is not None else now - listing.MAX_FROM_AGE + timedelta(seconds=1),
            end=_optional_time(request, "to"),
            ingested_from=_optional_time(request, "ingestedAtFrom"),
            ingested_to=_optional_time(request, "ingestedAtTo"),
            id=query.get("id"),
            subject=query.get("subject"),
            limit=limit,
        )
        client_id = query.get("clientId")
        if client_id is not None and not 1 <= len(client_id) <= 36:
            raise listing.ListError("clientId must be 1 to 36 characters")
        listing.validate(params, now)
    except listing.ListError as exc:
        raise bad_request(str(exc)) from None
    ids = query.getlist("customerId")
    if ids:
        # The events of the customers' keys and subject keys (OpenMeter); an unknown id is a 400 here.
        runtime = request.app.state.runtime
        try:
            found = await customers.attribution(runtime.api_pool, params.namespace, ids)
        except customers.UnknownCustomer as exc:
            raise bad_request(f"customers not found in namespace {params.namespace}: "
                              f"{', '.join(exc.missing)}") from None
        params = dataclasses.replace(params, customer_subjects=tuple(s for keys in found.values() for s in keys))
    items = await listing.list_events(request.app.state.runtime.query_pool, params)
    return JSONResponse(items)


routes = [
    Route("/api/v1/events", IngestEvents(), methods=["POST"]),
    Route("/api/v1/events", list_events, methods=["GET"]),
]
