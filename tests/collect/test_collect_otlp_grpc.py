"""OTLP logs over gRPC, fed by the official OpenTelemetry SDK's gRPC exporter and by
opentelemetry-proto's own LogsService stub."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import LogsServiceStub
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from pgmeter.collect.ids import content_hash, event_id
from pgmeter.collect.sources.otlp import flatten
from pgmeter.devstack.process import free_port
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for

TOKEN = "token-of-bank-a-0123456789"
OTHER = "token-of-bank-b-0123456789"
MAPPING = ('select(.attributes["usage.type"] != null) | {type: .attributes["usage.type"], '
           'subject: .attributes["tpp.id"], time: .time, data: {units: .attributes["usage.units"]}}')


def export(target: str, token: str | None, n: int) -> list[str]:
    """n usage records through the SDK's gRPC exporter; the export results' names."""
    headers = (("authorization", f"Bearer {token}"),) if token else None
    exporter = OTLPLogExporter(endpoint=target, insecure=True, headers=headers, timeout=5)
    results = []
    original = exporter.export

    def recorded(batch):  # type: ignore[no-untyped-def]
        results.append(original(batch).name)
        return results[-1]

    exporter.export = recorded  # type: ignore[method-assign]
    provider = LoggerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    try:
        for i in range(n):
            provider.get_logger("grpc-test").emit(
                body=f"call {i}", timestamp=time.time_ns(),
                attributes={"usage.type": "api.call", "tpp.id": f"tpp-{i}", "usage.units": i + 1})
        provider.force_flush()
    finally:
        provider.shutdown()
    return results


def one_record_request(units: int, padding: int = 0) -> ExportLogsServiceRequest:
    record = LogRecord(time_unix_nano=time.time_ns() // 1000 * 1000, body=AnyValue(string_value="x" * padding),
                       attributes=[KeyValue(key="usage.type", value=AnyValue(string_value="api.call")),
                                   KeyValue(key="tpp.id", value=AnyValue(string_value="tpp-9")),
                                   KeyValue(key="usage.units", value=AnyValue(int_value=units))])
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[record])])])


def test_the_sdks_grpc_exporter_with_a_token_and_one_id_whichever_transport(tmp_path: Path) -> None:
    grpc_listen = f"127.0.0.1:{free_port()}"
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [{
            "name": "otel", "namespace": "bank-a", "source": {"type": "otlp_logs", "grpcListen": grpc_listen},
            "mapping": MAPPING, "eventSource": "otlp", "to": {"url": endpoint.url, "linger": "10ms"}}],
            authTokens={TOKEN: "bank-a", OTHER: "bank-b"})
        with CollectorServer(config) as collector:
            wait_for(lambda: _serving(grpc_listen), timeout=10, what="gRPC port")
            assert export(grpc_listen, TOKEN, 3) == ["SUCCESS"] * 3
            # Not retried, not stored: no token, and a token of another namespace.
            assert export(grpc_listen, None, 1) == ["FAILURE"]
            assert export(grpc_listen, OTHER, 1) == ["FAILURE"]
            wait_for(lambda: len(endpoint.accepted) == 3, what="3 events")
            # The same record over gRPC (the proto's own stub) and over HTTP: one id.
            request = one_record_request(7)
            with grpc.insecure_channel(grpc_listen) as channel:
                LogsServiceStub(channel).Export(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
                try:
                    LogsServiceStub(channel).Export(request, timeout=5)
                    raise AssertionError("accepted without a token")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = httpx.post(f"{collector.base_url}/v1/logs", content=request.SerializeToString(),
                                headers={"content-type": "application/x-protobuf", "authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200
            wait_for(lambda: len(endpoint.accepted) == 5, what="both transports")
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: buffer.stats().events == 0, what="drained")
    events = endpoint.accepted
    assert sorted((e["subject"], e["data"]["units"]) for e in events[:3]) == [("tpp-0", 1), ("tpp-1", 2), ("tpp-2", 3)]
    expected = event_id("otlp", "otlp-log", content_hash(flatten(request)[0]))
    assert [e["id"] for e in events[3:]] == [expected, expected]


def test_a_full_buffer_answers_unavailable_and_takes_the_retry(tmp_path: Path) -> None:
    down = True
    grpc_listen = f"127.0.0.1:{free_port()}"
    with RecordingEndpoint(lambda batch: (503, {}, b"") if down else (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [{
            "name": "otel", "source": {"type": "otlp_logs", "grpcListen": grpc_listen},
            "mapping": MAPPING.replace("data: {", "data: {message: .body, "), "bufferMaxBytes": 1024,
            "to": {"url": endpoint.url, "linger": "10ms", "backoffMax": "100ms"}}])
        with CollectorServer(config), grpc.insecure_channel(grpc_listen) as channel:
            wait_for(lambda: _serving(grpc_listen), timeout=10, what="gRPC port")
            stub = LogsServiceStub(channel)
            stub.Export(one_record_request(1, padding=2000), timeout=5)  # an empty buffer takes any one write
            try:
                stub.Export(one_record_request(2), timeout=5)
                raise AssertionError("accepted past the bound")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE  # what the OTLP exporters retry
            down = False
            wait_for(lambda: len(endpoint.accepted) == 1, what="the first delivered")
            wait_for(lambda: _export_ok(stub, one_record_request(2)), what="the retry accepted")
            wait_for(lambda: len(endpoint.accepted) == 2, what="the retry delivered")
    assert [e["data"]["units"] for e in endpoint.accepted] == [1, 2]


def _export_ok(stub: LogsServiceStub, request: ExportLogsServiceRequest) -> bool:
    try:
        stub.Export(request, timeout=5)
        return True
    except grpc.RpcError:
        return False


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False
