"""OpenMeter's consumer portal: tokens, their scope, list and invalidation, CORS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest

from pgmeter.config import Settings
from tests.support import events_sql, meter_env
from tests.support.app import AppServer
from tests.support.events_sql import Event

DAY = datetime(2024, 3, 5, tzinfo=UTC)
ADMIN = "admin-token-0123456789"
ORIGIN = "https://tpp.example"
RANGE = {"from": "2024-03-05T00:00:00Z", "to": "2024-03-06T00:00:00Z"}


@pytest.fixture
def server(settings: Settings) -> Iterator[AppServer]:
    settings.auth_tokens = {ADMIN: "default"}
    settings.portal.cors_allowed_origins = [ORIGIN]
    with AppServer(settings, {"api"}) as app, app.client(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        for body in (
            {"slug": "calls", "aggregation": "COUNT", "eventType": "api.call", "groupBy": {"endpoint": "$.endpoint"}},
            {"slug": "latency", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.ms"},
        ):
            assert admin.post("/api/v1/meters", json=body).status_code == 201
        events_sql.insert_committed(settings.postgres.url, [
            Event("tpp-a", DAY + timedelta(hours=1), {"endpoint": "/accounts", "ms": 10}, type="api.call"),
            Event("tpp-a", DAY + timedelta(hours=2), {"endpoint": "/payments", "ms": 30}, type="api.call"),
            Event("tpp-a", DAY + timedelta(hours=2, minutes=5), {"endpoint": "/accounts", "ms": 5}, type="api.call"),
            Event("tpp-b", DAY + timedelta(hours=1), {"endpoint": "/accounts", "ms": 99}, type="api.call"),
            Event("tpp-b", DAY + timedelta(hours=3), {"endpoint": "/balances", "ms": 1}, type="api.call"),
        ])
        meter_env.refresh(settings.postgres.url)
        yield app


@pytest.fixture
def admin(server: AppServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client


def create(admin: httpx.Client, **body: object) -> dict:
    response = admin.post("/api/v1/portal/tokens", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def portal_get(server: AppServer, slug: str, token: str, **params: object) -> httpx.Response:
    return httpx.get(f"{server.base_url}/api/v1/portal/meters/{slug}/query", params=params,  # type: ignore[arg-type]
                     headers={"Authorization": f"Bearer {token}"})


def test_token_is_openmeters_jwt(server: AppServer, admin: httpx.Client, settings: Settings) -> None:
    before = int(time.time())
    body = create(admin, subject="tpp-a", allowedMeterSlugs=["calls"])
    assert set(body) == {"id", "subject", "expiresAt", "expired", "createdAt", "token", "allowedMeterSlugs"}
    assert (body["subject"], body["expired"], body["allowedMeterSlugs"]) == ("tpp-a", False, ["calls"])
    assert settings.portal.token_secret
    claims = jwt.decode(body["token"], settings.portal.token_secret, algorithms=["HS256"], issuer="openmeter")
    assert (claims["sub"], claims["id"], claims["allowed_meter_slugs"]) == ("tpp-a", body["id"], ["calls"])
    # Default lifetime: portal.tokenExpiration, one hour.
    assert before + 3600 <= claims["exp"] <= int(time.time()) + 3600


def test_portal_query_sees_its_subject_only(server: AppServer, admin: httpx.Client) -> None:
    token = create(admin, subject="tpp-a")["token"]
    rows = portal_get(server, "calls", token, **RANGE).json()["data"]
    assert [(r["subject"], r["value"]) for r in rows] == [("tpp-a", 3)]
    windowed = portal_get(server, "latency", token, windowSize="HOUR", **RANGE).json()["data"]
    assert [(r["windowStart"], r["value"]) for r in windowed] == [
        ("2024-03-05T01:00:00Z", 10), ("2024-03-05T02:00:00Z", 35)]
    # Exactly what the namespace's own query answers for that subject.
    params = {"groupBy": "endpoint", "windowSize": "DAY", **RANGE}
    assert portal_get(server, "calls", token, **params).json() == admin.get(
        "/api/v1/meters/calls/query", params={**params, "subject": "tpp-a"}).json()
    csv = httpx.get(f"{server.base_url}/api/v1/portal/meters/calls/query", params=RANGE,
                    headers={"Authorization": f"Bearer {token}", "Accept": "text/csv"})
    assert csv.text == ("window_start,window_end,subject,value\n"
                        "2024-03-05T00:00:00Z,2024-03-06T00:00:00Z,tpp-a,3.000000\n")


def test_portal_token_opens_nothing_else(server: AppServer, admin: httpx.Client, settings: Settings) -> None:
    token = create(admin, subject="tpp-a", allowedMeterSlugs=["calls"])["token"]
    assert portal_get(server, "latency", token).status_code == 401  # not an allowed meter
    refused = portal_get(server, "calls", token, subject="tpp-b")
    assert refused.status_code == 400 and refused.json()["extensions"]["parameter"] == "subject"
    for path in ("/api/v1/meters", "/api/v1/events", "/api/v1/meters/calls/query", "/api/v1/portal/tokens"):
        assert httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert portal_get(server, "calls", ADMIN).status_code == 401  # a namespace token is no portal token
    assert httpx.get(f"{server.base_url}/api/v1/portal/meters/calls/query").status_code == 401
    assert settings.portal.token_secret
    claims = jwt.decode(token, settings.portal.token_secret, algorithms=["HS256"])
    forged = jwt.encode({**claims, "sub": "tpp-b"}, "another-key-of-at-least-32-bytes!!", algorithm="HS256")
    assert portal_get(server, "calls", forged).status_code == 401
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, settings.portal.token_secret, algorithm="HS256")
    assert portal_get(server, "calls", expired).status_code == 401
    unknown = jwt.encode({**claims, "id": "00000000-0000-4000-8000-000000000000"}, settings.portal.token_secret,
                         algorithm="HS256")
    assert portal_get(server, "calls", unknown).status_code == 401  # signed, but never issued
    assert portal_get(server, "calls", token).status_code == 200


def test_list_and_invalidate(server: AppServer, admin: httpx.Client) -> None:
    first = create(admin, subject="tpp-a")
    second = create(admin, subject="tpp-b", expiresAt=(datetime.now(UTC) + timedelta(days=2)).isoformat())
    third = create(admin, subject="tpp-b")
    listed = admin.get("/api/v1/portal/tokens").json()
    assert [t["id"] for t in listed] == [third["id"], second["id"], first["id"]]
    assert all("token" not in t and t["expired"] is False for t in listed)
    assert [t["id"] for t in admin.get("/api/v1/portal/tokens", params={"limit": 1}).json()] == [third["id"]]

    assert admin.post("/api/v1/portal/tokens/invalidate", json={"id": first["id"]}).status_code == 204
    assert portal_get(server, "calls", first["token"]).status_code == 401
    assert portal_get(server, "calls", second["token"]).status_code == 200
    assert admin.post("/api/v1/portal/tokens/invalidate", json={"subject": "tpp-b"}).status_code == 204
    assert portal_get(server, "calls", second["token"]).status_code == 401
    assert portal_get(server, "calls", third["token"]).status_code == 401
    assert [t["expired"] for t in admin.get("/api/v1/portal/tokens").json()] == [True, True, True]


BAD_CREATES = [
    ({}, 400, "subject"),
    ({"subject": ""}, 400, "subject"),
    ({"subject": "x" * 257}, 400, "subject"),
    ({"subject": "a", "allowedMeterSlugs": []}, 400, "allowedMeterSlugs"),
    ({"subject": "a", "allowedMeterSlugs": ["Not A Slug"]}, 400, "allowedMeterSlugs"),
    ({"subject": "a", "allowedMeterSlugs": ["nope"]}, 404, "allowedMeterSlugs"),
    ({"subject": "a", "expiresAt": "2020-01-01T00:00:00Z"}, 400, "expiresAt"),
    ({"subject": "a", "expiresAt": "soon"}, 400, "expiresAt"),
]


def test_create_refuses_bad_input(admin: httpx.Client) -> None:
    for body, status, field in BAD_CREATES:  # one server for all: each case is a request
        response = admin.post("/api/v1/portal/tokens", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["extensions"]["parameter"] == field, body
    assert admin.get("/api/v1/portal/tokens").json() == []  # nothing was stored


def test_invalidate_and_list_refuse_bad_input(admin: httpx.Client) -> None:
    assert admin.post("/api/v1/portal/tokens/invalidate", json={}).status_code == 400
    assert admin.post("/api/v1/portal/tokens/invalidate", json={"id": "nope"}).json()["extensions"]["parameter"] == "id"
    assert admin.get("/api/v1/portal/tokens", params={"limit": 101}).json()["extensions"]["parameter"] == "limit"
    assert httpx.post(f"{admin.base_url}/api/v1/portal/tokens", json={"subject": "a"}).status_code == 401


def test_cors_for_the_portal_query_only(server: AppServer, admin: httpx.Client) -> None:
    token = create(admin, subject="tpp-a")["token"]
    preflight = httpx.options(f"{server.base_url}/api/v1/portal/meters/calls/query", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    answer = httpx.get(f"{server.base_url}/api/v1/portal/meters/calls/query",
                       headers={"Origin": ORIGIN, "Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{server.base_url}/api/v1/portal/meters/calls/query",
                      headers={"Origin": "https://evil.example", "Authorization": f"Bearer {token}"})
    assert "access-control-allow-origin" not in other.headers
    admin_route = admin.get("/api/v1/meters", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in admin_route.headers


def test_without_a_secret_the_portal_says_so(settings: Settings) -> None:
    settings.portal.token_secret = None
    with AppServer(settings, {"api"}) as app, app.client() as client:
        response = client.post("/api/v1/portal/tokens", json={"subject": "a"})
        assert response.status_code == 501
        assert "PGMETER_PORTAL_TOKEN_SECRET" in response.json()["detail"]


def test_openmeters_python_sdk_portal_calls(server: AppServer) -> None:
    from corehttp.exceptions import HttpResponseError
    from openmeter import Client

    client = Client(endpoint=server.base_url)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    created = client.portal.portal_tokens.create({"subject": "tpp-a", "allowedMeterSlugs": ["calls"]}, headers=admin)
    assert created.subject == "tpp-a" and created.token and created.allowed_meter_slugs == ["calls"]
    portal = {"Authorization": f"Bearer {created.token}"}
    result = client.portal.portal_meters.query_json(
        "calls", from_parameter=datetime(2024, 3, 5, tzinfo=UTC), to=datetime(2024, 3, 6, tzinfo=UTC),
        window_size="HOUR", group_by=["endpoint"], headers=portal)
    assert [(r.subject, r.group_by, r.value) for r in result.data] == [
        ("tpp-a", {"endpoint": "/accounts"}, 1), ("tpp-a", {"endpoint": "/accounts"}, 1),
        ("tpp-a", {"endpoint": "/payments"}, 1)]
    assert [token.id for token in client.portal.portal_tokens.list(headers=admin)] == [created.id]
    client.portal.portal_tokens.invalidate({"id": created.id}, headers=admin)
    with pytest.raises(HttpResponseError) as refused:
        client.portal.portal_meters.query_json("calls", headers=portal)
    assert refused.value.status_code == 401
