"""Hypothesis over CloudEvents and query parameters against the live server.

Malformed input must get a 4xx problem+json, never a 5xx; a request with one bad
event stores none of its events (all-or-nothing, as OpenMeter); and the good
requests around the bad ones lose nothing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events, wait_until_stored

FUZZ = hypothesis_settings(max_examples=30, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))
METER = {"slug": "calls", "eventType": "api.call", "aggregation": "SUM", "valueProperty": "$.ms",
         "groupBy": {"endpoint": "$.endpoint"}}
_ids = itertools.count()

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), text)
# Each way an event can be wrong, as (field, bad value); None removes the field.
BREAKAGES = st.sampled_from([
    ("id", None), ("id", ""), ("id", 7), ("source", None), ("source", ""), ("type", None), ("type", ["x"]),
    ("subject", None), ("subject", ""), ("subject", {}), ("specversion", None), ("specversion", "2.0"),
    ("data", "a string"), ("data", [1, 2]), ("data", 3), ("time", "yesterday"), ("time", 12),
    ("time", "2026-13-01T00:00:00Z"), ("datacontenttype", "application/xml"),
])


def good_event(data: dict[str, Any]) -> dict[str, Any]:
    return make_event(id=f"fz-{next(_ids)}", type="api.call", subject="tpp-fuzz", time="2026-06-01T12:00:00Z",
                      data=data)


event_data = st.fixed_dictionaries({"endpoint": text, "ms": json_scalar})


@st.composite
def bad_event(draw: st.DrawFn) -> dict[str, Any]:
    event = good_event(draw(event_data))
    field, value = draw(BREAKAGES)
    if value is None:
        event.pop(field, None)
    else:
        event[field] = value
    return event


@pytest.fixture
def app(settings: Settings) -> Iterator[AppServer]:
    with AppServer(settings, {"api", "sink"}) as server:
        with server.client() as client:
            assert client.post("/api/v1/meters", json=METER).status_code == 201
        yield server


def assert_problem(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == response.status_code and body.get("detail")


def stored_ids(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM events WHERE id LIKE 'fz-%'")}


def test_bad_events_are_refused_whole_and_good_neighbours_kept(app: AppServer, settings: Settings) -> None:
    expected: set[str] = set()

    @given(requests=st.lists(st.tuples(st.lists(event_data, min_size=1, max_size=5),
                                       st.lists(bad_event(), max_size=2),
                                       st.sampled_from(["application/cloudevents-batch+json", "application/json"])),
                             min_size=1, max_size=6))
    @FUZZ
    def run(requests: list[tuple[list[dict[str, Any]], list[dict[str, Any]], str]]) -> None:
        with app.client() as client:
            for datas, bad, content_type in requests:
                batch = [good_event(data) for data in datas] + bad
                response = post_events(client, batch, content_type=content_type)
                if bad:
                    assert_problem(response)
                    errors = response.json().get("extensions", {}).get("validationErrors")
                    assert errors, response.text
                    assert all(e["index"] >= len(datas) for e in errors), "a good event was blamed"
                else:
                    assert response.status_code == 204, response.text
                    expected.update(event["id"] for event in batch)

    run()
    wait_until_stored(settings.postgres.url, len(expected))
    assert stored_ids(settings.postgres.url) == expected


@given(body=st.one_of(st.binary(max_size=200), st.builds(json.dumps, st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8))),
    content_type=st.sampled_from(["application/cloudevents+json", "application/cloudevents-batch+json",
                                  "application/json", "text/plain", "application/json; charset=utf-8", ""]))
@FUZZ
def test_garbage_bodies_get_problems_never_5xx(app: AppServer, body: bytes | str, content_type: str) -> None:
    with app.client() as client:
        response = client.post("/api/v1/events", content=body, headers={"content-type": content_type})
    assert response.status_code < 500, response.text
    if response.status_code != 204:
        assert_problem(response)


QUERY_KEYS = st.sampled_from(["from", "to", "windowSize", "windowTimeZone", "subject", "groupBy",
                              "filterGroupBy", "filterGroupBy[endpoint]", "filterGroupBy[nope]", "clientId"])
QUERY_VALUES = st.one_of(text, st.sampled_from(["MINUTE", "HOUR", "DAY", "MONTH", "WEEK", "UTC", "Asia/Kathmandu",
                                                "Mars/Olympus", "2026-06-01T00:00:00Z", "2026-06-01T00:00:00+05:45",
                                                "2026-06-02", "endpoint", "subject", "customer_id", ""]))


@given(params=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=6),
       accept=st.sampled_from(["application/json", "text/csv", "*/*"]))
@FUZZ
def test_query_parameters_get_answers_or_problems_never_5xx(app: AppServer, params: list[tuple[str, str]],
                                                             accept: str) -> None:
    with app.client() as client:
        response = client.get("/api/v1/meters/calls/query", params=params, headers={"accept": accept})
        posted = client.post("/api/v1/meters/calls/query", json=dict(params), headers={"accept": accept})
    for answer in (response, posted):
        assert answer.status_code < 500, answer.text
        if answer.status_code != 200:
            assert_problem(answer)
