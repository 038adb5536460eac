"""OpenTelemetry logs source: an OTLP/HTTP receiver (``POST /v1/logs``).

Takes ``ExportLogsServiceRequest`` as protobuf (``application/x-protobuf``, what the
official SDKs send) or as OTLP JSON (``application/json``), gzip-compressed or not, and
answers as an OTLP receiver does: 200 with an ``ExportLogsServiceResponse`` once every
record's events are committed to the buffer; 400 for a body that is not a request;
503 with ``Retry-After`` when the buffer is full (the OTLP exporters retry 503).

Each log record becomes one flat record for the mapping::

    {"time", "timeUnixNano", "observedTimeUnixNano", "severityText", "severityNumber",
     "body", "attributes", "resource", "scope": {"name", "version", "attributes"},
     "traceId", "spanId", "eventName"}

``time`` is RFC 3339 from the record's time (its observed time when unset). The event
id is derived from the whole record's content, so an exporter's retry of the same batch
(after a timeout, say) is counted once. Two records identical in every field, down to
the nanosecond, are one event - document-level identity is all OTLP offers.
"""

from __future__ import annotations

import zlib
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from starlette.requests import Request
from starlette.responses import Response

from pgmeter.api.problems import problem_response
from pgmeter.collect import auth
from pgmeter.collect.buffer import BufferFull
from pgmeter.collect.ids import content_hash, event_id
from pgmeter.collect.mapping import rfc3339
from pgmeter.collect.pipeline import Pipeline

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class OtlpLogsSource:
    def __init__(self, pipeline: Pipeline, max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request) -> Response:
        refused = auth.refusal(request, self.pipeline.config)
        if refused is not None:
            return refused
        media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if media not in (PROTOBUF, JSON):
            return problem_response(415, f"unsupported content type {media or '(none)'}; use {PROTOBUF} or {JSON}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return problem_response(413, f"request body larger than {self.max_body_bytes} bytes")
        try:
            raw = self._decompress(bytes(body), request.headers.get("content-encoding", ""))
            message = ExportLogsServiceRequest()
            if media == PROTOBUF:
                message.ParseFromString(raw)
            else:
                json_format.Parse(raw.decode("utf-8"), message)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, OSError, zlib.error) as exc:
            return problem_response(400, f"not an OTLP ExportLogsServiceRequest: {exc}")
        try:
            await self.take(message)
        except BufferFull as exc:
            return problem_response(503, f"logs not stored: {exc}; retry the request",
                                    headers={"Retry-After": "1"})
        answer = ExportLogsServiceResponse()
        if media == JSON:
            return Response(json_format.MessageToJson(answer), media_type=JSON)
        return Response(answer.SerializeToString(), media_type=PROTOBUF)

    async def take(self, message: ExportLogsServiceRequest) -> None:
        """Map and buffer a request's records (the HTTP and gRPC transports alike: the same
        record gets the same id whichever way it came). Raises BufferFull."""
        records = [(record, event_id(self.pipeline.event_source, "otlp-log", content_hash(record)))
                   for record in flatten(message)]
        await self.pipeline.offer(self.pipeline.map(records), block=False)

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        if encoding.strip().lower() != "gzip":
            return body
        # Bounded: a small gzip body must not expand past the body limit (a zip bomb).
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflater.decompress(body, self.max_body_bytes + 1)
        if len(out) > self.max_body_bytes:
            raise ValueError(f"decompressed body larger than {self.max_body_bytes} bytes")
        return out


def flatten(message: ExportLogsServiceRequest) -> list[dict[str, Any]]:
    out = []
    for resource_logs in message.resource_logs:
        resource = attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            scope = {"name": scope_logs.scope.name, "version": scope_logs.scope.version,
                     "attributes": attributes(scope_logs.scope.attributes)}
            for record in scope_logs.log_records:
                nanos = record.time_unix_nano or record.observed_time_unix_nano
                out.append({
                    "time": rfc3339(nanos // 1000) if nanos else None,
                    "timeUnixNano": record.time_unix_nano,
                    "observedTimeUnixNano": record.observed_time_unix_nano,
                    "severityText": record.severity_text,
                    "severityNumber": record.severity_number,
                    "body": any_value(record.body),
                    "attributes": attributes(record.attributes),
                    "resource": resource,
                    "scope": scope,
                    "traceId": record.trace_id.hex(),
                    "spanId": record.span_id.hex(),
                    "eventName": record.event_name,
                })
    return out


def attributes(values: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in values if isinstance(kv, KeyValue)}


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)

