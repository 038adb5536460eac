"""Quota balances in Valkey (pgmeter.quota) stay equal to the exact computation.

Events go through the whole path (api -> JetStream -> sink -> quota worker -> Valkey).
After each fault (late events into a closed period, a grant voided mid-period, Valkey
losing every key, the sink killed with SIGKILL and its messages redelivered) every
Valkey hash of every metered entitlement is compared with the value the entitlements
engine computes from Postgres (the ``?time=`` path of the value endpoint, which never
reads Valkey).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import valkey

from pgmeter.config import Settings
from pgmeter.quota import layout
from tests.support.app import AppServer, RoleProcess
from tests.support.ingest import make_event, post_events, wait_until_stored
from tests.support.services import free_port

METER = {"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}
WAIT = 30.0


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture
def quota_settings(settings: Settings) -> Settings:
    nats = settings.nats.model_copy(update={"ack_wait": timedelta(seconds=2)})
    return settings.model_copy(update={"meters": [METER], "nats": nats})


def setup_customers(api: httpx.Client, url: str) -> dict[str, Any]:
    """Two TPPs: tpp-1 (a rolling-over grant since yesterday), tpp-2 (issueAfterReset 100 + a grant of 50)."""
    assert api.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                              "meterSlug": "api_calls"}).status_code == 201
    t0 = today() - timedelta(days=1)
    out: dict[str, Any] = {}
    for key in ("tpp-1", "tpp-2"):
        created = api.post("/api/v1/customers", json={"name": key, "key": key,
                                                      "usageAttribution": {"subjectKeys": [key, f"{key}-sandbox"]}})
        assert created.status_code == 201, created.text
        body: dict[str, Any] = {"type": "metered", "featureKey": "calls",
                                "usagePeriod": {"interval": "DAY", "anchor": iso(t0)}, "measureUsageFrom": iso(t0)}
        if key == "tpp-2":
            body["issueAfterReset"] = 100
        ent = api.post(f"/api/v2/customers/{key}/entitlements", json=body)
        assert ent.status_code == 201, ent.text
        out[key] = ent.json()
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE entitlements SET active_from = %s", (t0,))
    # tpp-1: 100 rolling over (up to 100) from yesterday; grants may not start before the
    # current period over the API, so it is moved back in SQL (as backdate() elsewhere).
    grant = api.post("/api/v2/customers/tpp-1/entitlements/calls/grants", json={
        "amount": 100, "effectiveAt": iso(today()), "minRolloverAmount": 0, "maxRolloverAmount": 100,
        "expiration": {"duration": "YEAR", "count": 1}})
    assert grant.status_code == 201, grant.text
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE grants SET effective_at = %s, updated_at = now() WHERE id = %s", (t0, grant.json()["id"]))
        conn.execute("DELETE FROM balance_snapshots")  # what the service does when a grant changes
    extra = api.post("/api/v2/customers/tpp-2/entitlements/calls/grants", json={
        "amount": 50, "priority": 5, "effectiveAt": iso(today()), "expiration": {"duration": "DAY", "count": 7}})
    assert extra.status_code == 201, extra.text
    out["tpp-2-extra"] = extra.json()
    return out


def exact(api: httpx.Client, customer_id: str, entitlement_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v2/customers/{customer_id}/entitlements/{entitlement_id}/value",
                       params={"time": iso(datetime.now(UTC))})
    assert response.status_code == 200, response.text
    assert "X-Pgmeter-Value-Source" not in response.headers  # a value at a time never comes from Valkey
    return response.json()  # type: ignore[no-any-return]


def mismatches(api: httpx.Client, url: str, vk: valkey.Valkey, prefix: str) -> list[str]:
    """Every difference between Valkey and the engine, over every key of every metered entitlement."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT e.id, e.customer_id, c.key, e.feature_key, "
            "  array(SELECT subject_key FROM customer_subjects s WHERE s.customer_id = c.id AND s.deleted_at IS NULL) "
            "FROM entitlements e JOIN customers c ON c.id = e.customer_id "
            "WHERE e.type = 'metered' AND e.deleted_at IS NULL").fetchall()
    assert rows, "no entitlements to compare"
    found: list[str] = []
    for ent_id, customer_id, customer_key, feature_key, subjects in rows:
        want = exact(api, customer_id, ent_id)
        keys = [layout.customer_key(prefix, "default", customer_id, feature_key),
                layout.customer_key(prefix, "default", customer_key, feature_key)]
        keys += [layout.subject_key(prefix, "default", s, feature_key) for s in {customer_key, *subjects}]
        for key in keys:
            stored = layout.Quota.parse(vk.hgetall(key))
            if stored is None:
                found.append(f"{key}: missing")
                continue
            got = {"hasAccess": stored.has_access, "balance": stored.balance, "usage": stored.usage,
                   "overage": stored.overage, "totalAvailableGrantAmount": stored.total_available}
            if stored.entitlement_id != ent_id or got != {k: want[k] if k == "hasAccess" else Decimal(str(want[k]))
                                                          for k in got}:
                found.append(f"{key}: {got} != {want}")
    return found


def assert_all_exact(api: httpx.Client, url: str, vk: valkey.Valkey, prefix: str) -> None:
    deadline = time.monotonic() + WAIT
    while (found := mismatches(api, url, vk, prefix)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == []


def send(api: httpx.Client, subject: str, n: int, at: datetime | None = None) -> None:
    response = post_events(api, [make_event(subject=subject, data={"n": n}, time=at or datetime.now(UTC))])
    assert response.status_code == 204, response.text


def quota_of(vk: valkey.Valkey, prefix: str, subject: str) -> layout.Quota | None:
    return layout.Quota.parse(vk.hgetall(layout.subject_key(prefix, "default", subject, "calls")))


def wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


@pytest.fixture
def vk(settings: Settings) -> Iterator[valkey.Valkey]:
    client = valkey.Valkey.from_url(settings.valkey.url)
    yield client
    client.close()


def test_valkey_balances_follow_events_late_events_voids_and_data_loss(quota_settings: Settings,
                                                                      vk: valkey.Valkey) -> None:
    settings, url, prefix = quota_settings, quota_settings.postgres.url, quota_settings.valkey.key_prefix
    with AppServer(settings, {"api", "sink"}) as server, server.client() as api:
        made = setup_customers(api, url)
        assert_all_exact(api, url, vk, prefix)
        # tpp-1 starts today with the 100 rolled over from yesterday; tpp-2 with 100 + 50.
        q1 = quota_of(vk, prefix, "tpp-1-sandbox")
        assert q1 is not None and q1.balance == 100 and q1.has_access and q1.period_start == layout.millis(today())
        q2 = quota_of(vk, prefix, "tpp-2")
        assert q2 is not None and q2.balance == 150

        # Events flow into Valkey through the sink's commits (both aliases of a customer).
        send(api, "tpp-1", 30)
        send(api, "tpp-1-sandbox", 5)
        send(api, "tpp-2", 120)
        wait_for(lambda: (q := quota_of(vk, prefix, "tpp-1")) is not None and q.usage == 35)
        assert_all_exact(api, url, vk, prefix)
        q1, q2 = quota_of(vk, prefix, "tpp-1"), quota_of(vk, prefix, "tpp-2")
        assert q1 is not None and q1.balance == 65 and q2 is not None and q2.balance == 30 and q2.usage == 120

        # The value endpoint answers from Valkey and says how fresh it is.
        response = api.get("/api/v1/subjects/tpp-1/entitlements/calls/value")
        assert response.status_code == 200 and response.headers["X-Pgmeter-Value-Source"] == "valkey"
        assert response.json() == {"hasAccess": True, "balance": 65, "usage": 35, "overage": 0,
                                   "totalAvailableGrantAmount": 100}
        assert int(response.headers["X-Pgmeter-Value-Seq"]) >= 1
        as_of = datetime.fromisoformat(response.headers["X-Pgmeter-Value-As-Of"])
        assert timedelta(0) <= datetime.now(UTC) - as_of < timedelta(minutes=5)
        admin = api.get("/api/v1/customers/tpp-2/entitlements/calls/value")
        assert admin.headers["X-Pgmeter-Value-Source"] == "valkey" and admin.json()["balance"] == 30
        v2 = api.get("/api/v2/customers/tpp-2/entitlements/calls/value")
        assert v2.headers["X-Pgmeter-Value-Source"] == "valkey"
        assert v2.json()["balance"] == 30 and sum(v2.json()["grantBalances"].values()) == 30

        # A late event into yesterday's closed period: the rollover shrinks by its amount.
        send(api, "tpp-1", 40, today() - timedelta(hours=12))
        wait_for(lambda: (q := quota_of(vk, prefix, "tpp-1")) is not None and q.balance == 25)
        assert_all_exact(api, url, vk, prefix)

        # The extra grant of tpp-2 voided mid-period: its 50 go, tpp-2 is 20 over.
        at = datetime.now(UTC).replace(second=0, microsecond=0)
        assert api.delete(f"/api/v1/grants/{made['tpp-2-extra']['id']}", params={"at": iso(at)}).status_code == 204
        wait_for(lambda: (q := quota_of(vk, prefix, "tpp-2")) is not None and q.balance == 0)
        assert_all_exact(api, url, vk, prefix)
        q2 = quota_of(vk, prefix, "tpp-2")
        assert q2 is not None and not q2.has_access and q2.overage == 20

        # A hash lost on its own (evicted): the value endpoint computes it and writes it back.
        for key in vk.scan_iter(match=f"{prefix}quota:v2:*:tpp-1*"):
            vk.delete(key)
        response = api.get("/api/v1/subjects/tpp-1/entitlements/calls/value")
        assert response.headers["X-Pgmeter-Value-Source"] == "computed" and response.json()["balance"] == 25
        assert api.get("/api/v1/subjects/tpp-1/entitlements/calls/value").headers["X-Pgmeter-Value-Source"] == "valkey"
        # Valkey loses everything pgmeter wrote (as a restart without persistence): until the
        # worker's heartbeat is back the endpoint computes; the background rebuild restores every key.
        for key in vk.scan_iter(match=f"{prefix}*"):
            vk.delete(key)
        response = api.get("/api/v1/subjects/tpp-2/entitlements/calls/value")
        assert response.status_code == 200 and response.json()["balance"] == 0
        assert_all_exact(api, url, vk, prefix)
        wait_for(lambda: api.get("/api/v1/subjects/tpp-2/entitlements/calls/value").headers.get(
            "X-Pgmeter-Value-Source") == "valkey")

        # validUntil: the next instant the value changes without an event (a grant starting),
        # less the minute a value read rounds up to; a hash past it is not served.
        start = (datetime.now(UTC) + timedelta(minutes=5)).replace(second=0, microsecond=0)
        assert api.post("/api/v2/customers/tpp-2/entitlements/calls/grants", json={
            "amount": 7, "effectiveAt": iso(start), "expiration": {"duration": "DAY", "count": 1}}).status_code == 201
        wait_for(lambda: (q := quota_of(vk, prefix, "tpp-2")) is not None
                 and q.valid_until == layout.millis(start) - 60_000)
        vk.hset(layout.subject_key(prefix, "default", "tpp-2", "calls"), "validUntil", "0")
        response = api.get("/api/v1/subjects/tpp-2/entitlements/calls/value")
        assert response.headers["X-Pgmeter-Value-Source"] == "computed" and response.json()["balance"] == 0
        q2 = quota_of(vk, prefix, "tpp-2")
        assert q2 is not None and q2.valid_until == layout.millis(start) - 60_000  # written back
        assert_all_exact(api, url, vk, prefix)

        # An event timed ahead of now is not counted yet: the hash says until when it holds.
        ahead = datetime.now(UTC) + timedelta(minutes=3, seconds=30)
        send(api, "tpp-1", 1, ahead)
        wait_for(lambda: (q := quota_of(vk, prefix, "tpp-1")) is not None
                 and q.valid_until == layout.millis(ahead.replace(second=0, microsecond=0)))
        q1 = quota_of(vk, prefix, "tpp-1")
        assert q1 is not None and q1.balance == 25
        assert_all_exact(api, url, vk, prefix)

        # A customer's subject removed: its hash goes, the others stay exact.
        updated = api.put("/api/v1/customers/tpp-1", json={"name": "tpp-1", "key": "tpp-1",
                                                           "usageAttribution": {"subjectKeys": ["tpp-1"]}})
        assert updated.status_code == 200, updated.text
        wait_for(lambda: quota_of(vk, prefix, "tpp-1-sandbox") is None)
        assert_all_exact(api, url, vk, prefix)


def test_sink_killed_and_redelivered_leaves_valkey_exact(quota_settings: Settings, vk: valkey.Valkey,
                                                         tmp_path: Path) -> None:
    settings, url, prefix = quota_settings, quota_settings.postgres.url, quota_settings.valkey.key_prefix
    sink_settings = settings.model_copy(update={"address": f"127.0.0.1:{free_port()}"})
    with AppServer(settings, {"api"}) as server, server.client() as api:
        setup_customers(api, url)
        sink = RoleProcess(sink_settings, "sink", tmp_path).start()
        try:
            sink.wait_ready()
            total = 0
            for round_ in range(3):
                for i in range(40):
                    subject = ("tpp-1", "tpp-2", "tpp-1-sandbox", "tpp-2-sandbox")[i % 4]
                    response = post_events(api, [make_event(subject=subject, data={"n": 1 + i % 3})
                                                 for _ in range(5)])
                    assert response.status_code == 204
                    total += 5
                if round_ < 2:
                    sink.kill()  # SIGKILL, whatever it holds: redelivered after ackWait
                    assert sink.process is not None and sink.process.returncode == -9
                    sink = RoleProcess(sink_settings, "sink", tmp_path).start()
                    sink.wait_ready()
            wait_until_stored(url, total)
            assert_all_exact(api, url, vk, prefix)
            with psycopg.connect(url) as conn:
                used = conn.execute("SELECT sum((data->>'n')::int) FROM events WHERE subject LIKE 'tpp-1%'").fetchone()
            q1 = quota_of(vk, prefix, "tpp-1")
            assert q1 is not None and used is not None and q1.usage == used[0]
        finally:
            sink.stop()


def test_layout_parse_refuses_other_versions() -> None:
    fields = {"v": "1", "entitlementId": "x"}
    assert layout.Quota.parse(fields) is None
    assert layout.Quota.parse({}) is None
    good = {"v": "2", "entitlementId": "e", "hasAccess": "1", "balance": "1.5", "usage": "2", "overage": "0",
            "totalAvailable": "3.5", "softLimit": "0", "grantBalances": json.dumps({"g": "1.5"}),
            "periodStart": "1", "periodEnd": "2", "validUntil": "3", "asOf": "4", "seq": "5", "updatedAt": "6"}
    parsed = layout.Quota.parse(good)
    assert parsed is not None and parsed.balance == Decimal("1.5") and parsed.grant_balances == {"g": Decimal("1.5")}


def test_valkey_restarted_without_its_data_is_rebuilt(quota_settings: Settings, tmp_path: Path) -> None:
    """A real restart of a Valkey that keeps nothing: the worker reconnects and rebuilds every hash."""
    from pgmeter.devstack import services

    port = free_port()
    proc, valkey_url = services.start_valkey(tmp_path / "valkey", port, log_path=tmp_path / "valkey.log")
    settings = quota_settings.model_copy(update={"valkey": quota_settings.valkey.model_copy(
        update={"url": valkey_url})})
    url, prefix = settings.postgres.url, settings.valkey.key_prefix
    vk = valkey.Valkey.from_url(valkey_url)
    try:
        with AppServer(settings, {"api", "sink"}) as server, server.client() as api:
            setup_customers(api, url)
            send(api, "tpp-2", 70)
            wait_for(lambda: (q := quota_of(vk, prefix, "tpp-2")) is not None and q.usage == 70)
            proc.stop()
            send(api, "tpp-2", 10)  # committed while Valkey is away
            proc, _ = services.start_valkey(tmp_path / "valkey", port, log_path=tmp_path / "valkey.log")
            assert_all_exact(api, url, vk, prefix)
            q2 = quota_of(vk, prefix, "tpp-2")
            assert q2 is not None and q2.usage == 80 and q2.balance == 70
    finally:
        vk.close()
        proc.stop()
