"""Health, readiness flipping with its dependencies, problem+json for unknown routes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from pgmeter.config import Settings
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer
from tests.support.metrics import delta, scrape


def wait_for_status(client: httpx.Client, path: str, status: int, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(path)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_liveness_smoke_probe_and_metrics(settings: Settings) -> None:
    with AppServer(settings, {"api"}) as app, app.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        health = client.get("/api/v1/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"postgres": "ok", "nats": "ok", "valkey": "ok"}
        before = scrape(client)
        assert client.get("/api/v1/health").status_code == 200
        after = scrape(client)
        route = {"http_route": "/api/v1/health"}
        assert delta(before, after, "http_server_request_duration_seconds_count", **route) == 1
        assert delta(before, after, "http_server_request_duration_seconds_bucket", le="+Inf", **route) == 1


def test_unknown_route_and_wrong_method_are_problems(settings: Settings) -> None:
    with AppServer(settings, {"api"}) as app, app.client() as client:
        missing = client.get("/api/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        body = missing.json()
        assert body["status"] == 404 and body["title"] == "Not Found" and "/api/v1/nothing-here" in body["detail"]
        assert body["instance"] == f"urn:request:{missing.headers['x-request-id']}"
        wrong = client.delete("/api/v1/health")
        assert wrong.status_code == 405 and wrong.json()["status"] == 405
        assert wrong.headers["content-type"] == "application/problem+json"


def test_request_id_is_echoed_when_safe(settings: Settings) -> None:
    with AppServer(settings, {"api"}) as app, app.client() as client:
        assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
        generated = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
        assert generated != "bad id\twith spaces" and len(generated) == 32


def test_readiness_follows_nats_valkey_and_postgres(settings: Settings, server_dir: Path) -> None:
    nats_port, valkey_port, pg_port = free_port(), free_port(), free_port()
    nats, nats_url = services.start_nats(server_dir / "nats", nats_port, log_path=server_dir / "nats.log")
    valkey, valkey_url = services.start_valkey(server_dir / "valkey", valkey_port, log_path=server_dir / "valkey.log")
    pg, pg_url = services.start_postgres(server_dir / "pg", pg_port, log_path=server_dir / "pg.log")
    from pgmeter.db.migrate import migrate

    migrate(pg_url)
    settings.nats.url, settings.valkey.url, settings.postgres.url = nats_url, valkey_url, pg_url
    try:
        with AppServer(settings, {"api"}) as app, app.client() as client:
            assert wait_for_status(client, "/readyz", 200).status_code == 200

            nats.stop()
            down = wait_for_status(client, "/readyz", 503)
            assert down.status_code == 503 and down.json()["checks"]["nats"] != "ok"
            assert down.json()["status"] == "unavailable"
            assert str(nats_port) not in down.text and "127.0.0.1" not in down.text
            assert down.json()["checks"]["postgres"] == "ok"
            assert client.get("/healthz").status_code == 200  # liveness does not follow dependencies
            nats, _ = services.start_nats(server_dir / "nats", nats_port, log_path=server_dir / "nats.log")
            assert wait_for_status(client, "/readyz", 200).status_code == 200

            # "Valkey down slows queries, never fails them": degraded, still ready.
            valkey.stop()
            deadline = time.monotonic() + 20
            while (degraded := client.get("/readyz")).json()["status"] != "degraded" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
            assert degraded.json()["checks"]["valkey"].startswith("failed: ")
            assert {k: v for k, v in degraded.json()["checks"].items() if k != "valkey"} == {"postgres": "ok", "nats": "ok"}
            valkey, _ = services.start_valkey(server_dir / "valkey", valkey_port, log_path=server_dir / "valkey.log")
            deadline = time.monotonic() + 20
            while client.get("/readyz").json()["status"] != "ok" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.get("/readyz").json() == {"status": "ok", "checks": {"postgres": "ok", "nats": "ok",
                                                                                 "valkey": "ok"}}

            pg.stop()
            down = wait_for_status(client, "/readyz", 503)
            assert down.status_code == 503 and down.json()["checks"]["postgres"] != "ok"
            # Which dependency failed, never where it lives.
            assert str(pg_port) not in down.text and "127.0.0.1" not in down.text
            pg, _ = services.start_postgres(server_dir / "pg", pg_port, log_path=server_dir / "pg.log")
            assert wait_for_status(client, "/readyz", 200).status_code == 200
    finally:
        for process in (nats, valkey, pg):
            process.stop()
