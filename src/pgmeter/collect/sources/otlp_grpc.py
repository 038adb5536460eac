"""OpenTelemetry logs over gRPC: the OTLP ``LogsService`` on a port of its own.

The same source as OTLP/HTTP (:mod:`pgmeter.collect.sources.otlp`): the same records,
the same mapping, and the same deterministic ids, so a record exported over either
transport - or over both, by two exporters - is counted once. The service stubs are
opentelemetry-proto's own; the server is grpcio's asyncio server, on the collector's
event loop.

Answers as an OTLP receiver does (the exporters act on the status):

- OK once every record's events are committed to the buffer;
- UNAVAILABLE when the buffer is full (the OTLP exporters retry it with backoff);
- UNAUTHENTICATED without a valid ``authorization: Bearer <token>`` in the metadata
  when the collector has ``authTokens`` (the api's tokens, checked by the api's code),
  PERMISSION_DENIED for a token of another namespace than the pipeline's;
- RESOURCE_EXHAUSTED (by grpcio) for a message over ``maxBodyBytes``.
"""

from __future__ import annotations

import logging

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from pgmeter.api.auth import bearer_namespace
from pgmeter.collect.buffer import BufferFull
from pgmeter.collect.pipeline import Pipeline
from pgmeter.collect.sources.otlp import OtlpLogsSource

log = logging.getLogger("pgmeter.collect")

STOP_GRACE_SECONDS = 2.0


class OtlpGrpcLogsSource(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, pipeline: Pipeline, listen: str, max_message_bytes: int, tokens: dict[str, str]) -> None:
        self.pipeline = pipeline
        self.listen = listen
        self.max_message_bytes = max_message_bytes
        self.logs = OtlpLogsSource(pipeline, max_message_bytes)
        self.tokens = [(token.encode(), namespace) for token, namespace in tokens.items()]

    async def Export(self, request: ExportLogsServiceRequest,  # the service method's own name
                     context: grpc.aio.ServicerContext) -> ExportLogsServiceResponse:
        if self.tokens:
            metadata = {key: value for key, value in (context.invocation_metadata() or ())}
            authorization = metadata.get("authorization", "")
            raw = authorization if isinstance(authorization, bytes) else authorization.encode()
            namespace = bearer_namespace(self.tokens, raw)
            if namespace is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "a valid bearer token is required (authorization: Bearer <token>)")
            expected = self.pipeline.config.namespace
            if expected is not None and namespace != expected:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"this token is for namespace {namespace!r}; this source collects for "
                                    f"namespace {expected!r}")
        try:
            await self.logs.take(request)
        except BufferFull as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"logs not stored: {exc}; retry the request")
        return ExportLogsServiceResponse()

    async def run(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_message_bytes)])
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, server)
        server.add_insecure_port(self.listen)  # RuntimeError when the address is taken: logged, retried
        await server.start()
        log.info("OTLP/gRPC logs source listening", extra={"pipeline": self.pipeline.name, "listen": self.listen})
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(STOP_GRACE_SECONDS)
