"""Bearer tokens on the collector's push sources: the api's middleware, the api's 401."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

from pgmeter.api.auth import AuthMiddleware
from pgmeter.cli import build_parser
from pgmeter.collect.run import config_of
from pgmeter.config import ConfigError
from pgmeter.devstack.process import free_port
from tests.support.app import ThreadedServer
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for
from tests.support.ingest import make_event, post_events

TOKEN_A = "token-of-bank-a-0123456789"
TOKEN_B = "token-of-bank-b-0123456789"
TOKENS = {TOKEN_A: "bank-a", TOKEN_B: "bank-b"}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def api_401() -> tuple[int, dict[str, str], dict[str, object]]:
    """What pgmeter's api answers without a valid token: its own middleware, served alone."""
    from starlette.applications import Starlette

    port = free_port()
    server = ThreadedServer(AuthMiddleware(Starlette(), tokens=TOKENS, default_namespace="x"), "127.0.0.1", port)
    server.start()
    try:
        answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/events", json={})
    finally:
        server.stop()
    problem = answer.json()
    problem.pop("instance", None)
    return answer.status_code, {k: answer.headers[k] for k in ("content-type", "www-authenticate")}, problem


def test_push_sources_need_a_token_of_their_namespace(tmp_path: Path) -> None:
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        to = {"url": endpoint.url, "linger": "10ms"}
        config = collector_config(tmp_path / "buf", [
            {"name": "bank-a", "namespace": "bank-a", "source": {"type": "http", "path": "/a/api/v1/events"},
             "to": to},
            {"name": "any", "source": {"type": "http"}, "to": to},
            {"name": "otel", "namespace": "bank-b", "source": {"type": "otlp_logs"},
             "mapping": '{type: "log", subject: .body}', "to": to},
        ], authTokens=TOKENS)
        expected_401 = api_401()
        with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
            refusals = []
            for headers in ({}, bearer("not-a-token-0123456789"), {"authorization": f"Basic {TOKEN_A}"}):
                for path in ("/a/api/v1/events", "/api/v1/events", "/v1/logs"):
                    answer = client.post(path, json=make_event("no"), headers=headers)
                    problem = answer.json()
                    problem.pop("instance", None)
                    refusals.append((answer.status_code, {k: answer.headers[k] for k in expected_401[1]}, problem))
            assert refusals == [expected_401] * 9
            # A valid token of another namespace: refused by the pipeline that names its namespace.
            wrong = client.post("/a/api/v1/events", json=make_event("b-in-a"), headers=bearer(TOKEN_B))
            assert wrong.status_code == 403 and "bank-a" in wrong.json()["detail"]
            # Right tokens: accepted; a pipeline without a namespace takes any valid token.
            assert client.post("/a/api/v1/events", json=make_event("a-1"), headers=bearer(TOKEN_A)).status_code == 204
            assert client.post("/api/v1/events", json=make_event("any-1"), headers=bearer(TOKEN_B)).status_code == 204
            # The operational endpoints hold no usage: open (probes and Prometheus have no Secret).
            assert [client.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
            # The official OTLP exporter, with and without the header.
            assert _export(collector.base_url, {}, "unauthenticated") is False
            assert _export(collector.base_url, bearer(TOKEN_A), "wrong tenant") is False
            assert _export(collector.base_url, bearer(TOKEN_B), "tpp-7") is True
            wait_for(lambda: len(endpoint.accepted) == 3, what="three deliveries")
            assert all(p.buffer.stats().events == 0 for p in collector.collector.pipelines)
    assert sorted(e["id"] for e in endpoint.accepted if e["subject"] != "tpp-7") == ["a-1", "any-1"]
    assert [e["subject"] for e in endpoint.accepted if e["type"] == "log"] == ["tpp-7"]


def _export(base_url: str, headers: dict[str, str], body: str) -> bool:
    exporter = OTLPLogExporter(endpoint=f"{base_url}/v1/logs", headers=headers, timeout=5)
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    results = []
    original = exporter.export

    def export(batch):  # type: ignore[no-untyped-def]
        result = original(batch)
        results.append(result)
        return result

    exporter.export = export  # type: ignore[method-assign]
    try:
        provider.get_logger("auth-test").emit(body=body, timestamp=time.time_ns())
        provider.force_flush()
    finally:
        provider.shutdown()
    return [r.name for r in results] == ["SUCCESS"]


def test_the_flags_take_the_tokens_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["collect", "--listen", f"127.0.0.1:{free_port()}", "--to", "http://127.0.0.1:1",
                                      "--buffer", str(tmp_path / "buf")])
    monkeypatch.setenv("PGMETER_COLLECT_AUTH_TOKENS", json.dumps({TOKEN_A: "bank-a"}))
    with CollectorServer(config_of(args)) as collector, httpx.Client(base_url=collector.base_url) as client:
        assert post_events(client, make_event("e1")).status_code == 401
        client.headers.update(bearer(TOKEN_A))
        assert post_events(client, make_event("e1")).status_code == 204
    # A malformed variable is a usage error (exit 2, one line), before anything starts.
    monkeypatch.setenv("PGMETER_COLLECT_AUTH_TOKENS", '{"secret-short": "bank-a"}')
    with pytest.raises(ConfigError, match="^PGMETER_COLLECT_AUTH_TOKENS: .*16 characters") as refused:
        config_of(args)
    assert "secret" not in str(refused.value)  # the message never shows a token
