"""The query endpoints' contract: shapes, edge cases, errors and CSV.

Numbers in bulk are the oracle suite's job (tests/test_oracle.py); these pin the
exact response format and every 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from pgmeter.config import Settings
from tests.support import events_sql, meter_env
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.support.ingest import isolated_settings
from tests.support.metrics import delta, scrape

DAY = datetime(2024, 1, 10, tzinfo=UTC)


@contextmanager
def query_api(settings: Settings) -> Iterator[httpx.Client]:
    """An api with four meters over three events (all merged)."""
    with AppServer(settings, {"api"}) as server, server.client() as client:
        for body in (
            {"slug": "calls", "aggregation": "COUNT", "eventType": "call", "groupBy": {"model": "$.model"}},
            {"slug": "tokens", "aggregation": "SUM", "eventType": "call", "valueProperty": "$.tokens",
             "groupBy": {"model": "$.model"}},
            {"slug": "users", "aggregation": "UNIQUE_COUNT", "eventType": "call", "valueProperty": "$.user"},
            {"slug": "late_start", "aggregation": "COUNT", "eventType": "call",
             "eventFrom": "2024-01-10T12:00:00Z"},
        ):
            assert client.post("/api/v1/meters", json=body).status_code == 201
        events_sql.insert_committed(settings.postgres.url, [
            Event("a", DAY + timedelta(hours=1, seconds=5), {"tokens": 10, "model": "x", "user": "u1"}, type="call"),
            Event("a", DAY + timedelta(hours=13), {"tokens": "2.5", "model": "y", "user": "u2"}, type="call"),
            Event("b", DAY + timedelta(days=1, hours=2), {"tokens": 1, "model": "x", "user": "u1"}, type="call"),
        ])
        meter_env.refresh(settings.postgres.url)
        yield client


@pytest.fixture(scope="module")
def api(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[httpx.Client]:
    """One server for the tests that only read: a server and database per test cost
    thirty times what their queries do."""
    with isolated_settings(pg_server, nats_server.url, valkey_server.url) as settings, query_api(settings) as client:
        yield client


@pytest.fixture
def fresh_api(settings: Settings) -> Iterator[httpx.Client]:
    """The same, of its own, for a test that writes."""
    with query_api(settings) as client:
        yield client


def query(api: httpx.Client, slug: str, **params: Any) -> httpx.Response:
    return api.get(f"/api/v1/meters/{slug}/query", params=params)


def test_totals_echo_only_what_was_sent(api: httpx.Client) -> None:
    body = query(api, "tokens").json()
    assert body == {"data": [{"value": 13.5, "windowStart": "2024-01-10T01:00:00Z",
                              "windowEnd": "2024-01-11T02:01:00Z", "subject": None, "groupBy": {}}]}
    sent = query(api, "tokens", **{"from": "2024-01-10T00:00:00.000+01:00", "to": "2024-01-12T00:00:00Z",
                                   "windowSize": "DAY"}).json()
    assert sent["from"] == "2024-01-10T00:00:00+01:00" and sent["to"] == "2024-01-12T00:00:00Z"
    assert sent["windowSize"] == "DAY"
    assert [(r["value"], r["windowStart"], r["windowEnd"]) for r in sent["data"]] == [
        (12.5, "2024-01-10T00:00:00Z", "2024-01-11T00:00:00Z"), (1, "2024-01-11T00:00:00Z", "2024-01-12T00:00:00Z")]
    total = query(api, "tokens", **{"from": "2024-01-10T00:00:00Z", "to": "2024-01-11T00:00:00Z"}).json()["data"]
    assert total == [{"value": 12.5, "windowStart": "2024-01-10T00:00:00Z", "windowEnd": "2024-01-11T00:00:00Z",
                      "subject": None, "groupBy": {}}]


def test_subject_and_group_by_are_always_present(api: httpx.Client) -> None:
    rows = query(api, "tokens", groupBy=["subject", "model"]).json()["data"]
    assert [(r["subject"], r["groupBy"], r["value"]) for r in rows] == [
        ("a", {"model": "x"}, 10), ("a", {"model": "y"}, 2.5), ("b", {"model": "x"}, 1)]
    filtered = query(api, "tokens", subject=["b", "nobody"]).json()["data"]
    assert [(r["subject"], r["groupBy"]) for r in filtered] == [("b", {})]  # a subject filter groups by subject
    by_model = api.get("/api/v1/meters/tokens/query", params=[("filterGroupBy[model]", "x")]).json()["data"]
    assert [r["value"] for r in by_model] == [11]


def test_empty_results_follow_openmeter(api: httpx.Client) -> None:
    bounds = {"from": "2023-01-01T00:00:00Z", "to": "2023-01-02T00:00:00Z"}
    zero = {"value": 0, "windowStart": "2023-01-01T00:00:00Z", "windowEnd": "2023-01-02T00:00:00Z",
            "subject": None, "groupBy": {}}
    assert query(api, "calls", **bounds).json()["data"] == [zero]
    assert query(api, "users", **bounds).json()["data"] == [zero]
    assert query(api, "tokens", **bounds).json()["data"] == []
    assert query(api, "calls", groupBy="subject", **bounds).json()["data"] == []
    assert query(api, "calls", windowSize="HOUR", **bounds).json()["data"] == []
    # Without bounds the zero row spans the epoch's first minute, as OpenMeter's SQL does.
    assert query(api, "late_start", to="2024-01-10T12:00:00Z").json()["data"] == [
        {**zero, "windowStart": "2024-01-10T12:00:00Z", "windowEnd": "2024-01-10T12:00:00Z"}]


def test_event_from_clamps_from(api: httpx.Client) -> None:
    rows = query(api, "late_start", **{"from": "2024-01-01T00:00:00Z"}).json()["data"]
    assert rows == [{"value": 2, "windowStart": "2024-01-10T12:00:00Z", "windowEnd": "2024-01-11T02:01:00Z",
                     "subject": None, "groupBy": {}}]


def test_windows_carry_the_zone_offset_and_dst_days_are_23_hours(api: httpx.Client) -> None:
    rows = query(api, "calls", windowSize="DAY", windowTimeZone="America/Los_Angeles").json()["data"]
    assert [(r["windowStart"], r["windowEnd"]) for r in rows] == [
        ("2024-01-09T00:00:00-08:00", "2024-01-10T00:00:00-08:00"),
        ("2024-01-10T00:00:00-08:00", "2024-01-11T00:00:00-08:00")]


@pytest.mark.parametrize("params, parameter, text", [
    ({"from": "2024-01-10T00:00:00Z", "to": "2024-01-10T00:00:00Z"}, "from", "must differ"),
    ({"from": "2024-01-11T00:00:00Z", "to": "2024-01-10T00:00:00Z"}, "from", "before"),
    ({"from": "yesterday"}, "from", "RFC 3339"),
    ({"to": "2024-01-10T00:00:00"}, "to", "RFC 3339"),
    ({"windowSize": "WEEK"}, "windowSize", "WEEK"),
    ({"windowTimeZone": "Mars/Olympus"}, "windowTimeZone", "invalid time zone"),
    ({"windowTimeZone": "../../etc/passwd"}, "windowTimeZone", "invalid time zone"),
    ({"groupBy": "region"}, "groupBy", "invalid group by: region"),
    ({"groupBy": "customer_id"}, "groupBy", "customer_id"),
    ({"filterGroupBy": "model=x"}, "filterGroupBy", "deepObject"),
    ({"filterGroupBy": "{'model': 1}"}, "filterGroupBy", "object of strings"),
    ({"filterGroupBy[region]": "eu"}, "filterGroupBy[region]", "region"),
    ({"advancedMeterGroupByFilters": '{"region": {"$eq": "x"}}'}, "advancedMeterGroupByFilters",
     "meter does not have group by: region"),
    ({"advancedMeterGroupByFilters": '{"model": {"$eq": "x", "$ne": "y"}}'}, "advancedMeterGroupByFilters",
     "filter is invalid: multiple operators are set"),
    ({"advancedMeterGroupByFilters": '{"model": {"$in": ["x", ""]}}'}, "advancedMeterGroupByFilters",
     "filter is invalid: format mismatch"),
    ({"advancedMeterGroupByFilters": '{"model": {"$regex": "x"}}'}, "advancedMeterGroupByFilters",
     "unknown operator '$regex'"),
    ({"advancedMeterGroupByFilters": '{"model": {"$like": "x\\\\"}}'},
     "advancedMeterGroupByFilters", "escape character"),
    ({"advancedMeterGroupByFilters": '{"model": '}, "advancedMeterGroupByFilters", "JSON object"),
    ({"advancedMeterGroupByFilters": '{"model": {"$eq": "x"}}', "filterGroupBy[model]": "x"},
     "advancedMeterGroupByFilters", "cannot be used together"),
    ({"clientId": "x" * 37}, "clientId", "clientId"),
])
def test_bad_parameters_are_400_naming_the_parameter(api: httpx.Client, params: dict[str, str],
                                                     parameter: str, text: str) -> None:
    response = query(api, "calls", **params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["extensions"]["parameter"] == parameter
    assert text in response.json()["detail"]


def test_repeated_scalars_and_unknown_customers(api: httpx.Client) -> None:
    twice = api.get("/api/v1/meters/calls/query", params=[("from", "2024-01-01T00:00:00Z")] * 2)
    assert twice.status_code == 400
    assert query(api, "calls", filterCustomerId="01ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 404


def test_post_takes_lists_and_no_body(api: httpx.Client) -> None:
    post = api.post("/api/v1/meters/tokens/query", json={"filterGroupBy": {"model": ["x", "y"]}, "groupBy": ["model"]})
    assert [(r["groupBy"], r["value"]) for r in post.json()["data"]] == [({"model": "x"}, 11), ({"model": "y"}, 2.5)]
    assert api.post("/api/v1/meters/tokens/query", json={}).json()["data"][0]["value"] == 13.5
    # No body is {} (the Python SDK's query_csv_post sends none; OpenMeter answers 400).
    assert api.post("/api/v1/meters/tokens/query").json()["data"][0]["value"] == 13.5
    # An empty filter list is dropped, after its key is checked (OpenMeter).
    empty = api.post("/api/v1/meters/tokens/query", json={"filterGroupBy": {"model": []}})
    assert empty.status_code == 200 and empty.json()["data"][0]["value"] == 13.5
    assert api.post("/api/v1/meters/tokens/query", json={"filterGroupBy": {"region": []}}).status_code == 400
    assert api.post("/api/v1/meters/tokens/query", json={"subject": "a"}).status_code == 400
    assert api.post("/api/v1/meters/tokens/query", json={"from": "2024-01-11T00:00:00Z",
                                                         "to": "2024-01-10T00:00:00Z"}).status_code == 400
    assert api.post("/api/v1/meters/tokens/query", content=b"[1]").status_code == 400


def test_csv(api: httpx.Client) -> None:
    response = api.get("/api/v1/meters/tokens/query", headers={"Accept": "text/csv"},
                       params=[("windowSize", "DAY"), ("groupBy", "model"), ("groupBy", "subject")])
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == "attachment; filename=tokens.csv"
    assert response.text == (
        "window_start,window_end,subject,model,value\n"
        "2024-01-10T00:00:00Z,2024-01-11T00:00:00Z,a,x,10.000000\n"
        "2024-01-10T00:00:00Z,2024-01-11T00:00:00Z,a,y,2.500000\n"
        "2024-01-11T00:00:00Z,2024-01-12T00:00:00Z,b,x,1.000000\n")
    post = api.post("/api/v1/meters/calls/query", headers={"Accept": "text/csv"}, json={})
    assert post.text == "window_start,window_end,value\n2024-01-10T01:00:00Z,2024-01-11T02:01:00Z,3.000000\n"
    listed = api.post("/api/v1/meters/calls/query", headers={"Accept": "text/csv, application/json"}, json={})
    assert listed.headers["content-type"] == "application/json"


def test_read_your_writes_and_latency_metric(fresh_api: httpx.Client, settings: Settings) -> None:
    api = fresh_api
    events_sql.insert_committed(settings.postgres.url, [Event("c", DAY, {"tokens": 100}, type="call")])
    before = scrape(api)
    assert query(api, "tokens", subject="c").json()["data"][0]["value"] == 100  # not merged yet
    after = scrape(api)
    # One query, counted once, under no meter name (metrics name no tenant by default).
    assert delta(before, after, "openmeter_query_latency_seconds_count", meter="") == 1
    assert delta(before, after, "openmeter_query_latency_seconds_count") == 1


def test_empty_and_local_window_time_zones_are_utc(api: httpx.Client) -> None:
    # Go's time.LoadLocation: "" is UTC and "Local" the server's zone (UTC here, no TZ set).
    utc = query(api, "tokens", windowSize="DAY", windowTimeZone="UTC").json()["data"]
    assert [r["windowStart"] for r in utc] == ["2024-01-10T00:00:00Z", "2024-01-11T00:00:00Z"]
    for zone in ("", "Local"):
        assert query(api, "tokens", windowSize="DAY", windowTimeZone=zone).json()["data"] == utc
        post = api.post("/api/v1/meters/tokens/query", json={"windowSize": "DAY", "windowTimeZone": zone})
        assert post.json()["data"] == utc


def test_advanced_filters_on_get_and_post(api: httpx.Client) -> None:
    def values(response: httpx.Response) -> list[tuple[str, float]]:
        assert response.status_code == 200, response.text
        return [(r["groupBy"]["model"], r["value"]) for r in response.json()["data"]]

    for filters, expected in (
        ({}, [("x", 11), ("y", 2.5)]),
        ({"model": {}}, [("x", 11), ("y", 2.5)]),
        ({"model": {"$eq": "x"}}, [("x", 11)]),
        ({"model": {"$ne": "x"}}, [("y", 2.5)]),
        ({"model": {"$in": ["y", "z"]}}, [("y", 2.5)]),
        ({"model": {"$in": []}}, []),
        ({"model": {"$nin": []}}, [("x", 11), ("y", 2.5)]),
        ({"model": {"$like": "_"}}, [("x", 11), ("y", 2.5)]),
        ({"model": {"$ilike": "X"}}, [("x", 11)]),
        ({"model": {"$nlike": "x%"}}, [("y", 2.5)]),
        ({"model": {"$gt": "x"}}, [("y", 2.5)]),
        ({"model": {"$or": [{"$eq": "x"}, {"$eq": "y"}]}}, [("x", 11), ("y", 2.5)]),
        ({"model": {"$and": [{"$gte": "x"}, {"$lt": "y"}]}}, [("x", 11)]),
        ({"model": {"$or": [{}, {"$eq": "y"}]}}, [("y", 2.5)]),  # an empty member is dropped
        ({"model": {"$eq": None, "$ne": "y"}}, [("x", 11)]),  # null is absent
        ({"model": {"$exists": True}}, [("x", 11), ("y", 2.5)]),
        ({"model": {"$contains": "X"}}, [("x", 11)]),
    ):
        get = api.get("/api/v1/meters/tokens/query", params={"groupBy": "model",
                                                             "advancedMeterGroupByFilters": json.dumps(filters)})
        assert values(get) == expected, filters
        post = api.post("/api/v1/meters/tokens/query", json={"groupBy": ["model"],
                                                             "advancedMeterGroupByFilters": filters})
        assert values(post) == expected, filters
    # Without grouping by the key, the filter still applies (the subject-only levels are skipped).
    total = query(api, "tokens", advancedMeterGroupByFilters='{"model": {"$eq": "y"}}').json()["data"]
    assert [r["value"] for r in total] == [2.5]
    post = api.post("/api/v1/meters/tokens/query", json={"advancedMeterGroupByFilters": {"region": {}}})
    assert post.status_code == 400 and "meter does not have group by: region" in post.json()["detail"]
