"""Delivery: what each answer of the endpoint does to the buffered events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, stored_ids, wait_for
from tests.support.ingest import make_event, post_events, stored_count, wait_until_stored

TOKEN = "collector-token-0123456789"


def pipeline(url: str, name: str = "p", **to: object) -> dict[str, object]:
    return {"name": name, "source": {"type": "http"}, "to": {"url": url, "linger": "10ms", **to}}


def test_a_refused_event_is_dead_lettered_with_pgmeters_detail_and_the_rest_delivered(
        settings: Settings, tmp_path: Path) -> None:
    # The collector allows longer ids than the endpoint: the endpoint's 400 names the event.
    config = collector_config(tmp_path / "buf", [pipeline(f"http://{settings.address}", "refusals", batchSize=50)],
                              limits={"eventIdBytes": 1024})
    long_id = "L" * 300
    events = [make_event(f"ok-{i}") for i in range(10)]
    events.insert(4, make_event(long_id))
    with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
        assert post_events(client, events).status_code == 204  # all in one batch
        with AppServer(settings, {"api", "sink"}):
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: buffer.stats().events == 0, what="buffer drained")
            wait_until_stored(settings.postgres.url, 10)
        dead = buffer.dead_letters()
        metrics = client.get("/metrics").text
    assert stored_ids(settings.postgres.url) == sorted(f"ok-{i}" for i in range(10))
    assert len(dead) == 1
    assert json.loads(dead[0]["payload"])["id"] == long_id
    assert dead[0]["reason"] == "endpoint answered 400: id must be at most 256 bytes (UTF-8)"
    assert dead[0]["detail"] == ("invalid event: 1 of 11 events invalid: event 4: id must be at most 256 bytes "
                                 "(UTF-8)")
    # (a pipeline name of its own: the metrics live as long as the test process)
    assert 'pgmeter_collect_dead_lettered_events_total{pipeline="refusals",reason="endpoint 400"} 1.0' in metrics
    assert 'pgmeter_collect_delivered_events_total{pipeline="refusals"} 10.0' in metrics
    assert 'pgmeter_collect_received_events_total{pipeline="refusals"} 11.0' in metrics
    assert 'pgmeter_collect_delivery_seconds_count{pipeline="refusals"} 1.0' in metrics


def test_without_indexes_the_batch_is_halved_until_the_bad_event_is_alone(tmp_path: Path) -> None:
    """OpenMeter's 400 names no event: one bad event must not take good ones with it."""
    def answer(batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        if any(e["id"] == "bad" for e in batch):
            return 400, {}, json.dumps({"status": 400, "detail": "bad event in batch"}).encode()
        return 204, {}, b""

    with RecordingEndpoint(answer) as endpoint:
        config = collector_config(tmp_path / "buf", [pipeline(endpoint.url, batchSize=16)])
        ids = [f"e-{i:02d}" for i in range(16)]
        ids[11] = "bad"
        with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
            assert post_events(client, [make_event(i) for i in ids]).status_code == 204
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: buffer.stats().events == 0, what="buffer drained")
            dead = buffer.dead_letters()
    assert sorted(e["id"] for e in endpoint.accepted) == sorted(i for i in ids if i != "bad")
    assert len(dead) == 1 and json.loads(dead[0]["payload"])["id"] == "bad"
    assert dead[0]["reason"] == "endpoint answered 400: bad event in batch"


def test_retry_after_is_honoured_and_the_token_is_sent(tmp_path: Path) -> None:
    calls = []

    def answer(batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        calls.append(1)
        if len(calls) == 1:
            return 503, {"Retry-After": "2"}, json.dumps({"status": 503, "detail": "busy"}).encode()
        if len(calls) == 2:
            return 429, {"Retry-After": "1"}, b""
        return 204, {}, b""

    with RecordingEndpoint(answer) as endpoint:
        config = collector_config(tmp_path / "buf", [pipeline(endpoint.url, "retry-after", token=TOKEN,
                                                              backoffInitial="1ms", backoffMax="5ms")])
        with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
            assert post_events(client, [make_event("a"), make_event("b")]).status_code == 204
            wait_for(lambda: len(endpoint.accepted) == 2, what="delivery")
            failures = client.get("/metrics").text
    (t1, ids1, s1, auth1), (t2, _, s2, _), (t3, ids3, s3, auth3) = endpoint.attempts
    assert (s1, s2, s3) == (503, 429, 204)
    assert ids1 == ids3 == ["a", "b"]
    assert auth1 == auth3 == f"Bearer {TOKEN}"
    # The backoff alone would retry within 5 ms; Retry-After says 2 s, then 1 s.
    assert t2 - t1 >= 1.9 and t3 - t2 >= 0.9
    assert 'pgmeter_collect_delivery_failures_total{cause="503",pipeline="retry-after"} 1.0' in failures


def test_the_token_selects_the_namespace_and_a_wrong_one_is_retried_not_dropped(
        settings: Settings, tmp_path: Path) -> None:
    settings.auth_tokens = {TOKEN: "tenant-a"}
    wrong = collector_config(tmp_path / "buf", [pipeline(f"http://{settings.address}", token="not-the-token-at-all",
                                                         backoffInitial="10ms", backoffMax="50ms")])
    with AppServer(settings, {"api", "sink"}):
        with CollectorServer(wrong) as collector, httpx.Client(base_url=collector.base_url) as client:
            assert post_events(client, [make_event("t-1"), make_event("t-2")]).status_code == 204
            wait_for(lambda: 'cause="401"' in client.get("/metrics").text, what="a 401")
            assert collector.collector.pipelines[0].buffer.stats().events == 2
        # The same buffer, now with the right token (an operator fixed the config).
        right = wrong.model_copy(update={"pipelines": [wrong.pipelines[0].model_copy(update={
            "to": wrong.pipelines[0].to.model_copy(update={"token": TOKEN})})]})
        with CollectorServer(right) as collector:
            wait_until_stored(settings.postgres.url, 2, namespace="tenant-a")
            wait_for(lambda: collector.collector.pipelines[0].buffer.stats().events == 0, what="drained")
    assert stored_count(settings.postgres.url) == 2


def test_several_batches_in_flight_send_each_event_once(tmp_path: Path) -> None:
    import threading
    import time

    in_flight = 0
    most = 0
    lock = threading.Lock()

    def slow(batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return 204, {}, b""

    with RecordingEndpoint(slow, concurrent=True) as endpoint:
        config = collector_config(tmp_path / "buf", [pipeline(endpoint.url, "parallel", batchSize=25, maxInFlight=4)])
        ids = [f"par-{i:04d}" for i in range(1000)]
        with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
            for start in range(0, len(ids), 250):
                assert post_events(client, [make_event(i) for i in ids[start:start + 250]]).status_code == 204
            wait_for(lambda: len(endpoint.accepted) >= 1000, what="all delivered")
            wait_for(lambda: collector.collector.pipelines[0].buffer.stats().events == 0, what="drained")
    assert sorted(e["id"] for e in endpoint.accepted) == ids  # each once: batches never overlap
    assert all(len(attempt[1]) <= 25 for attempt in endpoint.attempts)
    assert most > 1  # they really were in flight together
