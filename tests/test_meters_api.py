"""``/api/v1/meters``: OpenMeter's shapes, validation and PUT/DELETE semantics."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from pgmeter.config import Settings
from pgmeter.meters.ulid import is_ulid
from tests.support import events_sql, meter_env
from tests.support.app import AppServer
from tests.support.events_sql import Event


@pytest.fixture
def api(settings: Settings) -> Iterator[httpx.Client]:
    with AppServer(settings, {"api"}) as server, server.client() as client:
        yield client


def create(api: httpx.Client, **body: object) -> httpx.Response:
    return api.post("/api/v1/meters", json=body)


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT schemaname || '.' || tablename FROM pg_tables "
                            "WHERE schemaname = 'rollup' UNION ALL "
                            "SELECT schemaname || '.' || viewname FROM pg_views WHERE schemaname = 'meters'").fetchall()
    return sorted(r[0] for r in rows)


def test_create_answers_201_with_openmeters_shape(api: httpx.Client) -> None:
    response = create(api, slug="api_calls", aggregation="COUNT", eventType="api.call", windowSize="MINUTE")
    assert response.status_code == 201, response.text
    meter = response.json()
    assert is_ulid(meter["id"])
    assert set(meter) == {"id", "slug", "name", "aggregation", "eventType", "metadata", "annotations",
                          "createdAt", "updatedAt"}
    assert meter["name"] == "api_calls" and meter["metadata"] is None and meter["annotations"] is None
    assert meter["createdAt"].endswith("Z")

    full = create(api, slug="tokens", name="Tokens", description="AI tokens", aggregation="SUM",
                  eventType="prompt", valueProperty="$.tokens", groupBy={"model": "$.model"},
                  metadata={"team": "ai"}, eventFrom="2024-01-01T00:00:00+01:00").json()
    assert full["description"] == "AI tokens" and full["valueProperty"] == "$.tokens"
    assert full["groupBy"] == {"model": "$.model"} and full["metadata"] == {"team": "ai"}
    assert full["eventFrom"] == "2023-12-31T23:00:00Z"
    assert api.get("/api/v1/meters/tokens").json() == full
    assert api.get(f"/api/v1/meters/{full['id']}").json() == full


@pytest.mark.parametrize("body, message", [
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "valueProperty": "$.x"},
     "meter value property is not allowed when the aggregation is count"),
    ({"slug": "c", "aggregation": "SUM", "eventType": "e"}, "valueProperty is required"),
    ({"slug": "Bad-Slug", "aggregation": "COUNT", "eventType": "e"}, "slug"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": ""}, "eventType"),
    ({"slug": "c", "aggregation": "TOTAL", "eventType": "e"}, "aggregation"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "groupBy": {"subject": "$.s"}}, "reserved"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "groupBy": {"customer_id": "$.s"}}, "reserved"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "groupBy": {"1a": "$.s"}}, "must match"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "groupBy": {"a": "s"}}, "JSONPath"),
    ({"slug": "c", "aggregation": "COUNT", "eventType": "e", "groupBy": {"a": "$.items[*].x"}}, "JSONPath"),
    ({"slug": "c", "aggregation": "SUM", "eventType": "e", "valueProperty": "$..x"}, "JSONPath"),
    ({"slug": "c", "aggregation": "SUM", "eventType": "e", "valueProperty": "$.x", "groupBy": {"a": "$.x"}},
     "must not be the valueProperty"),
])
def test_create_validates_like_openmeter(api: httpx.Client, body: dict[str, object], message: str) -> None:
    response = api.post("/api/v1/meters", json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert message in response.json()["detail"]
    assert response.json()["extensions"]["validationErrors"]


def test_create_rejects_bodies_that_are_not_objects(api: httpx.Client) -> None:
    for content in (b"", b"not json", b"[]", b'"x"'):
        assert api.post("/api/v1/meters", content=content).status_code == 400


def test_duplicate_slug_is_409_until_the_meter_is_deleted(api: httpx.Client) -> None:
    first = create(api, slug="calls", aggregation="COUNT", eventType="e").json()
    duplicate = create(api, slug="calls", aggregation="SUM", eventType="e", valueProperty="$.v")
    assert duplicate.status_code == 409
    assert "meter with the same slug already exists" in duplicate.json()["detail"]
    assert api.delete("/api/v1/meters/calls").status_code == 204
    second = create(api, slug="calls", aggregation="COUNT", eventType="e")
    assert second.status_code == 201 and second.json()["id"] != first["id"]
    # The deleted meter is still found by id, with deletedAt; the slug finds the new one.
    deleted = api.get(f"/api/v1/meters/{first['id']}").json()
    assert "deletedAt" in deleted
    assert api.get("/api/v1/meters/calls").json()["id"] == second.json()["id"]


def test_list_is_a_plain_array_with_order_and_deleted_filter(api: httpx.Client) -> None:
    for slug, aggregation in (("b_meter", "COUNT"), ("a_meter", "SUM"), ("c_meter", "MAX")):
        create(api, slug=slug, aggregation=aggregation, eventType="e",
               **({} if aggregation == "COUNT" else {"valueProperty": "$.v"}))
    api.delete("/api/v1/meters/c_meter")
    slugs = lambda r: [m["slug"] for m in r.json()]  # noqa: E731
    assert slugs(api.get("/api/v1/meters")) == ["a_meter", "b_meter"]
    assert slugs(api.get("/api/v1/meters", params={"order": "DESC", "page": 7, "pageSize": 1})) == ["b_meter", "a_meter"]
    assert slugs(api.get("/api/v1/meters", params={"orderBy": "aggregation"})) == ["b_meter", "a_meter"]
    assert slugs(api.get("/api/v1/meters", params={"includeDeleted": "true", "orderBy": "createdAt"})) == [
        "b_meter", "a_meter", "c_meter"]
    # OpenMeter's Pagination: pageSize is 1 to 1000.
    assert slugs(api.get("/api/v1/meters", params={"pageSize": 1000})) == ["a_meter", "b_meter"]
    for bad in ({"order": "UP"}, {"orderBy": "slug"}, {"includeDeleted": "maybe"}, {"pageSize": "1001"},
                {"pageSize": "0"}, {"page": "0"}):
        response = api.get("/api/v1/meters", params=bad)
        assert response.status_code == 400 and response.json()["extensions"]["parameter"] in bad


def test_lookup_validates_the_path(api: httpx.Client) -> None:
    assert api.get("/api/v1/meters/Not_A_Slug").status_code == 400
    assert api.get("/api/v1/meters/" + "a" * 65).status_code == 400
    missing = api.get("/api/v1/meters/nope")
    assert missing.status_code == 404 and missing.json()["detail"] == "meter not found: nope"
    assert api.get("/api/v1/meters/01ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 404
    # OpenMeter's pattern takes a ULID in any case: a valid id of no meter is 404.
    created = create(api, slug="cased", aggregation="COUNT", eventType="e").json()
    assert api.get(f"/api/v1/meters/{created['id']}").status_code == 200
    assert api.get(f"/api/v1/meters/{created['id'].lower()}").status_code == 404
    assert api.get("/api/v1/meters/01arZ3NDEKTSV4RRFFQ69G5FAV").status_code == 404
    assert api.get("/api/v1/meters/81ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 400  # past the ULID range


def test_put_replaces_group_by_and_metadata_resets_name_keeps_description(api: httpx.Client,
                                                                         settings: Settings) -> None:
    created = create(api, slug="tokens", name="Tokens", description="kept", aggregation="SUM",
                     eventType="prompt", valueProperty="$.tokens", groupBy={"model": "$.model"},
                     metadata={"a": "b"}).json()
    url = settings.postgres.url
    events_sql.insert_committed(url, [
        Event("s1", datetime(2024, 1, 1, 10, tzinfo=UTC), {"tokens": 5, "model": "x", "region": "eu"}, type="prompt"),
        Event("s1", datetime(2024, 1, 1, 11, tzinfo=UTC), {"tokens": 7, "model": "y", "region": "us"}, type="prompt"),
    ])
    meter_env.refresh(url)
    before = tables(url)
    updated = api.put("/api/v1/meters/tokens", json={"groupBy": {"region": "$.region"}, "slug": "ignored",
                                                      "aggregation": "COUNT"})
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["name"] == "tokens"  # absent name resets to the slug
    assert body["description"] == "kept"
    assert body["groupBy"] == {"region": "$.region"} and body["metadata"] is None
    assert body["aggregation"] == "SUM" and body["slug"] == "tokens" and body["id"] == created["id"]
    assert body["updatedAt"] >= created["updatedAt"]
    # The rollup was rebuilt for the new key (a new version); answers stay exact
    # before and after the backfill.
    assert tables(url) != before and len(tables(url)) == len(before)
    query = {"groupBy": "region"}
    expected = [(5, "eu"), (7, "us")]
    got = lambda: sorted((r["value"], r["groupBy"]["region"]) for r in  # noqa: E731
                         api.get("/api/v1/meters/tokens/query", params=query).json()["data"])
    assert got() == expected
    meter_env.refresh(url)
    assert got() == expected
    assert api.get("/api/v1/meters/tokens/query", params={"groupBy": "model"}).status_code == 400

    renamed = api.put("/api/v1/meters/tokens", json={"name": "T", "description": "new", "metadata": {"k": "v"}})
    assert renamed.json()["name"] == "T" and renamed.json()["description"] == "new"
    assert "groupBy" not in renamed.json() and renamed.json()["metadata"] == {"k": "v"}

    bad = api.put("/api/v1/meters/tokens", json={"groupBy": {"subject": "$.s"}})
    assert bad.status_code == 400
    # OpenMeter's MeterUpdate: name is 1 to 256 characters; description and groupBy
    # are not nullable (metadata is).
    for body, field in (({"name": ""}, "name"), ({"name": None}, "name"), ({"description": None}, "description"),
                        ({"groupBy": None}, "groupBy")):
        refused = api.put("/api/v1/meters/tokens", json=body)
        assert refused.status_code == 400, body
        assert [e["field"] for e in refused.json()["extensions"]["validationErrors"]] == [field]
    assert api.put("/api/v1/meters/tokens", json={"metadata": None}).status_code == 200
    assert api.put("/api/v1/meters/nope", json={}).status_code == 404


def test_delete_is_soft_and_drops_the_rollup(api: httpx.Client, settings: Settings) -> None:
    meter = create(api, slug="gone", aggregation="UNIQUE_COUNT", eventType="e", valueProperty="$.u").json()
    assert any(name.endswith("_v1") for name in tables(settings.postgres.url))
    assert api.delete("/api/v1/meters/gone").status_code == 204
    assert tables(settings.postgres.url) == []
    assert api.delete("/api/v1/meters/gone").status_code == 404
    assert api.delete(f"/api/v1/meters/{meter['id']}").status_code == 404
    assert api.get("/api/v1/meters/gone").status_code == 404
    # A deleted meter can still be queried by id: the raw events answer.
    assert api.get(f"/api/v1/meters/{meter['id']}/query").json()["data"][0]["value"] == 0


def test_view_presents_the_meter_to_sql_readers(api: httpx.Client, settings: Settings) -> None:
    create(api, slug="latency", aggregation="SUM", eventType="call", valueProperty="$.ms",
           groupBy={"value": "$.endpoint"})
    url = settings.postgres.url
    at = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    events_sql.insert_committed(url, [Event("tpp", at, {"ms": 10, "endpoint": "/a"}, type="call"),
                                      Event("tpp", at, {"ms": "5", "endpoint": "/a"}, type="call")])
    meter_env.refresh(url)
    events_sql.insert_committed(url, [Event("tpp", at, {"ms": 1, "endpoint": "/a"}, type="call")])  # unmerged
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT window_start, window_end, subject, group_value, value FROM meters.latency").fetchall()
    assert rows == [(at.replace(second=0), at.replace(second=0) + timedelta(minutes=1), "tpp", "/a", 16)]


def test_unique_count_view_counts_distinct_values_across_rollup_and_tail(api: httpx.Client,
                                                                          settings: Settings) -> None:
    create(api, slug="users", aggregation="UNIQUE_COUNT", eventType="call", valueProperty="$.user")
    url = settings.postgres.url
    at = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    events_sql.insert_committed(url, [Event("tpp", at, {"user": "u1"}, type="call"),
                                      Event("tpp", at, {"user": 1}, type="call"),
                                      Event("idle", at, {"user": None}, type="call")])
    meter_env.refresh(url)
    events_sql.insert_committed(url, [Event("tpp", at, {"user": "1"}, type="call"),  # same as 1
                                      Event("tpp", at, {"user": "u2"}, type="call")])
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT subject, value FROM meters.users ORDER BY subject").fetchall()
    assert rows == [("idle", 0), ("tpp", 3)]


def test_subjects_and_group_by_values(api: httpx.Client, settings: Settings) -> None:
    create(api, slug="calls", aggregation="COUNT", eventType="call", groupBy={"endpoint": "$.endpoint"},
           eventFrom="2024-05-02T00:00:00Z")
    url = settings.postgres.url
    now = datetime.now(UTC).replace(microsecond=0)
    events_sql.insert_committed(url, [
        Event("b", datetime(2024, 5, 1, tzinfo=UTC), {"endpoint": "/old"}, type="call"),  # before eventFrom
        Event("a", now - timedelta(hours=2), {"endpoint": "/x"}, type="call"),
        Event("c", now - timedelta(hours=30), {"endpoint": "/y"}, type="call"),
        Event("z", now - timedelta(hours=2), {"endpoint": "/z"}, type="other"),
    ])
    meter_env.refresh(url)
    events_sql.insert_committed(url, [Event("d", now - timedelta(minutes=5), {"endpoint": 5}, type="call")])
    assert api.get("/api/v1/meters/calls/subjects").json() == ["a", "b", "c", "d"]  # eventFrom ignored
    assert api.get("/api/v1/meters/calls/subjects", params={"from": "2024-05-01T00:00:01Z"}).json() == ["a", "c", "d"]
    assert api.get("/api/v1/meters/calls/subjects", params={"to": "2024-05-01T00:00:01Z"}).json() == ["b"]
    # One second around a merged event: the partial minute is read from merged raw events.
    around_a = {"from": meter_env.iso(now - timedelta(hours=2)), "to": meter_env.iso(now - timedelta(hours=2, seconds=-1))}
    assert api.get("/api/v1/meters/calls/subjects", params=around_a).json() == ["a"]
    assert api.get("/api/v1/meters/calls/group-by/endpoint/values", params=around_a).json() == ["/x"]
    values = api.get("/api/v1/meters/calls/group-by/endpoint/values")
    assert values.json() == ["/x", "5"]  # default: the last 24 hours
    week = api.get("/api/v1/meters/calls/group-by/endpoint/values",
                   params={"from": meter_env.iso(now - timedelta(days=7))})
    assert week.json() == ["/x", "/y", "5"]
    assert api.get("/api/v1/meters/calls/group-by/nope/values").status_code == 400
    too_old = api.get("/api/v1/meters/calls/group-by/endpoint/values", params={"from": "2024-05-01T00:00:00Z"})
    assert too_old.status_code == 400
    too_long = api.get("/api/v1/meters/calls/group-by/endpoint/values",
                       params={"from": meter_env.iso(now - timedelta(days=40)), "to": meter_env.iso(now)})
    assert too_long.status_code == 400
