"""OTLP logs source, fed by the official OpenTelemetry Python SDK and its OTLP/HTTP exporter."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from pgmeter.collect.ids import content_hash, event_id
from pgmeter.collect.sources.otlp import flatten
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for

# Usage records are log records whose attributes say who used what.
MAPPING = ('select(.attributes["usage.type"] != null) | {type: .attributes["usage.type"], '
           'subject: .attributes["tpp.id"], time: .time, '
           'data: {units: .attributes["usage.units"], service: .resource["service.name"], message: .body}}')


def test_logs_from_the_official_sdk_become_events_once(tmp_path: Path) -> None:
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [{
            "name": "otel", "source": {"type": "otlp_logs"}, "mapping": MAPPING, "eventSource": "otlp",
            "to": {"url": endpoint.url, "linger": "10ms"}}])
        with CollectorServer(config) as collector:
            exporter = OTLPLogExporter(endpoint=f"{collector.base_url}/v1/logs", timeout=10)
            provider = LoggerProvider(resource=Resource.create({"service.name": "gateway"}))
            provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
            logger = provider.get_logger("usage-test")
            before = datetime.now(UTC)
            try:
                for i in range(5):
                    logger.emit(body=f"call {i}", timestamp=time.time_ns(), severity_text="INFO",
                                attributes={"usage.type": "api.call", "tpp.id": f"tpp-{i % 2}", "usage.units": i + 1})
                logger.emit(body="no usage here", timestamp=time.time_ns())  # the mapping emits nothing
                provider.force_flush()
            finally:
                provider.shutdown()
            after = datetime.now(UTC)
            wait_for(lambda: len(endpoint.accepted) == 5, what="5 usage events")
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: buffer.stats().events == 0, what="drained")
            assert buffer.dead_letters() == []
            # Not a request at all: 400 problem+json, nothing queued.
            bad = httpx.post(f"{collector.base_url}/v1/logs", content=b"\xff\x00garbage",
                             headers={"content-type": "application/x-protobuf"})
            assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
    events = endpoint.accepted
    assert [(e["type"], e["subject"], e["data"]) for e in events] == [
        ("api.call", f"tpp-{i % 2}", {"units": i + 1, "service": "gateway", "message": f"call {i}"})
        for i in range(5)]
    assert all(e["source"] == "otlp" for e in events)
    times = [datetime.fromisoformat(e["time"]) for e in events]
    assert all(before <= t <= after for t in times)
    assert len({e["id"] for e in events}) == 5


def test_the_id_is_the_records_content(tmp_path: Path) -> None:
    """An exporter's retry of the same request yields the same ids (so it is counted once)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

    record = LogRecord(time_unix_nano=1_700_000_000_123_456_789, body=AnyValue(string_value="x"),
                       attributes=[KeyValue(key="usage.type", value=AnyValue(string_value="api.call")),
                                   KeyValue(key="tpp.id", value=AnyValue(string_value="tpp-9")),
                                   KeyValue(key="usage.units", value=AnyValue(int_value=7))])
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[record])])])
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [{
            "name": "otel", "source": {"type": "otlp_logs"}, "mapping": MAPPING, "eventSource": "otlp",
            "to": {"url": endpoint.url, "linger": "10ms"}}], limits={"eventMaxAge": "100000h"})
        with CollectorServer(config) as collector:
            for _ in range(2):
                answer = httpx.post(f"{collector.base_url}/v1/logs", content=request.SerializeToString(),
                                    headers={"content-type": "application/x-protobuf"})
                assert answer.status_code == 200
            wait_for(lambda: len(endpoint.accepted) == 2, what="both deliveries")
    flat = flatten(request)[0]
    assert flat["time"] == "2023-11-14T22:13:20.123456Z"
    expected = event_id("otlp", "otlp-log", content_hash(flat))
    assert [e["id"] for e in endpoint.accepted] == [expected, expected]
