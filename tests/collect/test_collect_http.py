"""HTTP source -> disk buffer -> delivery to a real pgmeter (api + sink on real Postgres/NATS)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.collect import CollectorServer, collector_config, stored_ids, wait_for
from tests.support.ingest import BATCH, CLOUDEVENT, JSON, make_event, post_events, stored_count, wait_until_stored


def http_pipeline(url: str, name: str = "http", **extra: object) -> dict[str, object]:
    return {"name": name, "source": {"type": "http"}, "to": {"url": url, "linger": "10ms"}, **extra}


def test_all_three_content_types_are_delivered_once_with_their_ids_and_times(
        settings: Settings, tmp_path: Path) -> None:
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    single = make_event("single-1", time=at, data={"tokens": 1})
    batch = [make_event(f"batch-{i}", time=at, data={"tokens": i}) for i in range(5)]
    as_json = [make_event(f"json-{i}", time=at) for i in range(3)]
    untimed = make_event("untimed-1")
    config = collector_config(tmp_path / "buf", [http_pipeline(f"http://{settings.address}")])
    with AppServer(settings, {"api", "sink"}), CollectorServer(config) as collector, \
            httpx.Client(base_url=collector.base_url) as client:
        before = datetime.now(UTC)
        assert post_events(client, single, CLOUDEVENT).status_code == 204
        assert post_events(client, batch, BATCH).status_code == 204
        assert post_events(client, as_json, JSON).status_code == 204
        assert post_events(client, untimed, CLOUDEVENT).status_code == 204
        after = datetime.now(UTC)
        wait_until_stored(settings.postgres.url, 10)
        wait_for(lambda: collector.collector.pipelines[0].buffer.stats().events == 0, what="buffer drained")
    expected = sorted(["single-1", "untimed-1", *(f"batch-{i}" for i in range(5)), *(f"json-{i}" for i in range(3))])
    assert stored_ids(settings.postgres.url) == expected
    import psycopg

    with psycopg.connect(settings.postgres.url) as conn:
        times = dict(conn.execute("SELECT id, time FROM events").fetchall())
        data = conn.execute("SELECT data FROM events WHERE id = 'batch-3'").fetchone()
    assert times["batch-4"] == at
    # An event without a time gets the moment the collector received it, not the delivery time.
    assert before - timedelta(milliseconds=1) <= times["untimed-1"] <= after
    assert data is not None and data[0] == {"tokens": 3}


@pytest.mark.parametrize("body, content_type", [
    (b"{not json", CLOUDEVENT),
    (json.dumps([{"specversion": "1.0", "id": "a", "source": "s", "type": "t", "subject": "x"},
                 {"specversion": "2.0", "id": "", "source": "s", "type": "t", "subject": "x",
                  "time": "yesterday", "data": [1]}]).encode(), BATCH),
    (json.dumps({"specversion": "1.0", "id": "a" * 300, "source": "s", "type": "t", "subject": "x"}).encode(),
     CLOUDEVENT),
    (json.dumps({"specversion": "1.0", "id": "a", "source": "s", "type": "t", "subject": "x"}).encode(),
     "text/plain"),
    (b"[]", JSON),
])
def test_refusals_are_the_apis_word_for_word(settings: Settings, tmp_path: Path, body: bytes,
                                              content_type: str) -> None:
    config = collector_config(tmp_path / "buf", [http_pipeline(f"http://{settings.address}")])
    with AppServer(settings, {"api"}) as api, CollectorServer(config) as collector:
        answers = []
        for base in (api.base_url, collector.base_url):
            response = httpx.post(f"{base}/api/v1/events", content=body, headers={"content-type": content_type})
            problem = response.json()
            problem.pop("instance", None)
            answers.append((response.status_code, response.headers["content-type"], problem))
        assert collector.collector.pipelines[0].buffer.stats().events == 0
    assert answers[0][0] == 400
    assert answers[1] == answers[0]


def test_full_buffer_answers_503_and_keeps_everything_it_accepted(settings: Settings, tmp_path: Path) -> None:
    """The documented policy: the HTTP source refuses with 503 + Retry-After; nothing accepted is lost."""
    config = collector_config(tmp_path / "buf", [http_pipeline(f"http://{settings.address}", "full",
                                                               bufferMaxBytes=4096)])
    accepted: list[str] = []
    refused = 0
    with CollectorServer(config) as collector, httpx.Client(base_url=collector.base_url) as client:
        # The endpoint is not running yet: everything accepted stays in the buffer.
        for i in range(100):
            event = make_event(f"e-{i:03d}", data={"pad": "x" * 100})
            response = post_events(client, event)
            if response.status_code == 204:
                accepted.append(event["id"])
            else:
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert response.json()["detail"].startswith("events not stored: buffer full")
                refused += 1
        stats = collector.collector.pipelines[0].buffer.stats()
        ready = client.get("/readyz").json()["pipelines"]["full"]
        assert ready["buffered"] == len(accepted) and ready["endpointReachable"] is False
        assert refused > 0 and len(accepted) == stats.events
        assert stats.bytes <= 4096
        metrics = client.get("/metrics").text
        assert f'pgmeter_collect_refused_total{{pipeline="full"}} {float(refused)}' in metrics
        assert f'pgmeter_collect_buffer_events{{pipeline="full"}} {float(len(accepted))}' in metrics
        with AppServer(settings, {"api", "sink"}):
            wait_until_stored(settings.postgres.url, len(accepted))
            wait_for(lambda: collector.collector.pipelines[0].buffer.stats().events == 0, what="buffer drained")
    assert stored_ids(settings.postgres.url) == sorted(accepted)
    assert stored_count(settings.postgres.url) == len(accepted)
