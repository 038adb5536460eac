"""OpenMeter's Python SDK (``openmeter``) against a live pgmeter: one test per method
that touches an endpoint pgmeter serves, with every filter and list option.

The SDK is a test dependency (pyproject ``test`` extra). Not here: ``debug.metrics``
and ``events_v2.list`` (pgmeter does not serve them) and the customers, subjects,
features, entitlements and grants calls (the entitlements work and its
tests/test_entitlements_sdk.py); ``customer_id``/``filter_customer_id`` are checked
to fail as OpenMeter fails for an unknown customer.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from openmeter import Client
from openmeter._generated import models

from tests.support import meter_env
from tests.support.ingest import wait_until_stored

NOW = datetime.now(UTC).replace(microsecond=0)
# Two whole days back, so DAY windows and from/to bounds have fixed answers.
DAY0 = (NOW - timedelta(days=2)).replace(hour=0, minute=0, second=0)
DAY1 = DAY0 + timedelta(days=1)


@dataclass
class Env:
    client: Client
    url: str


def event(id: str, subject: str, at: datetime, type: str = "call", **data: object) -> dict[str, object]:
    """A CloudEvent; the ingest tests' own events have type ``other``, which no meter counts."""
    return {"specversion": "1.0", "id": id, "source": "sdk", "type": type, "subject": subject,
            "time": at.isoformat().replace("+00:00", "Z"), "data": data}


@pytest.fixture(scope="module")
def env(pg_server, nats_server, valkey_server) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    with meter_env.database(pg_server) as url:
        settings = meter_env.settings_for(url, nats_server, valkey_server)
        with meter_env.api_server(settings, frozenset({"api", "sink"})) as app:
            client = Client(endpoint=app.base_url)
            client.meters.create(models.MeterCreate(
                slug="tokens", name="Tokens", aggregation="SUM", event_type="call", value_property="$.tokens",
                group_by={"model": "$.model", "region": "$.region"}))
            # Three ingest methods, three content types; all stored before the tests read.
            client.events.ingest_event(models.Event(event("e1", "alice", DAY0 + timedelta(hours=1),
                                                          tokens=10, model="gpt-4o", region="eu")))
            client.events.ingest_events([
                models.Event(event("e2", "alice", DAY0 + timedelta(hours=5), tokens=5, model="GPT-4o-mini",
                                   region="us")),
                models.Event(event("e3", "bob", DAY1 + timedelta(hours=2), tokens=7, model="claude", region="eu")),
            ])
            client.events.ingest_events_json(models.Event(event("e4", "bob", DAY1 + timedelta(hours=3),
                                                                tokens=1, model="gpt-4o", region="ap")))
            wait_until_stored(url, 4)
            yield Env(client, url)
            client.close()


def by_group(result: models.MeterQueryResult) -> list[tuple[str | None, dict[str, str], float]]:
    return [(row.subject, dict(row.group_by or {}), row.value) for row in result.data]


# -- events ---------------------------------------------------------------------------


def test_events_ingest_event(env: Env) -> None:
    env.client.events.ingest_event(models.Event(event("solo", "carol", NOW - timedelta(minutes=5), "other", tokens=2)))
    wait_until_stored(env.url, 5)
    listed = env.client.events.list(id="solo")
    assert [e.event.id for e in listed] == ["solo"]
    assert listed[0].event.subject == "carol" and listed[0].event.data == {"tokens": 2}


def test_events_ingest_events(env: Env) -> None:
    ids = [f"batch-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    before = wait_until_stored(env.url, 0)
    env.client.events.ingest_events([models.Event(event(i, "dave", NOW - timedelta(minutes=1), "other")) for i in ids])
    wait_until_stored(env.url, before + 2)
    assert sorted(e.event.id for e in env.client.events.list(subject="dave")) == sorted(ids)


def test_events_ingest_events_json(env: Env) -> None:
    before = wait_until_stored(env.url, 0)
    env.client.events.ingest_events_json([models.Event(event("json-1", "erin", NOW - timedelta(minutes=2), "other")),
                                          models.Event(event("json-2", "erin", NOW - timedelta(minutes=2), "other"))])
    wait_until_stored(env.url, before + 2)
    assert sorted(e.event.id for e in env.client.events.list(subject="erin")) == ["json-1", "json-2"]


def test_events_list_with_every_option(env: Env) -> None:
    all_four = env.client.events.list(from_parameter=DAY0, to=NOW, subject="alice", limit=10, client_id="sdk-test",
                                      ingested_at_from=NOW - timedelta(hours=1),
                                      ingested_at_to=NOW + timedelta(hours=1))
    assert [e.event.id for e in all_four] == ["e2", "e1"]  # newest first
    first = all_four[0]
    assert first.event.subject == "alice" and first.event.data == {"tokens": 5, "model": "GPT-4o-mini",
                                                                   "region": "us"}
    assert first.ingested_at is not None and first.stored_at is not None
    assert [e.event.id for e in env.client.events.list(from_parameter=DAY0, to=NOW - timedelta(hours=6), id="e",
                                                       limit=2)] == ["e4", "e3"]
    assert env.client.events.list(from_parameter=DAY0, to=DAY0 + timedelta(hours=2)) [0].event.id == "e1"
    with pytest.raises(HttpResponseError) as unknown:  # an unknown customer, as OpenMeter
        env.client.events.list(customer_id=["01ARZ3NDEKTSV4RRFFQ69G5FAV"])
    assert unknown.value.status_code == 400


# -- meters ---------------------------------------------------------------------------


def test_meters_create(env: Env) -> None:
    created = env.client.meters.create({"slug": "calls", "aggregation": "COUNT", "eventType": "call",
                                        "description": "calls", "groupBy": {"model": "$.model"},
                                        "eventFrom": "2020-01-01T00:00:00Z"})
    assert created.slug == "calls" and created.name == "calls" and created.group_by == {"model": "$.model"}
    assert created.event_from == datetime(2020, 1, 1, tzinfo=UTC)


def test_meters_get(env: Env) -> None:
    meter = env.client.meters.get("tokens")
    assert (meter.slug, meter.name, meter.aggregation, meter.value_property) == ("tokens", "Tokens", "SUM",
                                                                                 "$.tokens")
    assert env.client.meters.get(meter.id).slug == "tokens"
    with pytest.raises(ResourceNotFoundError):
        env.client.meters.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")


def test_meters_list_with_every_option(env: Env) -> None:
    env.client.meters.create({"slug": "gone", "aggregation": "COUNT", "eventType": "x"})
    env.client.meters.delete("gone")
    slugs = [m.slug for m in env.client.meters.list(page=1, page_size=1000, order="DESC", order_by="key",
                                                    include_deleted=True)]
    assert slugs == sorted(slugs, reverse=True) and "gone" in slugs and "tokens" in slugs
    assert "gone" not in [m.slug for m in env.client.meters.list(order_by="createdAt", order="ASC")]
    for order_by in ("name", "aggregation", "updatedAt"):
        assert env.client.meters.list(order_by=order_by)
    with pytest.raises(HttpResponseError) as too_big:
        env.client.meters.list(page_size=1001)
    assert too_big.value.status_code == 400


def test_meters_update(env: Env) -> None:
    env.client.meters.create({"slug": "edited", "aggregation": "COUNT", "eventType": "call"})
    updated = env.client.meters.update("edited", models.MeterUpdate(name="Edited", description="d",
                                                                    group_by={"region": "$.region"},
                                                                    metadata={"team": "a"}))
    assert (updated.name, updated.description, updated.group_by, updated.metadata) == (
        "Edited", "d", {"region": "$.region"}, {"team": "a"})


def test_meters_delete(env: Env) -> None:
    env.client.meters.create({"slug": "doomed", "aggregation": "COUNT", "eventType": "call"})
    env.client.meters.delete("doomed")
    deleted = [m for m in env.client.meters.list(include_deleted=True) if m.slug == "doomed"]
    assert len(deleted) == 1 and deleted[0].deleted_at is not None
    assert "doomed" not in [m.slug for m in env.client.meters.list()]
    with pytest.raises(ResourceNotFoundError):
        env.client.meters.delete("doomed")


def test_meters_query_json_with_every_option(env: Env) -> None:
    result = env.client.meters.query_json(
        "tokens", client_id="sdk", from_parameter=DAY0, to=DAY1 + timedelta(days=1), window_size="DAY",
        window_time_zone="UTC", subject=["alice", "bob"], group_by=["model"])
    assert result.window_size == "DAY"
    assert [(r.window_start, r.subject, r.group_by, r.value) for r in result.data] == [
        (DAY0, "alice", {"model": "GPT-4o-mini"}, 5), (DAY0, "alice", {"model": "gpt-4o"}, 10),
        (DAY1, "bob", {"model": "claude"}, 7), (DAY1, "bob", {"model": "gpt-4o"}, 1)]
    # filter_group_by: the SDK sends the dict's Python repr as a bare filterGroupBy= key.
    filtered = env.client.meters.query_json("tokens", filter_group_by={"model": "gpt-4o"}, group_by=["region"])
    # Without a window, rows come in the order of each group's first event.
    assert by_group(filtered) == [(None, {"region": "eu"}, 10), (None, {"region": "ap"}, 1)]
    advanced = env.client.meters.query_json("tokens", group_by=["model"], advanced_meter_group_by_filters={
        "model": {"$ilike": "gpt%"}, "region": {"$or": [{"$eq": "eu"}, {"$eq": "us"}]}})
    assert by_group(advanced) == [(None, {"model": "gpt-4o"}, 10), (None, {"model": "GPT-4o-mini"}, 5)]
    zoned = env.client.meters.query_json("tokens", window_size="HOUR", window_time_zone="Asia/Kolkata",
                                         subject=["bob"])
    assert [r.value for r in zoned.data] == [7, 1]
    with pytest.raises(ResourceNotFoundError):  # an unknown customer, as OpenMeter
        env.client.meters.query_json("tokens", filter_customer_id=["01ARZ3NDEKTSV4RRFFQ69G5FAV"])


def test_meters_query_csv_with_every_option(env: Env) -> None:
    text = env.client.meters.query_csv(
        "tokens", client_id="sdk", from_parameter=DAY0, to=DAY1 + timedelta(days=1), window_size="DAY",
        window_time_zone="UTC", subject=["alice"], group_by=["region"], filter_group_by={"model": "gpt-4o"})
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["window_start", "window_end", "subject", "region", "value"]
    assert rows[1:] == [[DAY0.isoformat().replace("+00:00", "Z"), DAY1.isoformat().replace("+00:00", "Z"),
                         "alice", "eu", "10.000000"]]
    advanced = env.client.meters.query_csv("tokens", advanced_meter_group_by_filters={"model": {"$nin": ["gpt-4o"]}})
    assert advanced.splitlines()[1].endswith(",12.000000")


def test_meters_query_post_with_every_option(env: Env) -> None:
    request = models.MeterQueryRequest(
        client_id="sdk", from_property=DAY0, to=DAY1 + timedelta(days=1), window_size="DAY", window_time_zone="UTC",
        subject=["alice", "bob"], group_by=["model"], filter_group_by={"model": ["gpt-4o", "claude"]})
    result = env.client.meters.query("tokens", request)
    assert [(r.subject, r.group_by, r.value) for r in result.data] == [
        ("alice", {"model": "gpt-4o"}, 10), ("bob", {"model": "claude"}, 7), ("bob", {"model": "gpt-4o"}, 1)]
    advanced = env.client.meters.query("tokens", models.MeterQueryRequest(
        group_by=["region"], advanced_meter_group_by_filters={
            "region": models.FilterString({"$and": [{"$gte": "ap"}, {"$lt": "us"}]})}))
    assert by_group(advanced) == [(None, {"region": "eu"}, 17), (None, {"region": "ap"}, 1)]
    as_dict = env.client.meters.query("tokens", {"groupBy": ["region"], "windowTimeZone": "",
                                                 "advancedMeterGroupByFilters": {"region": {"$ne": "eu"}}})
    assert by_group(as_dict) == [(None, {"region": "us"}, 5), (None, {"region": "ap"}, 1)]


def test_meters_query_csv_post(env: Env) -> None:
    # The SDK sends no body: pgmeter takes it as {} (OpenMeter answers 400).
    text = env.client.meters.query_csv_post("tokens")
    assert text.splitlines() == ["window_start,window_end,value", text.splitlines()[1]]
    assert text.splitlines()[1].endswith(",23.000000")


def test_meters_list_subjects(env: Env) -> None:
    assert env.client.meters.list_subjects("tokens") == ["alice", "bob"]
    assert env.client.meters.list_subjects("tokens", from_parameter=DAY1, to=NOW) == ["bob"]


def test_meters_list_group_by_values(env: Env) -> None:
    assert env.client.meters.list_group_by_values("tokens", "model", from_parameter=DAY0, to=NOW) == [
        "GPT-4o-mini", "claude", "gpt-4o"]
    assert env.client.meters.list_group_by_values("tokens", "region", from_parameter=DAY1, to=NOW) == ["ap", "eu"]
    with pytest.raises(HttpResponseError) as unknown:
        env.client.meters.list_group_by_values("tokens", "nope")
    assert unknown.value.status_code == 400

