"""Limits at the door (docs/limits.md): each is refused with a 4xx problem naming the field.

Every case here was a 500, a stall or an unbounded answer before (issue 10, items
4, 5, 6 and 8): a test per limit, then a sweep of hostile values over every meter,
query, subjects and events operation that asserts nothing answers 5xx.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
import valkey as valkey_sync

from pgmeter.config import ConfigError, LimitsConfig, Settings
from pgmeter.meters.service import config_meters
from tests.support import events_sql, meter_env
from tests.support.app import AppServer
from tests.support.events_sql import Event
from tests.support.ingest import isolated_settings, make_event, post_events

LIMITS = {"queryMaxRows": 5, "cacheMaxEntryBytes": 1024, "metersPerNamespace": 4, "meterGroupByKeys": 4,
          "jsonPathBytes": 64, "jsonPathDepth": 4}
DAY = datetime(2024, 1, 10, tzinfo=UTC)


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.model_copy(update={"limits": LimitsConfig(**LIMITS)})


@pytest.fixture
def api(limited: Settings) -> Iterator[httpx.Client]:
    with AppServer(limited, {"api"}) as server, server.client() as client:
        yield client


@pytest.fixture(scope="module")
def refusing(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[httpx.Client]:
    """One server for the many requests that must be refused and change nothing (each
    test checks that they did not); a server per request cost ten times the request."""
    with isolated_settings(pg_server, nats_server.url, valkey_server.url, limits=LIMITS) as settings, \
            AppServer(settings, {"api"}) as server, server.client() as client:
        yield client


def problem(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body  # type: ignore[no-any-return]


def raw_post(api: httpx.Client, path: str, text: str, method: str = "POST") -> httpx.Response:
    """JSON text sent as written (so ``\\ud800`` escapes reach the server as lone surrogates)."""
    return api.request(method, path, content=text.encode(), headers={"content-type": "application/json"})


def micros_ago(delta: timedelta) -> str:
    return (datetime.now(UTC) - delta).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- events ------------------------------------------------------------------------

@pytest.mark.parametrize("field, limit", [("id", 256), ("source", 512), ("type", 256), ("subject", 256)])
def test_event_text_fields_have_byte_limits(api: httpx.Client, field: str, limit: int) -> None:
    # 4-byte characters: the limit is in UTF-8 bytes, not characters.
    at_limit = "\U0001F600" * (limit // 4)
    assert post_events(api, make_event(**{field: at_limit})).status_code == 204
    over = at_limit + "x"
    errors = problem(post_events(api, [make_event(), make_event(**{field: over})]))["extensions"]["validationErrors"]
    assert errors == [{"index": 1, "field": field, "message": f"must be at most {limit} bytes (UTF-8)"}]
    # A 100 KB value is refused the same way (it used to poison the sink's index).
    errors = problem(post_events(api, make_event(**{field: "a" * 100_000})))["extensions"]["validationErrors"]
    assert [(e["field"], e["message"]) for e in errors] == [(field, f"must be at most {limit} bytes (UTF-8)")]


def test_event_time_window_counts_from_the_request(api: httpx.Client) -> None:
    assert post_events(api, [make_event(time=micros_ago(timedelta(days=399))),
                             make_event(time=micros_ago(timedelta(hours=-23)))]).status_code == 204
    batch = [make_event(time=micros_ago(timedelta(days=401))), make_event(time=micros_ago(timedelta(hours=-25))),
             make_event(time="1970-01-01T00:00:00Z"), make_event(time="9999-12-31T23:59:59-01:00"),
             make_event(time="0001-01-01T00:00:00+01:00")]
    errors = problem(post_events(api, batch))["extensions"]["validationErrors"]
    assert [(e["index"], e["field"]) for e in errors] == [(0, "time"), (1, "time"), (2, "time"), (3, "time"),
                                                          (4, "time")]
    assert "more than 400 days before" in errors[0]["message"]
    assert "more than 24 hours after" in errors[1]["message"]


def test_event_window_follows_sink_retention(settings: Settings) -> None:
    short = settings.model_copy(update={"sink": settings.sink.model_copy(update={"retention_days": 30})})
    with AppServer(short, {"api"}) as server, server.client() as client:
        assert post_events(client, make_event(time=micros_ago(timedelta(days=29)))).status_code == 204
        errors = problem(post_events(client, make_event(time=micros_ago(timedelta(days=31)))))
        assert "more than 30 days before" in errors["extensions"]["validationErrors"][0]["message"]


# -- meter definitions ---------------------------------------------------------------

def create(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/api/v1/meters", json={"aggregation": "COUNT", "eventType": "e", **body})


def test_a_megabyte_value_property_is_refused_at_once(api: httpx.Client) -> None:
    started = time.monotonic()
    response = create(api, slug="big", aggregation="SUM", valueProperty="$" + ".a" * 500_000)
    elapsed = time.monotonic() - started
    assert "valueProperty" in problem(response)["detail"]
    assert elapsed < 2, f"took {elapsed:.2f} s"
    deep = create(api, slug="big", aggregation="SUM", valueProperty="$" + "[0]" * 2000)
    assert "valueProperty" in problem(deep)["detail"]
    assert "groupBy" in problem(create(api, slug="big", groupBy={"k": "$" + ".a" * 500_000}))["detail"]


def test_configured_json_path_limits(api: httpx.Client) -> None:
    # jsonPathBytes 64 and jsonPathDepth 4 in LIMITS; the hard caps are 4096 and 64.
    assert create(api, slug="ok", aggregation="SUM", valueProperty="$.a.b.c.d").status_code == 201
    body = problem(create(api, slug="deep", aggregation="SUM", valueProperty="$.a.b.c.d.e"))
    assert body["extensions"]["validationErrors"][0]["field"] == "valueProperty"
    assert "limits.jsonPathDepth" in body["detail"]
    body = problem(create(api, slug="long", aggregation="SUM", valueProperty="$." + "a" * 70))
    assert "at most 64 bytes" in body["detail"]


@pytest.mark.parametrize("body, words", [
    ({"slug": "calls\n"}, "slug"),
    ({"slug": "calls", "groupBy": {"k\n": "$.k"}}, "groupBy"),
    ({"slug": "calls", "groupBy": {"k" * 64: "$.k"}}, "at most 63"),
    ({"slug": "calls", "groupBy": {f"k{i}": f"$.k{i}" for i in range(5)}}, "limits.meterGroupByKeys"),
    ({"slug": "calls", "groupBy": {f"k{i}": f"$.k{i}" for i in range(31)}}, "at most 30 keys"),
    ({"slug": "calls", "groupBy": {f"k{i}": f"$.k{i}" for i in range(1000)}}, "at most 30 keys"),
    ({"slug": "calls", "groupBy": {"value": "$.a", "group_value": "$.b"}}, "view column 'group_value'"),
    ({"slug": "calls", "name": "a\x00b"}, "NUL"),
    ({"slug": "calls", "description": "a\x00b"}, "NUL"),
    ({"slug": "calls", "eventType": "e\x07"}, "control characters"),
    ({"slug": "calls", "name": "n\r\n"}, "control characters"),
    ({"slug": "calls", "groupBy": {"k": "$.k\x00"}}, "NUL"),
    ({"slug": "calls", "metadata": {"team": "a\x00"}}, "NUL"),
    ({"slug": "calls", "metadata": {"t\x1b": "a"}}, "control characters"),
    ({"slug": "calls", "metadata": {f"k{i}": "v" for i in range(65)}}, "at most 64 entries"),
    ({"slug": "calls", "metadata": {"k": "v" * 1025}}, "at most 1024"),
    ({"slug": "calls", "description": "d" * 1025}, "description"),
    ({"slug": "calls", "name": "n" * 257}, "name"),
    ({"slug": "calls", "eventFrom": "0001-01-01T00:00:00Z"}, "eventFrom"),
    ({"slug": "calls", "eventFrom": "1969-12-31T23:59:59Z"}, "eventFrom"),
    ({"slug": "calls", "eventFrom": "9999-06-01T00:00:00Z"}, "eventFrom"),
])
def test_meter_fields_are_checked(refusing: httpx.Client, body: dict[str, Any], words: str) -> None:
    assert words in problem(create(refusing, **body))["detail"]
    assert refusing.get("/api/v1/meters").json() == []


@pytest.mark.parametrize("text", [
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e\\ud800"}',
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e", "description": "\\udc00"}',
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e", "groupBy": {"\\ud800": "$.k"}}',
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e", "groupBy": {"k": "$.\\ud800"}}',
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e", "metadata": {"\\ud800": "v"}}',
    '{"slug": "calls", "aggregation": "COUNT", "eventType": "e", "metadata": {"k": "\\udfff"}}',
])
def test_unpaired_surrogates_in_meters_are_400(refusing: httpx.Client, text: str) -> None:
    problem(raw_post(refusing, "/api/v1/meters", text))
    assert refusing.get("/api/v1/meters").json() == []


def test_a_description_may_have_line_breaks(api: httpx.Client) -> None:
    assert create(api, slug="calls", description="line one\n\tline two\r\n").status_code == 201


def test_update_meets_the_same_limits(api: httpx.Client) -> None:
    assert create(api, slug="calls", groupBy={"a": "$.a"}).status_code == 201
    too_many = {"groupBy": {f"k{i}": f"$.k{i}" for i in range(5)}}
    assert "limits.meterGroupByKeys" in problem(api.put("/api/v1/meters/calls", json=too_many))["detail"]
    clash = {"groupBy": {"window_start": "$.a", "group_window_start": "$.b"}}
    assert "view column" in problem(api.put("/api/v1/meters/calls", json=clash))["detail"]
    problem(raw_post(api, "/api/v1/meters/calls", '{"name": "x\\ud800"}', method="PUT"))
    problem(api.put("/api/v1/meters/calls", json={"name": "x\x00"}))
    assert api.get("/api/v1/meters/calls").json()["groupBy"] == {"a": "$.a"}


def test_meters_per_namespace(api: httpx.Client) -> None:
    for n in range(4):
        assert create(api, slug=f"m{n}").status_code == 201
    body = problem(create(api, slug="m4"), 409)
    assert "limits.metersPerNamespace" in body["detail"] and "4 meters" in body["detail"]
    assert api.delete("/api/v1/meters/m0").status_code == 204
    assert create(api, slug="m4").status_code == 201
    assert len(api.get("/api/v1/meters").json()) == 4


def test_config_meters_meet_the_same_rules() -> None:
    limits = {"meterGroupByKeys": 2, "metersPerNamespace": 1}
    meter = {"slug": "calls", "aggregation": "COUNT", "eventType": "e"}
    assert [spec.slug for spec in config_meters(Settings(limits=limits, meters=[meter]))] == ["calls"]
    with pytest.raises(ConfigError, match="limits.meterGroupByKeys"):
        config_meters(Settings(limits=limits, meters=[{**meter, "groupBy": {"a": "$.a", "b": "$.b", "c": "$.c"}}]))
    with pytest.raises(ConfigError, match="limits.metersPerNamespace"):
        config_meters(Settings(limits=limits, meters=[meter, {**meter, "slug": "other"}]))
    for bad, field in (({"slug": "calls\n"}, "meters.0.slug"),
                       ({"valueProperty": "$" + ".a" * 100_000, "aggregation": "SUM"}, "meters.0"),
                       ({"groupBy": {"value": "$.a", "group_value": "$.b"}}, "meters.0"),
                       ({"name": "a\x00"}, "meters.0.name")):
        with pytest.raises(ConfigError, match=field):
            config_meters(Settings(meters=[{**meter, **bad}]))


# -- out-of-range times ----------------------------------------------------------------

TIME_CASES = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00",
              "9999-12-31T12:00:00Z"]


def add_calls(api: httpx.Client, settings: Settings) -> httpx.Client:
    assert create(api, slug="calls", eventType="call", groupBy={"model": "$.model"}).status_code == 201
    events_sql.insert_committed(settings.postgres.url, [
        Event(f"s{n % 4}", DAY + timedelta(minutes=n), {"model": f"m{n % 2}"}, type="call") for n in range(8)])
    return api


@pytest.fixture
def metered(api: httpx.Client, limited: Settings) -> httpx.Client:
    return add_calls(api, limited)


@pytest.fixture(scope="module")
def metered_read_only(pg_server: Any, nats_server: Any, valkey_server: Any) -> Iterator[httpx.Client]:
    """``metered``, shared by tests that only read."""
    with isolated_settings(pg_server, nats_server.url, valkey_server.url, limits=LIMITS) as settings, \
            AppServer(settings, {"api"}) as server, server.client() as client:
        yield add_calls(client, settings)


@pytest.mark.parametrize("value", TIME_CASES)
@pytest.mark.parametrize("name", ["from", "to"])
def test_out_of_range_times_are_400_naming_the_parameter(metered_read_only: httpx.Client, name: str,
                                                          value: str) -> None:
    metered = metered_read_only
    for path in ("/api/v1/meters/calls/query", "/api/v1/meters/calls/subjects",
                 "/api/v1/meters/calls/group-by/model/values"):
        body = problem(metered.get(path, params={name: value}))
        assert body["detail"].startswith(f"{name} is out of range"), body
        assert body["extensions"]["parameter"] == name
    body = problem(metered.post("/api/v1/meters/calls/query", json={name: value}))
    assert body["extensions"]["parameter"] == name
    for param in ("from", "to", "ingestedAtFrom", "ingestedAtTo"):
        detail = problem(metered.get("/api/v1/events", params={param: value}))["detail"]
        assert f"{param} is out of range" in detail


def test_times_just_inside_the_range_answer(metered: httpx.Client) -> None:
    response = metered.get("/api/v1/meters/calls/query", params={"from": "0001-01-02T00:00:00Z",
                                                                 "to": "9999-12-30T00:00:00Z"})
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["value"] == 8
    subjects = metered.get("/api/v1/meters/calls/subjects", params={"from": "0001-01-02T00:00:00Z"})
    assert subjects.status_code == 200 and subjects.json() == ["s0", "s1", "s2", "s3"]


def test_a_stored_minus_infinity_event_from_still_answers(metered: httpx.Client, limited: Settings) -> None:
    # What an earlier version stored for eventFrom 0001-01-01T00:00:00Z.
    with psycopg.connect(limited.postgres.url, autocommit=True) as conn:
        conn.execute("UPDATE meters SET event_from = '-infinity' WHERE slug = 'calls'")
        conn.execute("UPDATE meter_rollups SET event_from = '-infinity'")
    meter_env.refresh(limited.postgres.url)
    query = metered.get("/api/v1/meters/calls/query")
    assert query.status_code == 200, query.text
    assert [row["value"] for row in query.json()["data"]] == [8]
    windowed = metered.get("/api/v1/meters/calls/query", params={"windowSize": "HOUR", "windowTimeZone": "Asia/Tokyo"})
    assert windowed.status_code == 200, windowed.text
    subjects = metered.get("/api/v1/meters/calls/subjects")
    assert subjects.status_code == 200 and subjects.json() == ["s0", "s1", "s2", "s3"]
    meter = metered.get("/api/v1/meters/calls").json()
    assert "eventFrom" not in meter  # before all time is no start at all
    assert metered.put("/api/v1/meters/calls", json={"name": "Calls", "groupBy": {"model": "$.model"}}).status_code == 200


# -- unbounded answers ------------------------------------------------------------------

def test_a_query_over_max_rows_is_400_asking_to_narrow(metered: httpx.Client, limited: Settings) -> None:
    # 8 events in 8 minutes: MINUTE windows make 8 rows (limit 5), HOUR windows 1.
    body = problem(metered.get("/api/v1/meters/calls/query", params={"windowSize": "MINUTE"}))
    assert "more than 5 rows" in body["detail"] and "narrow the range" in body["detail"]
    assert body["extensions"] == {"limit": "queryMaxRows", "maxRows": 5}
    csv = metered.get("/api/v1/meters/calls/query", params={"windowSize": "MINUTE"}, headers={"accept": "text/csv"})
    problem(csv)
    assert metered.get("/api/v1/meters/calls/query", params={"windowSize": "HOUR"}).json()["data"][0]["value"] == 8
    five = metered.get("/api/v1/meters/calls/query", params={"windowSize": "MINUTE", "to": "2024-01-10T00:05:00Z"})
    assert [row["value"] for row in five.json()["data"]] == [1] * 5
    by_subject = metered.post("/api/v1/meters/calls/query", json={"groupBy": ["subject"], "windowSize": "MINUTE"})
    assert "more than 5 rows" in problem(by_subject)["detail"]
    assert metered.get("/api/v1/meters/calls/subjects").json() == ["s0", "s1", "s2", "s3"]
    events_sql.insert_committed(limited.postgres.url, [Event(f"x{n}", DAY, {}, type="call") for n in range(2)])
    body = problem(metered.get("/api/v1/meters/calls/subjects"))
    assert "more than 5 rows" in body["detail"] and "narrow the range" in body["detail"]


def test_streamed_answers_match_the_whole_document(metered: httpx.Client, limited: Settings) -> None:
    limits = limited.limits.model_copy(update={"query_max_rows": 100_000})
    wide = limited.model_copy(update={"limits": limits, "address": f"127.0.0.1:{_port()}"})
    events_sql.insert_committed(limited.postgres.url, [
        Event(f"t{n % 7}", DAY + timedelta(days=1, seconds=n * 13), {"model": f"m{n % 3}"}, type="call")
        for n in range(3000)])
    with AppServer(wide, {"api"}) as server, server.client() as client:
        params = {"windowSize": "MINUTE", "groupBy": ["subject", "model"]}
        response = client.get("/api/v1/meters/calls/query", params=params)
        assert response.status_code == 200
        data = response.json()["data"]
        assert sum(row["value"] for row in data) == 3008
        # One pass of Python's encoder over the same rows gives the same bytes.
        assert response.content == json.dumps(response.json(), ensure_ascii=False, separators=(",", ":")).encode()
        csv = client.get("/api/v1/meters/calls/query", params=params, headers={"accept": "text/csv"})
        lines = csv.text.splitlines()
        assert lines[0] == "window_start,window_end,subject,model,value" and len(lines) == len(data) + 1


def _port() -> int:
    from pgmeter.devstack.process import free_port
    return free_port()


def test_the_cache_never_stores_an_entry_over_its_limit(metered: httpx.Client, limited: Settings) -> None:
    client = valkey_sync.from_url(limited.valkey.url)
    prefix = limited.valkey.key_prefix
    try:
        small = metered.get("/api/v1/meters/calls/query", params={"windowSize": "DAY"})
        assert small.status_code == 200 and len(small.content) < 1024
        keys = client.keys(f"{prefix}q:*")
        assert keys, "a small settled answer is cached"
        assert all(len(client.get(key) or b"") <= 1024 for key in keys)
        # Five rows with long group values: well over the 1024-byte entry limit.
        events_sql.insert_committed(limited.postgres.url, [
            Event("s0", DAY + timedelta(days=2, hours=n), {"model": f"{n}" * 400}, type="call") for n in range(5)])
        big = metered.get("/api/v1/meters/calls/query", params={"windowSize": "DAY", "groupBy": ["model"],
                                                                "from": "2024-01-12T00:00:00Z"})
        assert big.status_code == 200 and len(big.content) > 1024
        again = metered.get("/api/v1/meters/calls/query", params={"windowSize": "DAY", "groupBy": ["model"],
                                                                  "from": "2024-01-12T00:00:00Z"})
        assert again.content == big.content
        assert all(len(client.get(key) or b"") <= 1024 for key in client.keys(f"{prefix}q:*"))
    finally:
        client.close()


# -- the sweep --------------------------------------------------------------------------

HOSTILE_STRINGS = ["a" * 100_000, "a\x00b", "\ud800", "x\udfffy", "\x01\x1b[31m\x7f", "line\n", "",
                   "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "10000-01-01T00:00:00Z",
                   "0001-01-01T00:00:00+01:00", "1" * 400, "-1e400", "$" + ".a" * 3000, "[" * 5000]
DEEP: Any = "deep"
for _ in range(200):
    DEEP = [DEEP]
HOSTILE_VALUES: list[Any] = [*HOSTILE_STRINGS, 10 ** 400, -(10 ** 30), 1e308, None, True, [], {}, DEEP]
QUERY_PARAMS = ["from", "to", "windowSize", "windowTimeZone", "subject", "groupBy", "filterGroupBy[model]",
                "filterCustomerId", "clientId"]
EVENT_PARAMS = ["from", "to", "ingestedAtFrom", "ingestedAtTo", "id", "subject", "limit", "customerId", "clientId"]
METER_FIELDS = ["slug", "name", "description", "aggregation", "eventType", "eventFrom", "valueProperty",
                "groupBy", "metadata"]


def _in_url(value: str) -> str:
    # Lone surrogates cannot travel in a URL; their UTF-8 look-alike (invalid bytes) can.
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def _json_text(value: Any) -> str:
    # json.dumps escapes lone surrogates as \udXXX, which the server reads back as such.
    return json.dumps(value)


def _no_5xx(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json", what


def test_hostile_values_never_get_a_5xx(metered: httpx.Client) -> None:
    # Query strings and paths have a length limit in the HTTP server (a 4xx there).
    strings = [_in_url(s) for s in HOSTILE_STRINGS if len(s) < 5000]
    query_paths = ["/api/v1/meters/calls/query", "/api/v1/meters/calls/subjects",
                   "/api/v1/meters/calls/group-by/model/values", "/api/v1/meters"]
    for path in query_paths:
        for name in QUERY_PARAMS:
            for value in strings:
                _no_5xx(metered.get(f"{path}?{quote(name)}={value}"), f"GET {path} {name}={value[:40]!r}")
    for name in EVENT_PARAMS:
        for value in strings:
            _no_5xx(metered.get(f"/api/v1/events?{name}={value}"), f"GET events {name}={value[:40]!r}")
    for value in strings:
        for path in (f"/api/v1/meters/{value}", f"/api/v1/meters/{value}/query",
                     f"/api/v1/meters/calls/group-by/{value}/values"):
            _no_5xx(metered.get(path), f"GET {path[:60]!r}")
        _no_5xx(metered.delete(f"/api/v1/meters/{value}"), f"DELETE {value[:40]!r}")
    base = {"slug": "hostile", "aggregation": "SUM", "eventType": "e", "valueProperty": "$.v"}
    for field in METER_FIELDS:
        for value in HOSTILE_VALUES:
            text = _json_text({**base, field: value})
            _no_5xx(raw_post(metered, "/api/v1/meters", text), f"POST meter {field}={str(value)[:40]!r}")
            _no_5xx(raw_post(metered, "/api/v1/meters/calls", _json_text({field: value}), method="PUT"),
                    f"PUT meter {field}={str(value)[:40]!r}")
            _no_5xx(raw_post(metered, "/api/v1/meters", _json_text({**base, "groupBy": {"k": value}})),
                    f"POST meter groupBy value {str(value)[:40]!r}")
    for name in ("from", "to", "windowSize", "windowTimeZone", "subject", "groupBy", "filterGroupBy",
                 "filterCustomerId", "clientId"):
        for value in HOSTILE_VALUES:
            _no_5xx(raw_post(metered, "/api/v1/meters/calls/query", _json_text({name: value})),
                    f"POST query {name}={str(value)[:40]!r}")
    for field in ("id", "source", "type", "subject", "time", "specversion", "datacontenttype", "data"):
        for value in HOSTILE_VALUES:
            event = {**make_event(), field: value}
            _no_5xx(metered.post("/api/v1/events", content=_json_text(event),
                                 headers={"content-type": "application/cloudevents+json"}),
                    f"POST event {field}={str(value)[:40]!r}")
    _no_5xx(metered.post("/api/v1/events", content=_json_text(make_event(data={"d": HOSTILE_VALUES[-1]})),
                         headers={"content-type": "application/cloudevents+json"}), "deep data")
    for path, method in (("/api/v1/meters", "POST"), ("/api/v1/meters/calls", "PUT"),
                         ("/api/v1/meters/calls/query", "POST"), ("/api/v1/events", "POST")):
        for text in ("[" * 100_000, '{"a":' * 100_000, '"\\ud800"', '"\\u0000"', "1e400"):
            _no_5xx(raw_post(metered, path, text, method=method), f"{method} {path} body {text[:20]!r}")
