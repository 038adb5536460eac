"""POST /api/v1/events: OpenMeter's wire behaviour, every 400 path, 413 and 503.

Most tests share one api+sink server (module scope) with its own database and
stream; the 503 test runs against a private nats-server it stops and restarts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgmeter.config import Settings
from tests.support import events_sql
from tests.support.app import AppServer
from tests.support.ingest import (
    BATCH,
    CLOUDEVENT,
    JSON,
    WIDE_TIME_LIMITS,
    PrivateNats,
    isolated_settings,
    make_event,
    post_events,
    stored_count,
    wait_until_stored,
)
from tests.support.metrics import delta, scrape

CONTENT_TYPES = [CLOUDEVENT, BATCH, JSON]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def module_settings(pg_server: Any, nats_server: Any) -> Iterator[Settings]:
    with isolated_settings(pg_server, nats_server.url, ingest={"maxBodyBytes": MAX_BODY},
                           limits=WIDE_TIME_LIMITS) as settings:
        yield settings


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[AppServer]:
    with AppServer(module_settings, {"api", "sink"}) as running:
        yield running


@pytest.fixture
def client(server: AppServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def body_for(content_type: str, events: list[dict[str, Any]]) -> Any:
    """What each content type carries for these events (one event for the single type)."""
    return events[0] if content_type == CLOUDEVENT else events


def stored(settings: Settings, *ids: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(settings.postgres.url) as conn:
        rows = conn.execute("SELECT id, source, type, subject, time, data, ingested_at, stored_at, "
                            "tableoid::regclass::text FROM events WHERE id = ANY(%s)", (list(ids),)).fetchall()
    return {row[0]: row for row in rows}


def wait_for_ids(settings: Settings, *ids: str, timeout: float = 30) -> dict[str, tuple[Any, ...]]:
    """The stored rows of exactly these events, once all are committed."""
    deadline = time.monotonic() + timeout
    while len(found := stored(settings, *ids)) < len(ids):
        assert time.monotonic() < deadline, f"only {len(found)} of {len(ids)} events stored"
        time.sleep(0.05)
    return found


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank"
    return body  # type: ignore[no-any-return]


# -- accepted forms --------------------------------------------------------------------------


def test_single_event_is_204_with_empty_body_and_stored(client: httpx.Client, module_settings: Settings) -> None:
    # Within limits.eventMaxAge of now (the sink judges event times against it).
    day = datetime.now(UTC).date() - timedelta(days=10)
    event = make_event(time=f"{day:%Y-%m-%d}T10:00:00.123456+02:00", data={"tokens": 5, "model": "gpt"})
    sent_at = datetime.now(UTC)
    response = post_events(client, event, CLOUDEVENT)
    assert response.status_code == 204, response.text
    assert response.content == b""
    row = wait_for_ids(module_settings, event["id"])[event["id"]]
    seen_at = datetime.now(UTC)
    assert row[1:4] == ("pgmeter-tests", "api.call", "customer-1")
    # Any offset is accepted and stored in UTC with its microseconds.
    assert row[4] == datetime(day.year, day.month, day.day, 8, 0, 0, 123456, tzinfo=UTC)
    assert row[5] == {"tokens": 5, "model": "gpt"}
    # Ingested while the request was served, stored (committed) after that, before we saw it.
    assert sent_at <= row[6] <= row[7] <= seen_at


@pytest.mark.parametrize("content_type", [BATCH, JSON])
def test_batches_are_204_and_every_event_is_stored(client: httpx.Client, module_settings: Settings,
                                                   content_type: str) -> None:
    events = [make_event(subject=f"s{i}", data={"i": i}) for i in range(25)]
    assert post_events(client, events, content_type).status_code == 204
    found = wait_for_ids(module_settings, *(e["id"] for e in events))
    assert {row[0]: (row[3], row[5]) for row in found.values()} == {
        e["id"]: (e["subject"], e["data"]) for e in events}


def test_application_json_takes_a_single_object(client: httpx.Client, module_settings: Settings) -> None:
    event = make_event(data={"single": True})
    assert post_events(client, event, JSON).status_code == 204
    assert wait_for_ids(module_settings, event["id"])[event["id"]][5] == {"single": True}


def test_empty_batch_is_204_but_empty_json_array_is_400(client: httpx.Client) -> None:
    response = client.post("/api/v1/events", content=b"[]", headers={"content-type": BATCH})
    assert response.status_code == 204 and response.content == b""
    body = problem(client.post("/api/v1/events", content=b"[]", headers={"content-type": JSON}), 400)
    assert body["detail"] == "invalid event: no events found"


@pytest.mark.parametrize("payload", [b"5", b'"text"', b"null", b"true"])
def test_application_json_that_is_neither_event_nor_array_is_no_events_found(client: httpx.Client,
                                                                             payload: bytes) -> None:
    body = problem(client.post("/api/v1/events", content=payload, headers={"content-type": JSON}), 400)
    assert body["detail"] == "invalid event: no events found"


@pytest.mark.parametrize("content_type", [
    "application/cloudevents+json; charset=utf-8", "application/json; charset=UTF-8",
    "Application/CloudEvents-Batch+JSON"])
def test_media_type_parameters_and_case_are_ignored(client: httpx.Client, module_settings: Settings,
                                                    content_type: str) -> None:
    event = make_event(data={"type": content_type})
    body = event if "batch" not in content_type.lower() else [event]
    response = client.post("/api/v1/events", content=json.dumps(body), headers={"content-type": content_type})
    assert response.status_code == 204, response.text
    assert wait_for_ids(module_settings, event["id"])[event["id"]][5] == {"type": content_type}


def test_optional_attributes_and_extensions_are_accepted(client: httpx.Client, module_settings: Settings) -> None:
    cases = [
        make_event(data=None),                      # no data at all
        make_event(data={}),                        # empty object
        make_event(datacontenttype="application/json", dataschema="https://example.com/schema", data={"a": 1}),
        make_event(time=None, dataschema=None, data=None, mycustomext="kept-out"),
        make_event(dataschema="urn:example:schema:v1", data={"a": 1}),
        {**make_event(), "data": None, "time": None},
    ]
    before = time.time()
    assert post_events(client, cases, BATCH).status_code == 204
    wait_deadline = time.monotonic() + 30
    while len(stored(module_settings, *(c["id"] for c in cases))) < len(cases):
        assert time.monotonic() < wait_deadline
        time.sleep(0.05)
    rows = stored(module_settings, *(c["id"] for c in cases))
    assert rows[cases[0]["id"]][5] is None
    assert rows[cases[1]["id"]][5] == {}
    # A missing or null time is the server's time of ingest.
    server_time = rows[cases[4]["id"]][4].timestamp()
    assert before - 5 <= server_time <= time.time() + 5


# -- rejected requests -----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded",
                                          "application/cloudevents", None])
def test_other_content_types_are_400(client: httpx.Client, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/api/v1/events", content=json.dumps(make_event()), headers=headers)
    assert problem(response, 400)["detail"].startswith("invalid content type")


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("payload", [b"{", b'{"id": "x",}', b"not json", b"", b"   ", b'{"id": NaN}', b"\xff\xfe"])
def test_malformed_json_is_400(client: httpx.Client, content_type: str, payload: bytes) -> None:
    body = problem(client.post("/api/v1/events", content=payload, headers={"content-type": content_type}), 400)
    assert body["detail"].startswith("invalid event")


def test_wrong_top_level_shape_is_400(client: httpx.Client) -> None:
    single = client.post("/api/v1/events", content=json.dumps([make_event()]), headers={"content-type": CLOUDEVENT})
    assert "one CloudEvent" in problem(single, 400)["detail"]
    batch = client.post("/api/v1/events", content=json.dumps(make_event()), headers={"content-type": BATCH})
    assert "JSON array" in problem(batch, 400)["detail"]


REQUIRED = ["id", "source", "specversion", "type", "subject"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("field", REQUIRED)
@pytest.mark.parametrize("value,message", [
    (..., "is required"), (None, "is required"), ("", "must not be empty"), (5, "must be a string"),
    (["x"], "must be a string")])
def test_required_string_fields(client: httpx.Client, content_type: str, field: str, value: Any,
                                message: str) -> None:
    event = make_event()
    if value is ...:
        del event[field]
    else:
        event[field] = value
    response = post_events(client, body_for(content_type, [event]), content_type)
    body = problem(response, 400)
    errors = body["extensions"]["validationErrors"]
    assert {"index": 0, "field": field, "message": message} in [
        {**e, "message": e["message"][:len(message)]} for e in errors]
    assert f"event 0: {field}" in body["detail"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("version", ["2.0", "1", "1.0.0", " 1.0"])
def test_unsupported_specversion_is_400(client: httpx.Client, content_type: str, version: str) -> None:
    event = make_event(specversion=version)
    errors = problem(post_events(client, body_for(content_type, [event]), content_type), 400)["extensions"][
        "validationErrors"]
    assert [e["field"] for e in errors] == ["specversion"]


def test_specversion_0_3_is_accepted(client: httpx.Client) -> None:
    assert post_events(client, make_event(specversion="0.3")).status_code == 204


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("data", ["a string", 5, 1.5, True, [1, 2], ["a"]])
def test_data_must_be_an_object_or_null(client: httpx.Client, content_type: str, data: Any) -> None:
    event = make_event(data=data)
    errors = problem(post_events(client, body_for(content_type, [event]), content_type), 400)["extensions"][
        "validationErrors"]
    assert [(e["index"], e["field"]) for e in errors] == [(0, "data")]
    assert errors[0]["message"].startswith("must be a JSON object or null")


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("value", ["application/xml", "text/plain", "", 5, None])
def test_datacontenttype_must_be_application_json(client: httpx.Client, content_type: str, value: Any) -> None:
    event = make_event(datacontenttype=value, data={"a": 1})
    errors = problem(post_events(client, body_for(content_type, [event]), content_type), 400)["extensions"][
        "validationErrors"]
    assert [e["field"] for e in errors] == ["datacontenttype"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("value", ["", "not a uri", "schema.json", "://x", "https://x/%zz", "http://x/\u0001", 5])
def test_dataschema_must_be_a_uri(client: httpx.Client, content_type: str, value: Any) -> None:
    # OpenMeter's Event schema: dataschema is a string in format uri (null is allowed).
    event = make_event(dataschema=value, data={"a": 1})
    errors = problem(post_events(client, body_for(content_type, [event]), content_type), 400)["extensions"][
        "validationErrors"]
    assert [e["field"] for e in errors] == ["dataschema"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("value", [
    "2024-01-01", "2024-01-01T00:00:00", "2024-01-01 00:00:00Z", "yesterday", "2024-13-01T00:00:00Z",
    "2024-01-01T25:00:00Z", "2024-01-01T00:00:00+2400", "0000-01-01T00:00:00Z", 1704067200, True])
def test_bad_time_is_400(client: httpx.Client, content_type: str, value: Any) -> None:
    event = make_event(time=value) if isinstance(value, str) else {**make_event(), "time": value}
    errors = problem(post_events(client, body_for(content_type, [event]), content_type), 400)["extensions"][
        "validationErrors"]
    assert [e["field"] for e in errors] == ["time"]


# A recent midnight: event times must be within limits.eventMaxAge of now.
_DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=10)


@pytest.mark.parametrize("value,expected", [
    (f"{_DAY:%Y-%m-%d}T00:00:00Z", _DAY),
    (f"{_DAY:%Y-%m-%d}t00:00:00z", _DAY),
    (f"{_DAY:%Y-%m-%d}T00:00:00.1Z", _DAY.replace(microsecond=100000)),
    (f"{_DAY:%Y-%m-%d}T00:00:00.123456789Z", _DAY.replace(microsecond=123456)),
    (f"{_DAY:%Y-%m-%d}T05:45:00+05:45", _DAY),
    (f"{_DAY - timedelta(days=1):%Y-%m-%d}T19:00:00-05:00", _DAY),
])
def test_rfc3339_times_are_stored_in_utc_at_microseconds(client: httpx.Client, module_settings: Settings,
                                                         value: str, expected: datetime) -> None:
    event = make_event(time=value)
    assert post_events(client, event).status_code == 204
    deadline = time.monotonic() + 30
    while not stored(module_settings, event["id"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stored(module_settings, event["id"])[event["id"]][4] == expected


def test_a_bad_event_rejects_the_whole_batch_and_names_each(client: httpx.Client,
                                                            module_settings: Settings) -> None:
    good = [make_event() for _ in range(3)]
    batch = [good[0], {**make_event(), "subject": ""}, good[1], "not an object", {**make_event(), "data": "x"},
             good[2]]
    body = problem(post_events(client, batch, BATCH), 400)
    errors = body["extensions"]["validationErrors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "subject"), (3, ""), (4, "data")]
    assert body["detail"].startswith("invalid event: 3 of 6 events invalid: event 1: subject")
    # All or nothing: a marker sent afterwards lands, the good events of the rejected batch never do.
    marker = make_event()
    assert post_events(client, marker).status_code == 204
    deadline = time.monotonic() + 30
    while not stored(module_settings, marker["id"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stored(module_settings, *(e["id"] for e in good)) == {}


def test_many_errors_are_all_listed_but_detail_stays_short(client: httpx.Client) -> None:
    batch = [{"specversion": "1.0"} for _ in range(30)]
    body = problem(post_events(client, batch, BATCH), 400)
    assert len(body["extensions"]["validationErrors"]) == 30 * 4  # id, source, type, subject
    assert body["detail"].endswith("and 110 more")


@pytest.mark.parametrize("event,field", [
    ({**make_event(), "id": "a\u0000b"}, "id"),
    (make_event(data={"k": "nul \u0000 inside"}), "data"),
    (make_event(data={"k\u0000": 1}), "data"),
])
def test_nul_characters_are_400(client: httpx.Client, event: dict[str, Any], field: str) -> None:
    errors = problem(post_events(client, event), 400)["extensions"]["validationErrors"]
    assert [e["field"] for e in errors] == [field]


def test_literal_backslash_u0000_text_is_fine(client: httpx.Client) -> None:
    # The six characters \u0000 (an escaped backslash in JSON) are not a NUL.
    assert post_events(client, make_event(data={"k": "\\u0000"})).status_code == 204


@pytest.mark.parametrize("raw,field", [
    (b'{"specversion":"1.0","id":"\\ud800","source":"s","type":"t","subject":"x"}', "id"),
    (b'{"specversion":"1.0","id":"i","source":"s","type":"t","subject":"x","data":{"a":"\\udc00"}}', "data"),
])
def test_unpaired_surrogates_are_400(client: httpx.Client, raw: bytes, field: str) -> None:
    errors = problem(client.post("/api/v1/events", content=raw, headers={"content-type": CLOUDEVENT}), 400)[
        "extensions"]["validationErrors"]
    assert [e["field"] for e in errors] == [field]


def test_numbers_json_cannot_hold_are_400(client: httpx.Client) -> None:
    raw = b'{"specversion":"1.0","id":"i","source":"s","type":"t","subject":"x","data":{"a":1e400}}'
    errors = problem(client.post("/api/v1/events", content=raw, headers={"content-type": CLOUDEVENT}), 400)[
        "extensions"]["validationErrors"]
    assert [e["field"] for e in errors] == ["data"]


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = make_event(data={"blob": "x" * (MAX_BODY + 10)})
    body = problem(post_events(client, big), 413)
    assert str(MAX_BODY) in body["detail"]
    # Without a Content-Length (chunked), the limit still holds.
    chunks = iter([json.dumps(big).encode()[i:i + 8192] for i in range(0, MAX_BODY + 200, 8192)])
    response = client.post("/api/v1/events", content=chunks, headers={"content-type": CLOUDEVENT})
    problem(response, 413)


def test_wrong_method_is_405_problem_allowing_every_method_of_the_path(client: httpx.Client) -> None:
    def allow(response: httpx.Response) -> set[str]:
        assert response.status_code == 405
        return set(response.headers["allow"].split(", "))

    response = client.put("/api/v1/events", content=b"{}")
    problem(response, 405)
    assert allow(response) == {"GET", "HEAD", "POST"}
    assert allow(client.options("/api/v1/events")) == {"GET", "HEAD", "POST"}
    assert allow(client.patch("/api/v1/meters/x")) == {"DELETE", "GET", "HEAD", "PUT"}
    assert allow(client.delete("/api/v1/meters")) == {"GET", "HEAD", "POST"}
    assert allow(client.put("/api/v1/meters/x/query")) == {"GET", "HEAD", "POST"}


def test_ingested_counter_counts_acknowledged_events(client: httpx.Client) -> None:
    def ingested() -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('openmeter_events_ingested_total{namespace=""}'))

    before = ingested()
    assert post_events(client, [make_event() for _ in range(7)]).status_code == 204
    assert post_events(client, [{"bad": 1}]).status_code == 400
    assert ingested() - before == 7


# -- the broker being away -------------------------------------------------------------------


def test_nats_down_is_503_with_retry_after_and_recovers(tmp_path: Path, pg_server: Any) -> None:
    broker = PrivateNats(tmp_path).start()
    try:
        with isolated_settings(pg_server, broker.url) as settings, AppServer(settings, {"api"}) as app, \
                app.client() as http:
            assert post_events(http, make_event()).status_code == 204
            broker.stop()
            response = post_events(http, make_event())
            body = problem(response, 503)
            assert response.headers["retry-after"] == "1"
            assert "not stored" in body["detail"]
            broker.start()
            deadline = time.monotonic() + 30
            while post_events(http, make_event()).status_code != 204:
                assert time.monotonic() < deadline, "ingest did not recover after NATS came back"
                time.sleep(0.2)
    finally:
        broker.stop()


def test_stored_count_helper_sees_namespace(module_settings: Settings, client: httpx.Client) -> None:
    url = module_settings.postgres.url
    assert post_events(client, make_event()).status_code == 204
    assert wait_until_stored(url, 1, namespace="default") >= 1
    # Nothing but this test writes namespace "elsewhere" (on a day no other test of the
    # module uses, so the partition is ours to create): its count is exact.
    assert stored_count(url, namespace="elsewhere") == 0
    with psycopg.connect(url) as conn:
        events_sql.insert(conn, [events_sql.Event("x", datetime(2019, 7, 14, tzinfo=UTC), None) for _ in range(3)],
                          namespace="elsewhere")
    assert stored_count(url, namespace="elsewhere") == 3
    assert wait_until_stored(url, 3, namespace="elsewhere") == 3


def test_a_request_larger_than_one_broker_message_is_split_and_fully_stored(pg_server: Any, nats_server: Any) -> None:
    """The server's max payload is 1 MiB; a 3 MiB request travels as several messages."""
    with isolated_settings(pg_server, nats_server.url, ingest={"maxBodyBytes": 8 * 1024 * 1024}) as settings, \
            AppServer(settings, {"api", "sink"}) as app, app.client() as http:
        events = [make_event(source="big", data={"blob": "x" * 3000, "n": n}) for n in range(1000)]
        assert len(json.dumps(events)) > 3 * 1024 * 1024
        before = scrape(http)
        assert post_events(http, events).status_code == 204
        wait_until_stored(settings.postgres.url, 1000)
        messages = delta(before, scrape(http), "pgmeter_ingest_messages_total")
        with psycopg.connect(settings.postgres.url) as conn:
            [(batches, stored)] = conn.execute("SELECT count(DISTINCT batch_seq), count(*) FROM events").fetchall()
        # Each message is one stream sequence: the messages this request published are
        # exactly the batches its events were stored from.
        assert (stored, messages) == (1000, batches) and batches >= 3
