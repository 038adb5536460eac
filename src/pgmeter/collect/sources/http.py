"""HTTP source: OpenMeter's ingest API, answering as pgmeter's api does.

``POST /api/v1/events`` with ``application/cloudevents+json`` (one event),
``application/cloudevents-batch+json`` (an array) or ``application/json`` (either),
checked by the api's own code (:mod:`pgmeter.ingest.cloudevents`, the same limits):
a request with any bad event is refused whole with 400 problem+json naming every bad
event and field, exactly as the api would refuse it; a good one is answered 204 only
after its events are committed to the disk buffer. A full buffer answers 503 with
``Retry-After`` (OpenMeter's SDKs retry it), so nothing is accepted that is not kept.

Events keep the producer's ids (OpenMeter's SDKs send UUIDs), so a producer's retry
is deduplicated by the endpoint. An event without ``time`` is given the moment the
collector received it, as the api would, not the moment it is finally delivered.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgmeter.api.problems import problem_response
from pgmeter.collect import auth
from pgmeter.collect.buffer import BufferFull
from pgmeter.collect.mapping import Mapped, event_text
from pgmeter.collect.pipeline import Pipeline
from pgmeter.ingest import cloudevents

RETRY_AFTER_SECONDS = "1"


class HttpSource:
    def __init__(self, pipeline: Pipeline, max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request) -> Response:
        refused = auth.refusal(request, self.pipeline.config)
        if refused is not None:
            return refused
        now = cloudevents.now_micros()
        content_type = request.headers.get("content-type")
        media = cloudevents.media_type(content_type)
        if media not in cloudevents.CONTENT_TYPES:
            return problem_response(400, f"invalid content type: {content_type or '(none)'}; use "
                                    "application/cloudevents+json, application/cloudevents-batch+json "
                                    "or application/json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return problem_response(413, f"request body larger than {self.max_body_bytes} bytes")
        try:
            raw = cloudevents.events_of(media, cloudevents.parse_body(bytes(body)))
        except cloudevents.BodyError as exc:
            return problem_response(400, str(exc))
        events, errors = cloudevents.validate_events(raw, self.pipeline.limits, now)
        if not errors:
            errors = cloudevents.find_unencodable(events)
        if errors:
            return problem_response(400, cloudevents.describe(errors, len(raw)),
                                    extensions={"validationErrors": [e.as_dict() for e in errors]})
        # Every raw event is a dict here (validation passed); each keeps its own fields.
        texts = [event_text(_as_dict(event), checked[4]) for event, checked in zip(raw, events, strict=True)]
        try:
            await self.pipeline.offer(Mapped(texts, []), block=False)
        except BufferFull as exc:
            return problem_response(503, f"events not stored: {exc}; retry the request",
                                    headers={"Retry-After": RETRY_AFTER_SECONDS})
        return Response(status_code=204)


def _as_dict(event: Any) -> dict[str, Any]:
    assert isinstance(event, dict)
    return event
