"""advancedMeterGroupByFilters: pgmeter's answers equal the oracle's for random filters.

One module dataset whose group-by values are chosen to tell the operators apart:
case variants (ASCII and not: ``ilike`` lowers ASCII only), LIKE's own characters
``%`` ``_`` and the backslash inside values, numbers and booleans as text, and the
empty value a missing property yields. Part of it is merged into the rollups and
part is the unmerged tail, so both halves of every answer are filtered. Hypothesis
draws filters (every operator, nested ``$and``/``$or``, empty objects and null
operators), groupings and windows, sent by GET and POST; the expected rows come
from tests/support/oracle.py, which implements the filter language on its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import events_sql, meter_env, oracle
from tests.support.events_sql import Event
from tests.support.ingest import WIDE_TIME_LIMITS
from tests.test_oracle import compare

START = datetime(2024, 5, 1, tzinfo=UTC)
GROUP_BY = {"model": "$.model", "region": "$.meta.region"}
MODELS: list[Any] = ["gpt-4o", "GPT-4o", "gpt_4o", "gpt%4o", "gpt-4o-mini", "a\\b", "é", "É", "Éclair", "claude",
                     "Claude", "", 7, 2.5, True, None]
REGIONS: list[Any] = ["eu", "EU", "eu-west", "us", "us_east", "ap", "", None]
METERS = {
    "calls": oracle.MeterDef("calls", "COUNT", "request", None, GROUP_BY),
    "tokens": oracle.MeterDef("tokens", "SUM", "request", "$.tokens", GROUP_BY),
}

# What filters compare against: the values above as text, near misses, and LIKE's characters.
TEXTS = ["gpt-4o", "GPT-4O", "gpt_4o", "gpt%4o", "gpt", "a\\b", "é", "É", "claude", "CLAUDE", "7", "2.5", "true",
         "eu", "EU", "us", "us_east", "z", "0", "-", "~"]
PATTERN_PIECES = ["g", "G", "p", "t", "-", "4", "o", "O", "é", "É", "c", "l", "e", "u", "E", "a", "%", "_",
                  "\\%", "\\_", "\\\\", "\\g"]


@dataclass
class Dataset:
    client: httpx.Client
    stored: list[oracle.Stored]


def _events(rng: random.Random, count: int) -> list[Event]:
    events = []
    for _ in range(count):
        data: dict[str, Any] = {"tokens": rng.choice([1, 2, 5, 10, "3", None])}
        model = rng.choice(MODELS)
        if model is not None:
            data["model"] = model
        region = rng.choice(REGIONS)
        if region is not None:
            data["meta"] = {"region": region}
        at = START + timedelta(seconds=rng.uniform(0, 3 * 86400))
        events.append(Event(rng.choice(["s1", "s2", "s3"]), at, data))
    return events


@pytest.fixture(scope="module")
def dataset(pg_server, nats_server, valkey_server) -> Iterator[Dataset]:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    with meter_env.database(pg_server) as url:
        settings_ = meter_env.settings_for(url, nats_server, valkey_server, limits=WIDE_TIME_LIMITS)
        with meter_env.api_server(settings_) as app, app.client() as client:
            for meter in METERS.values():
                body = {"slug": meter.slug, "aggregation": meter.aggregation, "eventType": meter.event_type,
                        "groupBy": meter.group_by, **({"valueProperty": meter.value_property}
                                                      if meter.value_property else {})}
                assert client.post("/api/v1/meters", json=body).status_code == 201
            merged, tail = _events(rng, 500), _events(rng, 200)
            events_sql.insert_committed(url, merged)
            meter_env.refresh(url)
            events_sql.insert_committed(url, tail)  # not merged: answered from raw events
            stored = [oracle.Stored(0, e.type, e.subject, e.time, e.data) for e in merged + tail]
            yield Dataset(client, stored)


def leaf() -> st.SearchStrategy[dict[str, Any]]:
    text = st.one_of(st.sampled_from(TEXTS), st.text(alphabet="gptGPT-_%4oéÉ\\ceu", min_size=1, max_size=5))
    pattern = st.lists(st.sampled_from(PATTERN_PIECES), min_size=1, max_size=6).map("".join)
    return st.one_of(
        st.builds(lambda op, value: {op: value},
                  st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$contains", "$ncontains"]), text),
        st.builds(lambda op, value: {op: value}, st.sampled_from(["$like", "$nlike", "$ilike", "$nilike"]), pattern),
        st.builds(lambda op, values: {op: values}, st.sampled_from(["$in", "$nin"]),
                  st.lists(text, max_size=3)),
        st.builds(lambda flag: {"$exists": flag}, st.booleans()),
        st.just({}),
        st.builds(lambda value: {"$eq": None, "$ne": value}, text),  # a null operator is absent
    )


FILTER = st.recursive(
    leaf(),
    lambda children: st.builds(lambda op, members: {op: members}, st.sampled_from(["$and", "$or"]),
                               st.lists(children, max_size=3)),
    max_leaves=6)


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(filters=st.dictionaries(st.sampled_from(["model", "region"]), FILTER, max_size=2),
       group_by=st.lists(st.sampled_from(["model", "region", "subject"]), unique=True, max_size=2),
       window=st.sampled_from([None, "DAY"]), slug=st.sampled_from(sorted(METERS)), post=st.booleans())
@example(filters={"model": {"$ilike": "é"}}, group_by=["model"], window=None, slug="calls", post=False)
@example(filters={"model": {"$like": "a\\\\b"}}, group_by=["model"], window=None, slug="calls", post=True)
@example(filters={"model": {"$like": "gpt\\_4o"}}, group_by=["model"], window=None, slug="calls", post=False)
@example(filters={"model": {"$exists": False}, "region": {"$nin": []}}, group_by=[], window="DAY",
         slug="tokens", post=False)
@example(filters={"region": {"$or": [{}, {"$in": []}]}}, group_by=["region"], window=None, slug="calls", post=True)
def test_random_filters_match_the_oracle(dataset: Dataset, filters: dict[str, Any], group_by: list[str],
                                         window: str | None, slug: str, post: bool) -> None:
    query = oracle.Query(window_size=window, group_by=tuple(group_by), advanced=filters)
    if post:
        response = dataset.client.post(f"/api/v1/meters/{slug}/query", json=meter_env.query_body(query))
    else:
        response = dataset.client.get(f"/api/v1/meters/{slug}/query", params=meter_env.query_string(query))
    assert response.status_code == 200, response.text
    want = oracle.answer(METERS[slug], dataset.stored, query)
    assert compare(METERS[slug], response.json()["data"], want) is None


def test_the_dataset_tells_the_operators_apart(dataset: Dataset) -> None:
    """The oracle is not vacuous here: these filters keep different, non-empty parts."""
    counts = {}
    for name, f in {"eq": {"$eq": "gpt-4o"}, "ilike": {"$ilike": "gpt-4o"}, "like_": {"$like": "gpt_4o"},
                    "escaped": {"$like": "gpt\\_4o"}, "accent": {"$ilike": "é"}, "empty": {"$exists": False}}.items():
        query = oracle.Query(advanced={"model": f})
        rows = oracle.answer(METERS["calls"], dataset.stored, query)
        counts[name] = rows[0].value
        got = dataset.client.get("/api/v1/meters/calls/query", params=meter_env.query_string(query)).json()["data"]
        assert got[0]["value"] == rows[0].value, name
    assert 0 < counts["eq"] < counts["ilike"] and counts["escaped"] < counts["like_"] and counts["escaped"] > 0
    assert counts["accent"] > 0 and counts["empty"] > 0


@pytest.mark.parametrize("op", ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$contains", "$ncontains", "$like",
                                "$nlike", "$ilike", "$nilike", "$in", "$nin"])
def test_every_operator_against_every_value(dataset: Dataset, op: str) -> None:
    """Each operator with each probe value (the values stored among them), grouped by
    the key, so an off-by-one comparison or a case rule shows as a wrong row."""
    failures = []
    for text in TEXTS:
        query = oracle.Query(group_by=("model",), advanced={"model": {op: [text] if op in ("$in", "$nin") else text}})
        got = dataset.client.post("/api/v1/meters/calls/query", json=meter_env.query_body(query))
        assert got.status_code == 200, got.text
        problem = compare(METERS["calls"], got.json()["data"], oracle.answer(METERS["calls"], dataset.stored, query))
        if problem:
            failures.append(f"{op} {text!r}: {problem}")
    assert failures == []
