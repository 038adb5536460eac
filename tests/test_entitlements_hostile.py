"""Hostile input on the customer, feature, entitlement and grant routes: never a 5xx.

The schema fuzzer (tests/test_fuzz_api.py) mostly meets 404s on these routes, as
its ids are random. Here a real customer, feature and entitlement exist, so every
body and parameter reaches the validation behind the lookup. Field values mix
valid ones with every JSON type, extreme numbers and instants, long and unstorable
strings. Each answer must be a success or a 4xx problem+json that says what was
wrong; the handful of fixed cases pin OpenMeter's status for its own checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.support import meter_env
from tests.support.app import AppServer

NOW = datetime.now(UTC).replace(second=0, microsecond=0).isoformat().replace("+00:00", "Z")

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x" * 5000, "\x00", "\ud800", "DAY", "P1M", "PT1S", "P0D", "-P1D", "MONTH",
                     "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2024-02-30T00:00:00Z", NOW,
                     "1e400", "-1", "NaN", "calls", "tpp-h"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def maybe(*valid: Any) -> st.SearchStrategy[Any]:
    """A valid value about half the time, else junk: deep checks are reached too."""
    return st.one_of(st.sampled_from(valid), junk)


period = st.one_of(junk, st.fixed_dictionaries({"interval": maybe("DAY", "MONTH", "P2W", "HOUR")},
                                               optional={"anchor": maybe(NOW)}))
entitlement = st.fixed_dictionaries({"type": st.sampled_from(["metered", "boolean", "static", "other", None])}, optional={
    "featureKey": st.one_of(st.just("calls"), junk), "featureId": junk, "usagePeriod": period,
    "measureUsageFrom": maybe(NOW, "CURRENT_PERIOD_START", "NOW"), "issueAfterReset": maybe(0, 10, 1e9),
    "issueAfterResetPriority": maybe(1, 255), "isSoftLimit": maybe(True, False),
    "preserveOverageAtReset": maybe(True, False), "config": maybe('{"a": 1}'), "metadata": junk, "isUnlimited": junk})
grant = st.fixed_dictionaries({}, optional={
    "amount": maybe(0, 5, 1e12), "priority": maybe(0, 1, 255), "effectiveAt": maybe(NOW),
    "minRolloverAmount": maybe(0, 3), "maxRolloverAmount": maybe(0, 3),
    "expiration": st.one_of(junk, st.fixed_dictionaries({"duration": maybe("HOUR", "DAY", "WEEK", "MONTH", "YEAR"),
                                                         "count": maybe(1, 12, 10**6)})),
    "recurrence": period, "metadata": junk, "annotations": junk})
reset = st.fixed_dictionaries({}, optional={"effectiveAt": maybe(NOW), "retainAnchor": maybe(True, False),
                                           "preserveOverage": maybe(True, False)})
customer = st.fixed_dictionaries({"name": maybe("C")}, optional={
    "key": maybe("tpp-h", "tpp-x"),
    "usageAttribution": st.one_of(junk, st.fixed_dictionaries({"subjectKeys": maybe(["tpp-h"], ["a", "b"], [])})),
    "metadata": junk, "currency": junk, "primaryEmail": junk, "billingAddress": junk})
feature = st.fixed_dictionaries({"key": maybe("f1", "calls"), "name": maybe("F")}, optional={
    "meterSlug": maybe("calls"), "meterGroupByFilters": maybe({"x": "1"}, {}), "metadata": junk})
query = st.dictionaries(st.sampled_from(["time", "from", "to", "windowSize", "windowTimeZone", "page", "pageSize",
                                         "includeDeleted", "limit", "offset", "orderBy", "order"]),
                        st.sampled_from(["", "x", "-1", "0", "99999999999999999999", NOW, "0001-01-01T00:00:00Z",
                                         "MINUTE", "DAY", "Mars/Olympus", "true", "\x00"]), max_size=3)

REQUESTS = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(["/api/v2/customers/tpp-h/entitlements",
                                                "/api/v1/subjects/tpp-h/entitlements"]), entitlement),
    st.tuples(st.just("POST"), st.sampled_from(["/api/v2/customers/tpp-h/entitlements/calls/grants",
                                                "/api/v1/subjects/tpp-h/entitlements/calls/grants"]), grant),
    st.tuples(st.just("PUT"), st.just("/api/v2/customers/tpp-h/entitlements/calls/override"), entitlement),
    st.tuples(st.just("POST"), st.just("/api/v2/customers/tpp-h/entitlements/calls/reset"), reset),
    st.tuples(st.just("POST"), st.just("/api/v1/customers"), customer),
    st.tuples(st.just("PUT"), st.just("/api/v1/customers/tpp-h"), customer),
    st.tuples(st.just("POST"), st.just("/api/v1/features"), feature),
    st.tuples(st.just("GET"), st.sampled_from(["/api/v2/customers/tpp-h/entitlements/calls/value",
                                               "/api/v2/customers/tpp-h/entitlements/calls/history",
                                               "/api/v1/customers/tpp-h/access", "/api/v2/entitlements",
                                               "/api/v2/grants", "/api/v1/customers", "/api/v1/features"]), query),
)


@pytest.fixture(scope="module")
def api(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[httpx.Client]:
    with meter_env.database(pg_server) as url:
        settings = meter_env.settings_for(url, nats_server, valkey_server)
        with AppServer(settings, {"api"}) as server, server.client() as client:
            assert client.post("/api/v1/meters", json={"slug": "calls", "eventType": "api.call", "aggregation": "SUM",
                                                       "valueProperty": "$.n"}).status_code == 201
            assert client.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                         "meterSlug": "calls"}).status_code == 201
            assert client.post("/api/v1/customers", json={"name": "H", "key": "tpp-h"}).status_code == 201
            assert client.post("/api/v2/customers/tpp-h/entitlements", json={
                "type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY"}}).status_code == 201
            yield client


def check(response: httpx.Response, what: object) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), what
        assert response.json()["detail"], what


@hypothesis_settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_hostile_bodies_and_parameters_are_4xx(api: httpx.Client, request: tuple[str, str, Any]) -> None:
    method, path, payload = request
    if method == "GET":
        response = api.get(path, params=payload)
    else:
        # json.dumps escapes lone surrogates (\ud800) as JSON may; the server must cope.
        response = api.request(method, path, content=json.dumps(payload).encode(),
                               headers={"Content-Type": "application/json"})
    check(response, request)


def test_openmeter_statuses_for_its_own_checks(api: httpx.Client) -> None:
    base = "/api/v2/customers/tpp-h/entitlements"
    # One active entitlement per customer and feature: 409 naming the one in the way.
    again = api.post(base, json={"type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "DAY"}})
    assert again.status_code == 409 and again.json()["extensions"]["conflictingEntityId"]
    for body in ({"type": "metered", "featureKey": "nope", "usagePeriod": {"interval": "DAY"}},  # unknown feature
                 {"type": "metered", "featureKey": "calls"},                                    # no usagePeriod
                 {"type": "metered", "featureKey": "calls", "usagePeriod": {"interval": "PT1M"}},  # under an hour
                 {"type": "static", "featureKey": "calls", "usagePeriod": {"interval": "DAY"}, "config": "{"}):
        response = api.put(f"{base}/calls/override", json=body)
        assert response.status_code in (400, 404), (body, response.text)
        check(response, body)
    for body in ({"amount": -1, "effectiveAt": NOW}, {"amount": 1}, {"amount": 1, "effectiveAt": NOW,
                                                                     "expiration": {"duration": "WEEK", "count": 0}}):
        response = api.post(f"{base}/calls/grants", json=body)
        assert response.status_code == 400, (body, response.text)
        check(response, body)
