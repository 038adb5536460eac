"""What a bug answers (500 with detail and instance, one traceback), which errors mean
"unavailable", and that /metrics names no tenant unless asked to."""

from __future__ import annotations

import logging

import asyncpg
import psycopg
import pytest

from pgmeter.api.problems import unavailable_dependency
from pgmeter.config import Settings
from pgmeter.meters import store
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored


def test_a_bug_answers_500_with_detail_and_instance_and_logs_one_traceback(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "list_meters", broken)
    with AppServer(settings, {"api"}) as app, app.client() as client:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            response = client.get("/api/v1/meters")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["title"] == "Internal Server Error" and body["status"] == 500
    assert body["detail"] and "a bug" not in body["detail"]  # the detail never leaks internals
    assert body["instance"] == f"urn:request:{response.headers['x-request-id']}"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].name == "pgmeter.http", [r.getMessage() for r in tracebacks]
    assert tracebacks[0].levelno == logging.ERROR


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 5432)"),
    TimeoutError(),
    OSError(113, "No route to host"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    psycopg.OperationalError("connection failed"),
])
def test_connection_class_errors_mean_unavailable(exc: Exception) -> None:
    reason = unavailable_dependency(exc)
    assert reason is not None and "10.0.0.1" not in reason and "5432" not in reason


@pytest.mark.parametrize("exc", [
    ValueError("bad"), KeyError("k"), asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    FileNotFoundError(2, "No such file"),
])
def test_other_errors_are_bugs(exc: Exception) -> None:
    assert unavailable_dependency(exc) is None


def test_a_cause_counts_too() -> None:
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert unavailable_dependency(outer) is not None


METER = {"slug": "secret_meter_slug", "eventType": "api.call", "aggregation": "COUNT"}


def _exercise(app: AppServer, settings: Settings) -> str:
    with app.client() as client:
        assert client.post("/api/v1/meters", json=METER).status_code == 201
        assert post_events(client, [make_event(type="api.call")]).status_code == 204
        wait_until_stored(settings.postgres.url, 1)
        assert client.get("/api/v1/meters/secret_meter_slug/query").status_code == 200
        return client.get("/metrics").text


def test_metrics_name_no_tenant_by_default(settings: Settings) -> None:
    settings.namespace = "tenant_secret_ns"
    with AppServer(settings, {"api", "sink"}) as app:
        text = _exercise(app, settings)
    assert "tenant_secret_ns" not in text and "secret_meter_slug" not in text
    # The series exist, with empty tenant labels.
    assert 'openmeter_events_ingested_total{namespace=""}' in text
    assert 'openmeter_events_processed_total{namespace=""}' in text
    assert 'openmeter_query_latency_seconds_count{meter=""}' in text


def test_tenant_labels_are_an_opt_in(settings: Settings) -> None:
    settings.namespace = "tenant_secret_ns"
    settings.metrics.tenant_labels = True
    with AppServer(settings, {"api", "sink"}) as app:
        text = _exercise(app, settings)
    assert 'openmeter_events_ingested_total{namespace="tenant_secret_ns"}' in text
    assert 'openmeter_query_latency_seconds_count{meter="secret_meter_slug"}' in text
