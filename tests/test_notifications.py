"""Notifications: channels, rules, events, and their webhooks verified with ``standardwebhooks``.

A receiver (a real HTTP server) verifies every delivery with the Standard Webhooks
reference package; it is switched off for a while and must still get every event
later. Thresholds fire once per period; an explicit reset fires its own rule and
re-arms the thresholds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgmeter.config import Settings
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer, ThreadedServer
from tests.support.ingest import make_event, post_events

METER = {"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}
WAIT = 30.0


class Receiver:
    """Verifies each delivery with ``standardwebhooks``; answers 503 while ``down``."""

    def __init__(self) -> None:
        self.secret = ""
        self.down = False
        self.received: list[dict[str, Any]] = []  # verified payloads, in arrival order
        self.ids: list[str] = []
        self.refused = 0  # deliveries answered 503 while down
        self.bad = 0  # deliveries whose signature did not verify
        self.lock = threading.Lock()
        self.port = free_port()
        self.server = ThreadedServer(Starlette(routes=[Route("/hook", self.hook, methods=["POST"])]),
                                     "127.0.0.1", self.port)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            if self.down:
                self.refused += 1
                return Response(status_code=503)
            try:
                payload = Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:
                self.bad += 1
                return Response(status_code=400)
            self.received.append(payload)
            self.ids.append(request.headers["webhook-id"])
        return Response(status_code=204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.server.start()
    yield found
    found.server.stop()


def wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_thresholds_once_per_period_resets_and_a_receiver_that_was_down(settings: Settings,
                                                                         receiver: Receiver) -> None:
    notifications = settings.notifications.model_copy(update={"retry_schedule": [
        timedelta(0), *[timedelta(milliseconds=300)] * 30]})
    built = settings.model_copy(update={"meters": [METER], "notifications": notifications})
    url = built.postgres.url
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    with AppServer(built, {"api", "sink"}) as server, server.client() as api:
        assert api.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                  "meterSlug": "api_calls"}).status_code == 201
        assert api.post("/api/v1/customers", json={"name": "TPP", "key": "tpp-5",
                                                   "usageAttribution": {"subjectKeys": ["tpp-5"]}}).status_code == 201
        ent = api.post("/api/v1/subjects/tpp-5/entitlements", json={
            "type": "metered", "featureKey": "calls", "issueAfterReset": 100, "measureUsageFrom": iso(t0),
            "usagePeriod": {"interval": "DAY", "anchor": iso(t0)}})
        assert ent.status_code == 201, ent.text
        entitlement_id = ent.json()["id"]
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE entitlements SET active_from = %s", (t0,))

        # Door checks name the field.
        bad = api.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "x", "url": "ftp://x"})
        assert bad.status_code == 400 and bad.json()["extensions"]["field"] == "url"
        bad = api.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "x", "url": receiver.url,
                                                               "signingSecret": "nope"})
        assert bad.status_code == 400 and bad.json()["extensions"]["field"] == "signingSecret"
        channel = api.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "ops",
                                                                   "url": receiver.url})
        assert channel.status_code == 201, channel.text
        receiver.secret = channel.json()["signingSecret"]
        assert receiver.secret.startswith("whsec_")
        bad = api.post("/api/v1/notification/rules", json={
            "type": "entitlements.balance.threshold", "name": "t", "channels": [channel.json()["id"]],
            "thresholds": [{"type": "NUMBER", "value": 0}]})
        assert bad.status_code == 400 and bad.json()["extensions"]["field"] == "thresholds[0].value"
        threshold_rule = api.post("/api/v1/notification/rules", json={
            "type": "entitlements.balance.threshold", "name": "quota", "channels": [channel.json()["id"]],
            "features": ["calls"], "thresholds": [{"type": "NUMBER", "value": 50}, {"type": "PERCENT", "value": 90},
                                                  {"type": "balance_value", "value": 0}]})
        assert threshold_rule.status_code == 201, threshold_rule.text
        assert threshold_rule.json()["features"][0]["key"] == "calls"
        reset_rule = api.post("/api/v1/notification/rules", json={
            "type": "entitlements.reset", "name": "resets", "channels": [channel.json()["id"]]})
        assert reset_rule.status_code == 201, reset_rule.text

        before = datetime.now(UTC) - timedelta(minutes=10)

        def use(n: int, at: datetime) -> None:
            assert post_events(api, [make_event(subject="tpp-5", data={"n": n}, time=at)]).status_code == 204

        def thresholds() -> list[Any]:
            return [(p["data"]["threshold"]["type"], p["data"]["threshold"]["value"]) for p in receiver.received
                    if p["type"] == "entitlements.balance.threshold"]

        use(60, before)  # usage 60 > 50: NUMBER 50 fires
        wait_for(lambda: thresholds() == [("NUMBER", 50)])
        use(5, before)  # still NUMBER 50 the highest: nothing new
        receiver.down = True
        use(30, before)  # usage 95: PERCENT 90 (90 of 100) fires, while the receiver is down
        use(10, before)  # usage 105, balance 0: balance_value 0 fires
        wait_for(lambda: receiver.refused >= 4)
        receiver.down = False
        wait_for(lambda: len(thresholds()) == 3)
        assert sorted(thresholds()[1:]) == [("PERCENT", 90), ("balance_value", 0)]
        value = receiver.received[-1]["data"]["value"]
        assert value["usage"] == 105 and value["balance"] == 0 and value["hasAccess"] is False

        # An explicit reset fires its rule and re-arms every threshold for the new period.
        assert api.post(f"/api/v1/subjects/tpp-5/entitlements/{entitlement_id}/reset", json={}).status_code == 204
        wait_for(lambda: any(p["type"] == "entitlements.reset" for p in receiver.received))
        use(60, datetime.now(UTC))
        wait_for(lambda: len(thresholds()) == 4)
        assert thresholds()[3] == ("NUMBER", 50)
        time.sleep(1.0)  # nothing else may come: each threshold once per period
        assert len(receiver.received) == 5 and receiver.bad == 0
        assert len(set(receiver.ids)) == 5 and set(receiver.ids) == {p["id"] for p in receiver.received}

        # Events are listed with their delivery status, and can be resent (same webhook-id).
        events = api.get("/api/v1/notification/events").json()
        assert events["totalCount"] == 5
        assert all(e["deliveryStatus"][0]["state"] == "SUCCESS" for e in events["items"])
        late = [e for e in events["items"] if e["payload"]["data"].get("threshold", {}).get("type") == "PERCENT"][0]
        assert len(late["deliveryStatus"][0]["attempts"]) >= 2  # refused first, delivered later
        assert api.get(f"/api/v1/notification/events/{late['id']}").json()["id"] == late["id"]
        by_rule = api.get("/api/v1/notification/events", params={"rule": reset_rule.json()["id"]}).json()
        assert by_rule["totalCount"] == 1
        assert api.post(f"/api/v1/notification/events/{late['id']}/resend").status_code == 202
        wait_for(lambda: len(receiver.received) == 6)
        assert receiver.ids[-1] == late["id"]
        assert api.get("/api/v1/notification/events/nope").status_code == 404

        # Channels in use cannot go; rules can, then the channel.
        assert api.delete(f"/api/v1/notification/channels/{channel.json()['id']}").status_code == 409
        for rule in (threshold_rule, reset_rule):
            assert api.delete(f"/api/v1/notification/rules/{rule.json()['id']}").status_code == 204
        assert api.delete(f"/api/v1/notification/channels/{channel.json()['id']}").status_code == 204
        assert api.get("/api/v1/notification/channels").json()["totalCount"] == 0
        assert api.get("/api/v1/notification/channels", params={"includeDeleted": "true"}).json()["totalCount"] == 1


def test_notifications_without_valkey_or_the_quota_store(settings: Settings, receiver: Receiver) -> None:
    """An api+sink deployment without Valkey: thresholds and resets still notify, and a rule
    created after usage crossed it fires too (the worker recomputes once someone listens)."""
    built = settings.model_copy(update={"meters": [METER], "valkey": settings.valkey.model_copy(update={"url": None})})
    with AppServer(built, {"api", "sink"}) as server, server.client() as api:
        assert api.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                  "meterSlug": "api_calls"}).status_code == 201
        assert api.post("/api/v1/customers", json={"name": "TPP", "key": "tpp-6",
                                                   "usageAttribution": {"subjectKeys": ["tpp-6"]}}).status_code == 201
        t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)  # so it can be reset now
        ent = api.post("/api/v1/subjects/tpp-6/entitlements", json={
            "type": "metered", "featureKey": "calls", "issueAfterReset": 10, "measureUsageFrom": iso(t0),
            "usagePeriod": {"interval": "DAY", "anchor": iso(t0)}})
        assert ent.status_code == 201, ent.text
        with psycopg.connect(built.postgres.url) as conn:
            conn.execute("UPDATE entitlements SET active_from = %s", (t0,))
        value = api.get("/api/v1/subjects/tpp-6/entitlements/calls/value")
        assert "X-Pgmeter-Value-Source" not in value.headers  # no Valkey: computed, as before
        # Usage crosses 5 before any rule exists.
        before = t0 + timedelta(hours=1)  # usage timed before the reset below (which counts from this minute)
        assert post_events(api, [make_event(subject="tpp-6", data={"n": 6}, time=before)]).status_code == 204
        wait_for(lambda: api.get("/api/v1/subjects/tpp-6/entitlements/calls/value").json()["usage"] == 6)
        channel = api.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "ops",
                                                                   "url": receiver.url}).json()
        receiver.secret = channel["signingSecret"]
        for rule in ({"type": "entitlements.balance.threshold", "name": "q", "thresholds": [
                         {"type": "NUMBER", "value": 5}, {"type": "NUMBER", "value": 8}]},
                     {"type": "entitlements.reset", "name": "r"}):
            assert api.post("/api/v1/notification/rules", json={**rule, "channels": [channel["id"]]}).status_code == 201

        def seen() -> list[Any]:
            return [(p["type"], p["data"].get("threshold", {}).get("value"), p["data"]["value"]["usage"])
                    for p in receiver.received]

        wait_for(lambda: seen() == [("entitlements.balance.threshold", 5, 6)])
        assert post_events(api, [make_event(subject="tpp-6", data={"n": 3}, time=before)]).status_code == 204
        wait_for(lambda: len(seen()) == 2)
        assert seen()[1] == ("entitlements.balance.threshold", 8, 9)
        assert api.post(f"/api/v1/subjects/tpp-6/entitlements/{ent.json()['id']}/reset", json={}).status_code == 204
        wait_for(lambda: len(seen()) == 3)
        assert seen()[2] == ("entitlements.reset", None, 0)
        time.sleep(0.5)
        assert len(seen()) == 3 and receiver.bad == 0
