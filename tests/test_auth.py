"""Bearer tokens bound to namespaces: no token reaches another namespace's data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

TOKEN_A = "token-for-bank-a-0123456789"
TOKEN_B = "token-for-bank-b-0123456789"
METER = {"slug": "calls", "eventType": "api.call", "aggregation": "COUNT"}


@pytest.fixture
def app(settings: Settings) -> Iterator[AppServer]:
    settings.auth_tokens = {TOKEN_A: "bank-a", TOKEN_B: "bank-b"}
    with AppServer(settings, {"api", "sink"}) as server:
        yield server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_requests_without_a_valid_token_are_refused(app: AppServer) -> None:
    with app.client() as client:
        for headers in ({}, bearer("not-a-known-token-at-all"), {"Authorization": f"Basic {TOKEN_A}"}):
            for method, path in (("GET", "/api/v1/meters"), ("POST", "/api/v1/events"),
                                 ("GET", "/api/v1/meters/calls/query"), ("GET", "/api/v1/events")):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["content-type"] == "application/problem+json"
                assert response.headers["www-authenticate"].startswith("Bearer")
        # The smoke probe and the operational endpoints stay open.
        assert client.get("/api/v1/health").status_code == 200
        assert client.get("/healthz").status_code == 200


def test_a_token_sees_only_its_own_namespace(app: AppServer, settings: Settings) -> None:
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    with app.client(headers=bearer(TOKEN_A)) as a, app.client(headers=bearer(TOKEN_B)) as b:
        assert a.post("/api/v1/meters", json=METER).status_code == 201
        # Same slug in another namespace is not a conflict: it is another meter.
        assert b.post("/api/v1/meters", json=METER).status_code == 201
        meter_a = a.get("/api/v1/meters/calls").json()
        assert b.get(f"/api/v1/meters/{meter_a['id']}").status_code == 404

        events_a = [make_event(id=f"a{n}", subject="tpp-a", time=at) for n in range(7)]
        events_b = [make_event(id=f"b{n}", subject="tpp-b", time=at) for n in range(3)]
        # The same (source, id) in two namespaces are two events.
        events_b.append(make_event(id="a0", subject="tpp-b", time=at))
        assert post_events(a, events_a).status_code == 204
        assert post_events(b, events_b).status_code == 204
        wait_until_stored(settings.postgres.url, 11)
        with psycopg.connect(settings.postgres.url) as conn:
            stored = dict(conn.execute("SELECT namespace, count(*) FROM events GROUP BY namespace").fetchall())
        assert stored == {"bank-a": 7, "bank-b": 4}

        assert a.get("/api/v1/meters/calls/query").json()["data"][0]["value"] == 7
        assert b.get("/api/v1/meters/calls/query").json()["data"][0]["value"] == 4
        assert {e["event"]["subject"] for e in a.get("/api/v1/events").json()} == {"tpp-a"}
        assert {e["event"]["subject"] for e in b.get("/api/v1/events").json()} == {"tpp-b"}
        assert a.get("/api/v1/meters/calls/subjects").json() == ["tpp-a"]
        assert b.get("/api/v1/meters/calls/subjects").json() == ["tpp-b"]

        # Deleting in one namespace leaves the other alone.
        assert b.delete("/api/v1/meters/calls").status_code == 204
        assert b.get("/api/v1/meters/calls").status_code == 404
        assert a.get("/api/v1/meters/calls").status_code == 200
