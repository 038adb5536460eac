"""GET /api/v1/events: OpenMeter's shape, filters, parameter rules and validationError."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from pgmeter.config import Settings
from pgmeter.ingest.validation import MeterRule, parse_error, parse_go_float, validation_error
from pgmeter.meters.ulid import new_ulid
from tests.support.app import AppServer
from tests.support.ingest import isolated_settings, make_event, post_events, rfc3339, wait_until_stored

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(days=3)


def meter_row(slug: str, aggregation: str, event_type: str, value_property: str | None,
              deleted: bool = False) -> tuple[Any, ...]:
    return (new_ulid(), "default", slug, slug, aggregation, event_type, value_property,
            NOW if deleted else None)


METERS = [
    meter_row("tokens", "SUM", "prompt", "$.tokens"),
    meter_row("tokens_max", "MAX", "prompt", "$.tokens"),
    meter_row("calls", "COUNT", "api.call", None),
    meter_row("users", "UNIQUE_COUNT", "login", "$.user"),
    meter_row("old", "SUM", "retired", "$.x", deleted=True),
]

# (id, type, data, seconds after T0, expected validationError)
EVENTS: list[tuple[str, str, Any, float, str | None]] = [
    ("ok-number", "prompt", {"tokens": 5}, 1, None),
    ("ok-string", "prompt", {"tokens": "1e3"}, 2, None),
    ("missing", "prompt", {"other": 1}, 3,
     'invalid event: missing value property: "$.tokens"\ninvalid event: missing value property: "$.tokens"'),
    ("null-value", "prompt", {"tokens": None}, 4,
     "invalid event: value cannot be null\ninvalid event: value cannot be null"),
    ("not-a-number", "prompt", {"tokens": "abc"}, 5,
     "invalid event: value cannot be parsed as float64: abc\ninvalid event: value cannot be parsed as float64: abc"),
    ("boolean", "prompt", {"tokens": True}, 6,
     "invalid event: unsupported value property type: bool\ninvalid event: unsupported value property type: bool"),
    ("nan", "prompt", {"tokens": "NaN"}, 7,
     "invalid event: value cannot be NaN\ninvalid event: value cannot be NaN"),
    ("inf", "prompt", {"tokens": "-Inf"}, 8,
     "invalid event: value cannot be infinity\ninvalid event: value cannot be infinity"),
    ("no-data", "prompt", None, 9,
     "invalid event: null and missing value property\ninvalid event: null and missing value property"),
    ("count-any", "api.call", None, 10, None),
    ("unique-number", "login", {"user": 7}, 11, None),
    ("unique-null", "login", {"user": None}, 12, "invalid event: value cannot be null"),
    ("no-meter", "unmetered", {"a": 1}, 13, "no meter found for event type: unmetered"),
    ("deleted-meter", "retired", {"x": 1}, 14, "no meter found for event type: retired"),
]


@pytest.fixture(scope="module")
def module_settings(pg_server: Any, nats_server: Any) -> Iterator[Settings]:
    with isolated_settings(pg_server, nats_server.url) as settings:
        yield settings


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[httpx.Client]:
    with psycopg.connect(module_settings.postgres.url) as conn:
        conn.cursor().executemany(
            "INSERT INTO meters (id, namespace, slug, name, aggregation, event_type, value_property, deleted_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", METERS)
    with AppServer(module_settings, {"api", "sink"}) as server, server.client() as http:
        events = [make_event(event_id, source="list", type=event_type, subject=f"subject-{n % 2}",
                             time=T0 + timedelta(seconds=offset), data=data)
                  for n, (event_id, event_type, data, offset, _) in enumerate(EVENTS)]
        assert post_events(http, events).status_code == 204
        wait_until_stored(module_settings.postgres.url, len(EVENTS))
        yield http


def listed(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/api/v1/events", params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_items_have_openmeters_shape_newest_first(client: httpx.Client) -> None:
    items = listed(client)
    assert [item["event"]["id"] for item in items] == [e[0] for e in reversed(EVENTS)]
    first = next(item for item in items if item["event"]["id"] == "ok-number")
    assert first["event"] == {
        "specversion": "1.0", "id": "ok-number", "source": "list", "type": "prompt", "subject": "subject-0",
        "time": rfc3339(T0 + timedelta(seconds=1)), "datacontenttype": "application/json", "data": {"tokens": 5}}
    assert set(first) == {"event", "ingestedAt", "storedAt"}
    ingested = datetime.fromisoformat(first["ingestedAt"].replace("Z", "+00:00"))
    stored = datetime.fromisoformat(first["storedAt"].replace("Z", "+00:00"))
    assert ingested <= stored <= datetime.now(UTC) + timedelta(seconds=5)
    no_data = next(item for item in items if item["event"]["id"] == "no-data")
    assert "data" not in no_data["event"] and "datacontenttype" not in no_data["event"]


def test_validation_errors_follow_openmeters_messages(client: httpx.Client) -> None:
    errors = {item["event"]["id"]: item.get("validationError") for item in listed(client)}
    assert errors == {event_id: expected for event_id, _, _, _, expected in EVENTS}


def test_filters(client: httpx.Client) -> None:
    assert [i["event"]["id"] for i in listed(client, id="unique")] == ["unique-null", "unique-number"]
    # OpenMeter's id filter is id LIKE '%<id>%' with the value unescaped: % and _ are
    # wildcards, a backslash escapes.
    assert [i["event"]["id"] for i in listed(client, id="unique_n")] == ["unique-null", "unique-number"]
    assert [i["event"]["id"] for i in listed(client, id="u%e-nu%r")] == ["unique-number"]
    assert listed(client, id="unique\\_n") == []
    assert listed(client, id="\\") == [] and listed(client, id="x\\") == []
    assert {i["event"]["subject"] for i in listed(client, subject="subject-1")} == {"subject-1"}
    assert listed(client, subject="subject") == []  # exact, not partial
    assert len(listed(client, limit=3)) == 3
    # from is inclusive, to exclusive; both compared at whole seconds.
    window = listed(client, **{"from": rfc3339(T0 + timedelta(seconds=3, microseconds=700_000)),
                               "to": rfc3339(T0 + timedelta(seconds=6, microseconds=900_000))})
    assert [i["event"]["id"] for i in window] == ["not-a-number", "null-value", "missing"]
    ingested = listed(client, ingestedAtFrom=rfc3339(NOW - timedelta(days=1)))
    assert len(ingested) == len(EVENTS)
    assert listed(client, ingestedAtTo=rfc3339(NOW - timedelta(days=1))) == []
    assert listed(client, clientId="abc") and listed(client, **{"from": rfc3339(NOW + timedelta(days=1))}) == []


@pytest.mark.parametrize("params,fragment", [
    ({"from": rfc3339(NOW - timedelta(days=33))}, "from date is too old"),
    ({"ingestedAtFrom": rfc3339(NOW - timedelta(days=40))}, "ingestedAtFrom date is too old"),
    ({"from": rfc3339(NOW - timedelta(days=1)), "to": rfc3339(NOW - timedelta(days=2))}, "to date is before"),
    ({"ingestedAtFrom": rfc3339(NOW - timedelta(days=1)), "ingestedAtTo": rfc3339(NOW - timedelta(days=2))},
     "ingestedAtTo date is before"),
    ({"limit": "0"}, "limit must be greater than 0"),
    ({"limit": "101"}, "limit must be less than or equal to 100"),
    ({"limit": "ten"}, "not an integer"),
    ({"from": "yesterday"}, "from:"),
    ({"to": "2024-01-01"}, "to:"),
    ({"clientId": "x" * 37}, "clientId"),
    ({"customerId": "01J00000000000000000000000"}, "customers not found"),
])
def test_bad_parameters_are_400(client: httpx.Client, params: dict[str, str], fragment: str) -> None:
    response = client.get("/api/v1/events", params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment in response.json()["detail"]


# -- the rules themselves, without a server ---------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("1", 1.0), ("-2.5", -2.5), (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0), ("+1E-2", 0.01), ("0x1p-2", 0.25),
    ("Inf", float("inf")), ("-infinity", float("-inf")),
])
def test_go_float_parsing_accepts(text: str, value: float) -> None:
    assert parse_go_float(text) == value


@pytest.mark.parametrize("text", ["", " 1", "1 ", "1_000", "abc", "1e400", "0x10", "1,5", "--1"])
def test_go_float_parsing_rejects(text: str) -> None:
    assert parse_go_float(text) is None


def test_parse_error_edge_cases() -> None:
    summing = MeterRule.of("m", "SUM", "t", "$.a.b[1]")
    assert parse_error(summing, {"a": {"b": [0, "2.5"]}}) is None
    assert parse_error(summing, {"a": {"b": [0]}}) == 'invalid event: missing value property: "$.a.b[1]"'
    assert parse_error(summing, {"a": {"b": [0, {"x": 1}]}}) == \
        "invalid event: unsupported value property type: map[string]interface {}"
    assert parse_error(summing, {"a": {"b": [0, [1]]}}) == "invalid event: unsupported value property type: []interface {}"
    assert parse_error(MeterRule.of("c", "COUNT", "t", None), None) is None
    assert parse_error(MeterRule.of("u", "UNIQUE_COUNT", "t", "$.u"), {"u": {"nested": True}}) is None
    meters = [summing, MeterRule.of("c", "COUNT", "t", None)]
    assert validation_error("t", {"a": {"b": [0, 1]}}, meters) is None
    assert validation_error("other", {}, meters) == "no meter found for event type: other"


def test_listing_reads_only_its_namespace(client: httpx.Client, module_settings: Settings) -> None:
    with psycopg.connect(module_settings.postgres.url) as conn:
        conn.execute("INSERT INTO events (namespace, id, source, type, subject, time, data, ingested_at, batch_seq) "
                     "VALUES ('elsewhere', 'foreign', 'x', 'prompt', 's', %s, NULL, now(), 0)",
                     (T0 + timedelta(seconds=30),))
    assert "foreign" not in {item["event"]["id"] for item in listed(client)}
