"""Customers, features, entitlements and grants over HTTP, against real Postgres.

Usage is written straight into ``events`` (tests/support/events_sql.py): these tests
are about the entitlement rules and the burn-down, not the ingest path (the SDK test
ingests through the API). Values are compared with numbers worked out by hand and
with the minute-by-minute oracle (tests/support/burndown.py).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgmeter.config import Settings
from pgmeter.meters.ulid import is_ulid
from tests.support import burndown, events_sql
from tests.support.app import AppServer
from tests.support.events_sql import Event

M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)


@pytest.fixture
def api(settings: Settings) -> Iterator[httpx.Client]:
    with AppServer(settings, {"api"}) as server, server.client() as client:
        assert client.post("/api/v1/meters", json={"slug": "api_calls", "eventType": "api.call",
                                                   "aggregation": "SUM", "valueProperty": "$.n",
                                                   "groupBy": {"endpoint": "$.endpoint"}}).status_code == 201
        yield client


@pytest.fixture
def api_module(settings: Settings) -> Iterator[tuple[httpx.Client, str]]:
    """One server for every hypothesis example (each example uses its own customer)."""
    with AppServer(settings, {"api"}) as server, server.client() as client:
        assert client.post("/api/v1/meters", json={"slug": "api_calls", "eventType": "api.call",
                                                   "aggregation": "SUM", "valueProperty": "$.n"}).status_code == 201
        assert client.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                     "meterSlug": "api_calls"}).status_code == 201
        yield client, settings.postgres.url


def minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def usage(url: str, subject: str, *points: tuple[datetime, int], endpoint: str = "/accounts") -> None:
    with psycopg.connect(url) as conn:
        events_sql.insert(conn, [Event(subject=subject, time=t, data={"n": n, "endpoint": endpoint},
                                       type="api.call") for t, n in points])


def backdate(url: str, entitlement_id: str, t: datetime) -> None:
    """Make an entitlement active since ``t``. OpenMeter's (and our) API starts it at creation,
    which would make every value before the test's start read ``hasAccess: false``."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE entitlements SET active_from = %s, created_at = %s WHERE id = %s",
                     (t, t, entitlement_id))


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    return body


def tpp(api: httpx.Client, key: str = "tpp-1", subjects: list[str] | None = None) -> dict[str, Any]:
    response = api.post("/api/v1/customers", json={"name": key.upper(), "key": key,
                                                   "usageAttribution": {"subjectKeys": subjects or [key]}})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def feature(api: httpx.Client, key: str = "calls", **extra: Any) -> dict[str, Any]:
    response = api.post("/api/v1/features", json={"key": key, "name": key, "meterSlug": "api_calls", **extra})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


# -- customers -------------------------------------------------------------------

def test_customers_crud_and_uniqueness(api: httpx.Client) -> None:
    created = tpp(api, "tpp-1", ["tpp-1", "tpp-1-sandbox"])
    assert is_ulid(created["id"]) and created["key"] == "tpp-1" and created["name"] == "TPP-1"
    assert created["usageAttribution"] == {"subjectKeys": ["tpp-1", "tpp-1-sandbox"]}
    assert api.get(f"/api/v1/customers/{created['id']}").json() == created
    assert api.get("/api/v1/customers/tpp-1").json() == created

    problem(api.post("/api/v1/customers", json={"name": "x"}), 400)
    assert "either key or usageAttribution.subjectKeys" in problem(
        api.post("/api/v1/customers", json={"name": "x", "usageAttribution": {"subjectKeys": []}}), 400)["detail"]
    problem(api.post("/api/v1/customers", json={"name": "x", "key": ""}), 400)
    problem(api.post("/api/v1/customers", json={"key": "k"}), 400)
    assert "must be fiat" in problem(api.post("/api/v1/customers", json={"name": "x", "key": "k",
                                                                         "currency": "XAU"}), 400)["detail"]
    # A subject belongs to one live customer; a key is unique among live customers.
    assert "subject keys" in problem(api.post("/api/v1/customers", json={
        "name": "y", "key": "tpp-2", "usageAttribution": {"subjectKeys": ["tpp-1-sandbox"]}}), 409)["detail"]
    problem(api.post("/api/v1/customers", json={"name": "y", "key": "tpp-1"}), 409)
    problem(api.post("/api/v1/customers", json={"name": "y", "key": "tpp-1-sandbox"}), 409)
    problem(api.post("/api/v1/customers", json={"name": "y", "key": created["id"]}), 409)

    # PUT replaces; removed subject keys are freed.
    updated = api.put("/api/v1/customers/tpp-1", json={"name": "TPP one", "key": "tpp-1",
                                                       "usageAttribution": {"subjectKeys": ["tpp-1"]}})
    assert updated.status_code == 200 and updated.json()["usageAttribution"]["subjectKeys"] == ["tpp-1"]
    other = tpp(api, "tpp-2", ["tpp-2", "tpp-1-sandbox"])
    listed = api.get("/api/v1/customers", params={"pageSize": 1}).json()
    assert listed["totalCount"] == 2 and listed["page"] == 1 and listed["pageSize"] == 1
    assert [c["key"] for c in listed["items"]] == ["tpp-1"]  # by name: "TPP one" < "TPP-2" (' ' < '-')
    assert [c["key"] for c in api.get("/api/v1/customers", params={"subject": "SANDBOX"}).json()["items"]] == ["tpp-2"]

    assert api.delete("/api/v1/customers/tpp-2").status_code == 204
    problem(api.get("/api/v1/customers/tpp-2"), 404)
    gone = api.get(f"/api/v1/customers/{other['id']}").json()
    assert gone["deletedAt"] and gone["usageAttribution"]["subjectKeys"] == ["tpp-1-sandbox", "tpp-2"]
    problem(api.delete(f"/api/v1/customers/{other['id']}"), 412)
    problem(api.put(f"/api/v1/customers/{other['id']}", json={"name": "z", "key": "z"}), 412)
    # The deleted customer's key and subjects are free again.
    tpp(api, "tpp-2", ["tpp-1-sandbox"])
    assert api.get("/api/v1/customers", params={"includeDeleted": "true"}).json()["totalCount"] == 3


# -- features --------------------------------------------------------------------

def test_features_rules_and_meter_protection(api: httpx.Client) -> None:
    created = feature(api, "calls", meterGroupByFilters={"endpoint": "/accounts"})
    assert created["meterSlug"] == "api_calls" and created["meterGroupByFilters"] == {"endpoint": "/accounts"}
    assert created["advancedMeterGroupByFilters"] == {"endpoint": {"$eq": "/accounts"}}
    assert api.get("/api/v1/features/calls").json() == created
    assert api.get(f"/api/v1/features/{created['id']}").json() == created
    assert [f["key"] for f in api.get("/api/v1/features").json()] == ["calls"]
    assert api.get("/api/v1/features", params={"page": 1}).json()["totalCount"] == 1

    problem(api.post("/api/v1/features", json={"key": "calls", "name": "again"}), 409)
    assert "ULID" in problem(api.post("/api/v1/features", json={"key": "01hzzzzzzzzzzzzzzzzzzzzzzz",
                                                                "name": "x"}), 400)["detail"]
    problem(api.post("/api/v1/features", json={"key": "Bad-Key", "name": "x"}), 400)
    problem(api.post("/api/v1/features", json={"key": "x", "name": "x", "meterSlug": "nope"}), 404)
    problem(api.post("/api/v1/features", json={"key": "x", "name": "x", "meterSlug": "api_calls",
                                               "meterGroupByFilters": {"model": "a"}}), 400)
    assert api.post("/api/v1/meters", json={"slug": "lat", "eventType": "x", "aggregation": "AVG",
                                            "valueProperty": "$.v"}).status_code == 201
    problem(api.post("/api/v1/features", json={"key": "x", "name": "x", "meterSlug": "lat"}), 400)
    assert api.post("/api/v1/features", json={"key": "flag", "name": "Flag"}).status_code == 201

    # The meter cannot go, nor lose the filtered group-by key, while the feature lives.
    problem(api.delete("/api/v1/meters/api_calls"), 409)
    problem(api.put("/api/v1/meters/api_calls", json={"groupBy": {}}), 409)
    assert api.put("/api/v1/meters/api_calls", json={"groupBy": {"endpoint": "$.endpoint",
                                                                 "method": "$.method"}}).status_code == 200
    assert api.delete("/api/v1/features/calls").status_code == 204
    problem(api.get("/api/v1/features/calls"), 404)
    problem(api.delete("/api/v1/features/calls"), 404)
    assert api.get("/api/v1/features", params={"includeArchived": "true"}).json()[0]["archivedAt"]
    assert api.delete("/api/v1/meters/api_calls").status_code == 204


# -- entitlements, grants, values ------------------------------------------------

def hour_start() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def value(api: httpx.Client, path: str, at: datetime | None = None) -> dict[str, Any]:
    response = api.get(path, params={"time": iso(at)} if at else None)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_metered_entitlement_through_v1_subject_routes(api: httpx.Client, settings: Settings) -> None:
    url = settings.postgres.url
    t0 = hour_start() - 3 * H
    tpp(api, "tpp-1", ["tpp-1", "tpp-1-sandbox"])
    feature(api, "calls")
    base = "/api/v1/subjects/tpp-1/entitlements"
    created = api.post(base, json={"type": "metered", "featureKey": "calls", "issueAfterReset": 100,
                                   "usagePeriod": {"interval": "MONTH", "anchor": iso(t0)},
                                   "measureUsageFrom": iso(t0)})
    assert created.status_code == 201, created.text
    ent = created.json()
    backdate(url, ent["id"], t0)
    assert ent["type"] == "metered" and ent["subjectKey"] == "tpp-1" and ent["featureKey"] == "calls"
    assert ent["usagePeriod"] == {"interval": "MONTH", "anchor": iso(t0), "intervalISO": "P1M"}
    assert ent["measureUsageFrom"] == iso(t0) and ent["lastReset"] == iso(t0)
    assert ent["currentUsagePeriod"]["from"] == iso(t0) and ent["issueAfterReset"] == 100
    assert ent["isSoftLimit"] is False and ent["isUnlimited"] is False
    conflict = problem(api.post(base, json={"type": "boolean", "featureKey": "calls"}), 409)
    assert conflict["extensions"]["conflictingEntityId"] == ent["id"]

    # The default grant: issueAfterReset at the period start, rolling over exactly its amount.
    [default] = api.get(f"{base}/{ent['id']}/grants").json()
    assert default["amount"] == 100 and default["priority"] == 1 and default["effectiveAt"] == iso(t0)
    assert default["minRolloverAmount"] == 100 and default["maxRolloverAmount"] == 100
    assert default["expiration"] == {"duration": "YEAR", "count": 100}  # v1 shows no expiry as 100 years

    usage(url, "tpp-1", (t0 + 10 * M, 30))
    usage(url, "tpp-1-sandbox", (t0 + H, 50))
    usage(url, "someone-else", (t0 + H, 1000))
    assert value(api, f"{base}/calls/value", t0 + 30 * M) == {
        "hasAccess": True, "balance": 70, "usage": 30, "overage": 0, "totalAvailableGrantAmount": 100}
    assert value(api, f"{base}/{ent['id']}/value") == {
        "hasAccess": True, "balance": 20, "usage": 80, "overage": 0, "totalAvailableGrantAmount": 100}
    # A time inside a minute counts that whole minute (OpenMeter rounds up).
    assert value(api, f"{base}/calls/value", t0 + 10 * M + timedelta(seconds=1))["usage"] == 30
    assert value(api, f"{base}/calls/value", t0 + 10 * M)["usage"] == 0

    # A second grant burns after the default one (priority 2).
    grant = api.post(f"{base}/calls/grants", json={"amount": 50, "priority": 2, "effectiveAt": iso(t0 + 2 * H),
                                                   "expiration": {"duration": "DAY", "count": 1}})
    assert grant.status_code == 201, grant.text
    g2 = grant.json()
    assert g2["expiresAt"] == iso(t0 + 2 * H + D) and g2["maxRolloverAmount"] == 0  # v1 default
    usage(url, "tpp-1", (t0 + 2 * H + 5 * M, 40))
    assert value(api, f"{base}/calls/value", t0 + 2 * H + 10 * M) == {
        "hasAccess": True, "balance": 30, "usage": 120, "overage": 0, "totalAvailableGrantAmount": 150}

    # Void: burns before it stay paid, later usage is overage.
    problem(api.delete(f"/api/v1/grants/{g2['id']}", params={"at": iso(t0 - D)}), 400)
    assert api.delete(f"/api/v1/grants/{g2['id']}", params={"at": iso(t0 + 2 * H + 30 * M)}).status_code == 204
    problem(api.delete(f"/api/v1/grants/{g2['id']}"), 400)
    problem(api.delete("/api/v1/grants/01ARZ3NDEKTSV4RRFFQ69G5FAV"), 404)
    usage(url, "tpp-1", (t0 + 2 * H + 40 * M, 5))
    assert value(api, f"{base}/calls/value", t0 + 2 * H + 45 * M) == {
        "hasAccess": False, "balance": 0, "usage": 125, "overage": 5, "totalAvailableGrantAmount": 120}
    assert value(api, f"{base}/calls/value", t0 + 2 * H + 10 * M)["balance"] == 30  # the past is unchanged

    # History, before the reset: hourly windows with the balance at each start.
    hist = api.get(f"{base}/{ent['id']}/history", params={"windowSize": "HOUR", "from": iso(t0),
                                                         "to": iso(t0 + 2 * H)})
    assert hist.status_code == 200, hist.text
    assert hist.json()["windowedHistory"] == [
        {"period": {"from": iso(t0), "to": iso(t0 + H)}, "usage": 30, "balanceAtStart": 100},
        {"period": {"from": iso(t0 + H), "to": iso(t0 + 2 * H)}, "usage": 50, "balanceAtStart": 70}]
    problem(api.get(f"{base}/{ent['id']}/history", params={"windowSize": "HOUR", "from": iso(t0 - H)}), 400)
    problem(api.get(f"{base}/{ent['id']}/history"), 400)

    # Reset: the default grant rolls over to exactly 100, usage and overage start again.
    problem(api.post(f"{base}/{ent['id']}/reset", json={"effectiveAt": iso(t0)}), 400)
    problem(api.post(f"{base}/{ent['id']}/reset", json={"effectiveAt": iso(datetime.now(UTC) + H)}), 400)
    assert api.post(f"{base}/{ent['id']}/reset", json={"effectiveAt": iso(t0 + 2 * H + 50 * M)}).status_code == 204
    usage(url, "tpp-1", (t0 + 2 * H + 55 * M, 10))
    assert value(api, f"{base}/calls/value") == {
        "hasAccess": True, "balance": 90, "usage": 10, "overage": 0, "totalAvailableGrantAmount": 100}
    after = api.get(f"{base}/{ent['id']}").json()
    assert after["lastReset"] == iso(t0 + 2 * H + 50 * M)
    assert after["currentUsagePeriod"]["from"] == iso(t0 + 2 * H + 50 * M)
    assert after["usagePeriod"]["anchor"] == iso(t0)  # the original anchor, even after re-anchoring
    problem(api.post(f"{base}/calls/grants", json={"amount": 5, "effectiveAt": iso(t0 + H),
                                                   "expiration": {"duration": "DAY", "count": 1}}), 400)

    # Override: a new entitlement (new id, no grants), the old one ends now.
    over = api.put(f"{base}/calls/override", json={"type": "boolean", "featureKey": "calls"})
    assert over.status_code == 201, over.text
    assert over.json()["id"] != ent["id"] and over.json()["type"] == "boolean"
    assert value(api, f"{base}/calls/value") == {"hasAccess": True}
    assert [e["id"] for e in api.get(base).json()] == [over.json()["id"]]
    # The customer routes: access lists what is active now; an unknown feature has no access.
    customer_value = value(api, "/api/v1/customers/tpp-1/entitlements/calls/value")
    assert customer_value == {"hasAccess": True}
    assert value(api, "/api/v1/customers/tpp-1/entitlements/nothing/value") == {"hasAccess": False}
    problem(api.get(f"{base}/nothing/value"), 404)
    assert api.get("/api/v1/customers/tpp-1/access").json() == {"entitlements": {"calls": {"hasAccess": True}}}
    problem(api.delete("/api/v1/customers/tpp-1"), 409)
    assert api.delete(f"{base}/{over.json()['id']}").status_code == 204
    problem(api.delete(f"{base}/{over.json()['id']}"), 404)
    assert api.delete("/api/v1/customers/tpp-1").status_code == 204


def test_entitlement_validation_and_subjects(api: httpx.Client) -> None:
    tpp(api, "tpp-1")
    feature(api, "calls")
    assert api.post("/api/v1/features", json={"key": "flag", "name": "Flag"}).status_code == 201
    base = "/api/v1/subjects/tpp-1/entitlements"
    metered = {"type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY"}}
    problem(api.post(base, json={"type": "metered", "featureKey": "calls"}), 400)
    problem(api.post(base, json={**metered, "usagePeriod": {"interval": "PT30M"}}), 400)
    problem(api.post(base, json={**metered, "usagePeriod": {"interval": "FORTNIGHT"}}), 400)
    problem(api.post(base, json={**metered, "config": "{}"}), 400)
    problem(api.post(base, json={**metered, "issueAfterResetPriority": 3}), 400)
    problem(api.post(base, json={"type": "metered", "featureKey": "flag", "usagePeriod": {"interval": "DAY"}}), 400)
    problem(api.post(base, json={"type": "static", "featureKey": "flag"}), 400)
    problem(api.post(base, json={"type": "static", "featureKey": "flag", "config": "{nope"}), 400)
    problem(api.post(base, json={"type": "boolean", "featureKey": "missing"}), 404)
    problem(api.post(base, json={"type": "bogus", "featureKey": "flag"}), 400)
    problem(api.post("/api/v1/subjects/nobody/entitlements", json={"type": "boolean", "featureKey": "flag"}), 404)
    # A subject known from the (deprecated) subjects API but with no customer: 412.
    assert api.post("/api/v1/subjects", json=[{"key": "orphan", "displayName": "Orphan"}]).json()[0]["key"] == "orphan"
    problem(api.post("/api/v1/subjects/orphan/entitlements", json={"type": "boolean", "featureKey": "flag"}), 412)

    static = api.post(base, json={"type": "static", "featureKey": "flag", "config": '{"tier": "gold"}'})
    assert static.status_code == 201 and static.json()["config"] == '{"tier": "gold"}'
    assert value(api, f"{base}/flag/value") == {"hasAccess": True, "config": '{"tier": "gold"}'}
    ent = api.post(base, json={**metered, "measureUsageFrom": "CURRENT_PERIOD_START"}).json()
    assert ent["measureUsageFrom"] == ent["currentUsagePeriod"]["from"]
    grants = f"{base}/calls/grants"
    now = iso(datetime.now(UTC))
    body = {"amount": 10, "effectiveAt": now, "expiration": {"duration": "HOUR", "count": 1}}
    assert problem(api.post(grants, json={**body, "amount": 0}), 400)["extensions"]["validationErrors"][0]["code"] \
        == "grant_amount_must_be_positive"
    problem(api.post(grants, json={**body, "amount": -1}), 400)
    problem(api.post(grants, json={**body, "priority": 0}), 400)
    problem(api.post(grants, json={**body, "expiration": None}), 400)
    problem(api.post(grants, json={**body, "expiration": {"duration": "DAY", "count": 1001}}), 400)
    problem(api.post(grants, json={**body, "recurrence": {"interval": "PT1M"}}), 400)
    problem(api.post(f"{base}/flag/grants", json=body), 400)  # not metered
    created = api.post(grants, json=body)
    assert created.status_code == 201 and created.json()["priority"] == 0  # omitted priority is 0
    listed = api.get("/api/v1/entitlements", params={"entitlementType": "metered"}).json()
    assert [e["id"] for e in listed] == [ent["id"]]
    assert api.get("/api/v1/grants").json()[0]["id"] == created.json()["id"]
    assert api.get("/api/v1/grants", params={"page": 1}).json()["totalCount"] == 1


def test_v2_customer_routes(api: httpx.Client, settings: Settings) -> None:
    t0 = hour_start() - 2 * H
    customer = tpp(api, "tpp-9")
    feature(api, "calls")
    base = f"/api/v2/customers/{customer['id']}/entitlements"
    created = api.post(base, json={
        "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY", "anchor": iso(t0)},
        "measureUsageFrom": iso(t0), "isSoftLimit": True,
        "grants": [{"amount": 40, "priority": 5, "effectiveAt": iso(t0)},
                   {"amount": 10, "priority": 1, "effectiveAt": iso(t0 + H)}]})
    assert created.status_code == 201, created.text
    ent = created.json()
    backdate(settings.postgres.url, ent["id"], t0)
    assert ent["customerId"] == customer["id"] and ent["customerKey"] == "tpp-9"
    problem(api.post(base, json={"type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY"},
                                 "issue": {"amount": 5}, "grants": [{"amount": 1, "effectiveAt": iso(t0)}]}), 400)
    problem(api.post(base, json={"type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY"},
                                 "issue": {"amount": 5}}), 409)
    grants = api.get(f"{base}/calls/grants").json()
    assert grants["totalCount"] == 2
    by_amount = {g["amount"]: g for g in grants["items"]}
    assert by_amount[40]["maxRolloverAmount"] == 40 and "expiration" not in by_amount[40]  # v2 defaults
    usage(settings.postgres.url, "tpp-9", (t0 + 5 * M, 30), (t0 + H + 5 * M, 15))
    got = value(api, f"{base}/calls/value", t0 + H + 30 * M)
    assert got == {"hasAccess": True, "balance": 5, "usage": 45, "overage": 0, "totalAvailableGrantAmount": 50,
                   "grantBalances": {by_amount[40]["id"]: 5, by_amount[10]["id"]: 0}}
    usage(settings.postgres.url, "tpp-9", (t0 + H + 10 * M, 20))
    got = value(api, f"{base}/{ent['id']}/value", t0 + H + 30 * M)
    assert (got["hasAccess"], got["balance"], got["overage"]) == (True, 0, 15)  # soft limit keeps access
    assert value(api, "/api/v2/customers/tpp-9/entitlements/nothing/value") == {"hasAccess": False}
    listed = api.get("/api/v2/entitlements", params={"customerKeys": "tpp-9"}).json()
    assert listed["totalCount"] == 1 and listed["items"][0]["id"] == ent["id"]
    assert api.get(f"/api/v2/entitlements/{ent['id']}").json()["id"] == ent["id"]
    assert api.get("/api/v2/grants").json()["totalCount"] == 2
    assert api.get(base).json()["items"][0]["id"] == ent["id"]


# -- snapshots -------------------------------------------------------------------

def snapshots(url: str, entitlement_id: str) -> list[tuple[datetime, Decimal]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT at, checksum FROM balance_snapshots WHERE entitlement_id = %s ORDER BY at",
                            (entitlement_id,)).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_snapshots_resume_reads_and_late_events_invalidate_what_they_cross(api: httpx.Client,
                                                                          settings: Settings) -> None:
    url = settings.postgres.url
    now_hour = hour_start()
    b = now_hour - 3 * H
    tpp(api, "tpp-s")
    feature(api, "calls")
    ent = api.post("/api/v2/customers/tpp-s/entitlements", json={
        "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "PT1H", "anchor": iso(b)},
        "measureUsageFrom": iso(b), "issueAfterReset": 100, "preserveOverageAtReset": True}).json()
    backdate(url, ent["id"], b)
    usage(url, "tpp-s", (b + 5 * M, 50), (b + H + 5 * M, 30), (b + 2 * H + 5 * M, 120), (now_hour, 10))
    path, at = "/api/v2/customers/tpp-s/entitlements/calls/value", now_hour + M
    first = value(api, path, at)
    # P2's overage (20) is carried into this hour and paid by the rolled-over default grant.
    assert (first["balance"], first["usage"], first["overage"], first["totalAvailableGrantAmount"]) == (70, 10, 0, 100)
    # The newest period start at least valkey.settleAfter (1h) old is kept: b+2h, having seen 80 of usage.
    assert snapshots(url, ent["id"]) == [(b + 2 * H, Decimal(80))]
    assert value(api, path, at) == first

    # A late event after the snapshot leaves it standing (it is re-checked, not thrown away)...
    usage(url, "tpp-s", (b + 2 * H + 10 * M, 50))
    second = value(api, path, at)
    assert (second["balance"], second["overage"]) == (20, 0)
    assert snapshots(url, ent["id"]) == [(b + 2 * H, Decimal(80))]
    # ...one before it crosses it: the snapshot is recomputed and the answer is exact.
    usage(url, "tpp-s", (b + H + 5 * M, 100))
    third = value(api, path, at)
    assert (third["hasAccess"], third["balance"], third["usage"], third["overage"]) == (False, 0, 10, 10)
    assert third["totalAvailableGrantAmount"] == 100
    assert snapshots(url, ent["id"]) == [(b + 2 * H, Decimal(180))]
    # Another customer's late event changes nothing here.
    usage(url, "someone-else", (b + 5 * M, 1000))
    assert value(api, path, at) == third


# -- against the oracle ------------------------------------------------------------

@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    span = 30 * 60  # minutes of history before now
    times = sorted(draw(st.lists(st.integers(0, span - 2), min_size=1, max_size=7, unique=True)))
    ops: list[tuple[int, str, dict[str, Any]]] = []
    grants = 0
    for t in times:
        kind = draw(st.sampled_from(["grant", "grant", "grant", "reset", "reset", "void"]))
        if kind == "void" and grants == 0:
            kind = "grant"
        if kind == "grant":
            grants += 1
            ops.append((t, "grant", {
                "amount": draw(st.integers(1, 100)), "priority": draw(st.integers(1, 4)),
                "hours": draw(st.sampled_from([None, None, None, 7])),
                "recur": draw(st.sampled_from([None, None, "PT2H", "PT5H"])),
                "max": draw(st.sampled_from([None, 0, 10])), "min": draw(st.sampled_from([None, 0, 5]))}))
        elif kind == "reset":
            ops.append((t, "reset", {"preserve": draw(st.booleans()), "retain": draw(st.booleans())}))
        else:
            ops.append((t, "void", {"grant": draw(st.integers(0, grants - 1))}))
    events = [(draw(st.integers(0, span - 1)), draw(st.integers(0, 40))) for _ in range(draw(st.integers(0, 10)))]
    instants = draw(st.lists(st.integers(0, span), min_size=1, max_size=4))
    return {"span": span, "ops": ops, "events": events, "instants": instants,
            "preserve": draw(st.booleans()), "soft": draw(st.booleans())}


@hypothesis_settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=histories())
def test_values_match_the_minute_oracle(api_module: tuple[httpx.Client, str], case: dict[str, Any]) -> None:
    api, url = api_module
    now = minute(datetime.now(UTC))
    base = now - case["span"] * M
    key = f"tpp-{uuid.uuid4().hex[:10]}"
    tpp(api, key)
    ent = api.post(f"/api/v2/customers/{key}/entitlements", json={
        "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "YEAR", "anchor": iso(base)},
        "measureUsageFrom": iso(base), "preserveOverageAtReset": case["preserve"], "isSoftLimit": case["soft"]})
    assert ent.status_code == 201, ent.text
    backdate(url, ent.json()["id"], base)
    prefix = f"/api/v2/customers/{key}/entitlements/calls"
    ogrants: list[burndown.OGrant] = []
    ids: list[str] = []
    resets: list[tuple[datetime, burndown.Every, bool]] = []
    anchor = base
    for offset, kind, op in case["ops"]:
        t = base + offset * M
        if kind == "grant":
            body: dict[str, Any] = {"amount": op["amount"], "priority": op["priority"], "effectiveAt": iso(t)}
            if op["hours"]:
                body["expiration"] = {"duration": "HOUR", "count": op["hours"]}
            if op["recur"]:
                body["recurrence"] = {"interval": op["recur"]}
            if op["max"] is not None:
                body["maxRolloverAmount"] = op["max"]
            if op["min"] is not None:
                body["minRolloverAmount"] = op["min"]
            created = api.post(f"{prefix}/grants", json=body)
            assert created.status_code == 201, created.text
            grant = created.json()
            ids.append(grant["id"])
            step = {"PT2H": 2 * H, "PT5H": 5 * H}.get(op["recur"] or "", timedelta(0))
            ogrants.append(burndown.OGrant(
                id=grant["id"], amount=Decimal(op["amount"]), priority=op["priority"], effective_at=t,
                created_at=datetime.fromisoformat(grant["createdAt"]),
                expires_at=t + op["hours"] * H if op["hours"] else None,
                min_rollover=Decimal(op["min"] or 0),
                max_rollover=Decimal(op["amount"] if op["max"] is None else op["max"]),
                recurrence=burndown.Every(t, step=step) if op["recur"] else None))
        elif kind == "reset":
            response = api.post(f"{prefix}/reset", json={"effectiveAt": iso(t), "preserveOverage": op["preserve"],
                                                         "retainAnchor": op["retain"]})
            if t == (resets[-1][0] if resets else base):
                problem(response, 400)  # a reset at the last reset (or measureUsageFrom) is refused
                continue
            assert response.status_code == 204, response.text
            anchor = anchor if op["retain"] else t
            resets.append((t, burndown.Every(anchor, months=12), op["preserve"]))
        else:
            target = ids[op["grant"]]
            response = api.delete(f"/api/v1/grants/{target}", params={"at": iso(t)})
            if response.status_code == 400:
                continue  # already voided, or before the current period: OpenMeter refuses it too
            assert response.status_code == 204, response.text
            index = ids.index(target)
            ogrants[index] = dataclasses.replace(ogrants[index], voided_at=t)
    per_minute: dict[datetime, Decimal] = {}
    for offset, n in case["events"]:
        per_minute[base + offset * M] = per_minute.get(base + offset * M, Decimal(0)) + n
    if case["events"]:
        usage(url, key, *[(base + offset * M, n) for offset, n in case["events"]])
    for offset in case["instants"]:
        at = base + offset * M
        got = value(api, f"{prefix}/value", at)
        want = burndown.value(ogrants, per_minute, base, burndown.Every(base, months=12), resets,
                              case["preserve"], at)
        assert got == {"hasAccess": case["soft"] or want.balance > 0, "balance": want.balance,
                       "usage": want.usage, "overage": want.overage, "totalAvailableGrantAmount": want.total,
                       "grantBalances": dict(sorted(want.grants.items()))}, (offset, case)


def test_history_windows_follow_the_time_zone(api: httpx.Client, settings: Settings) -> None:
    kolkata = ZoneInfo("Asia/Kolkata")  # UTC+05:30: local midnights are 18:30 UTC
    midnight = datetime.now(kolkata).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    start = midnight.astimezone(UTC)
    tpp(api, "tpp-k")
    feature(api, "calls")
    ent = api.post("/api/v2/customers/tpp-k/entitlements", json={
        "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "YEAR", "anchor": iso(start)},
        "measureUsageFrom": iso(start), "issueAfterReset": 100}).json()
    backdate(settings.postgres.url, ent["id"], start)
    usage(settings.postgres.url, "tpp-k", (start + H, 10), (start + D - M, 5), (start + D + 2 * H, 20))
    response = api.get(f"/api/v2/customers/tpp-k/entitlements/{ent['id']}/history", params={
        "windowSize": "DAY", "windowTimeZone": "Asia/Kolkata", "from": iso(start), "to": iso(start + 2 * D)})
    assert response.status_code == 200, response.text
    windows = response.json()["windowedHistory"]
    assert windows == [
        {"period": {"from": midnight.isoformat(), "to": (midnight + timedelta(days=1)).isoformat()},
         "usage": 15, "balanceAtStart": 100},
        {"period": {"from": (midnight + timedelta(days=1)).isoformat(),
                    "to": (midnight + timedelta(days=2)).isoformat()},
         "usage": 20, "balanceAtStart": 85}]
    burndown = response.json()["burndownHistory"]
    assert sum(s["usage"] for s in burndown) == 35
    assert burndown[-1]["balanceAtEnd"] == 65
    problem(api.get(f"/api/v2/customers/tpp-k/entitlements/{ent['id']}/history",
                    params={"windowSize": "DAY", "windowTimeZone": "Mars/Olympus"}), 400)
    problem(api.get(f"/api/v2/customers/tpp-k/entitlements/{ent['id']}/history",
                    params={"windowSize": "MINUTE", "from": iso(start)}), 400)  # too many windows


def test_unique_count_and_latest_meters(api: httpx.Client, settings: Settings) -> None:
    url = settings.postgres.url
    t0 = hour_start() - 2 * H
    for slug, aggregation, prop in (("users", "UNIQUE_COUNT", "$.user"), ("seats", "LATEST", "$.seats")):
        assert api.post("/api/v1/meters", json={"slug": slug, "eventType": slug, "aggregation": aggregation,
                                                "valueProperty": prop}).status_code == 201
        assert api.post("/api/v1/features", json={"key": slug, "name": slug, "meterSlug": slug}).status_code == 201
    tpp(api, "tpp-u")
    for slug in ("users", "seats"):
        ent = api.post("/api/v2/customers/tpp-u/entitlements", json={
            "type": "metered", "featureKey": slug, "usagePeriod": {"interval": "DAY", "anchor": iso(t0)},
            "measureUsageFrom": iso(t0), "issueAfterReset": 10})
        assert ent.status_code == 201, ent.text
        backdate(url, ent.json()["id"], t0)
    with psycopg.connect(url) as conn:
        events_sql.insert(conn, [
            Event(subject="tpp-u", time=t0 + 5 * M, data={"user": "a"}, type="users"),
            Event(subject="tpp-u", time=t0 + H, data={"user": "b"}, type="users"),
            Event(subject="tpp-u", time=t0 + H + M, data={"user": "a"}, type="users"),
            Event(subject="tpp-u", time=t0 + 5 * M, data={"seats": 5}, type="seats"),
            Event(subject="tpp-u", time=t0 + H, data={"seats": 3}, type="seats")])
    users = value(api, "/api/v2/customers/tpp-u/entitlements/users/value", t0 + 2 * H)
    assert (users["usage"], users["balance"]) == (2, 8)
    # LATEST: grants are limits, the latest value is what is in use.
    seats = value(api, "/api/v2/customers/tpp-u/entitlements/seats/value", t0 + 2 * H)
    assert (seats["usage"], seats["balance"], seats["hasAccess"]) == (3, 7, True)
