"""``pgmeter collect dead-letters list|replay``: after a mapping fix or an endpoint fix,
dead letters go back with the ids they would have had, and are counted once."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from prometheus_client import REGISTRY

from pgmeter.cli import main
from pgmeter.collect.ids import event_id
from pgmeter.config import CollectorConfig, Settings
from tests.support.app import AppServer
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for
from tests.support.ingest import make_event, post_events, wait_until_stored

# v1 has a bug: a record without "user" gets an audit event with no subject (invalid).
MAPPING_V1 = '{type: "call", subject: .tpp, time: .ts}, {type: "audit", subject: .user, time: .ts}'
MAPPING_V2 = '{type: "call", subject: .tpp, time: .ts}, {type: "audit", subject: (.user // .tpp), time: .ts}'


def write_config(config: CollectorConfig, path: Path) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    return str(path)


def test_a_fixed_mapping_replays_with_the_same_ids_and_pgmeter_counts_each_once(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    at = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [json.dumps({"tpp": "a", "user": "u", "ts": at}), json.dumps({"tpp": "b", "ts": at}),
             "not json", json.dumps({"tpp": "c", "ts": "yesterday"})]  # the last fails under any mapping
    log = tmp_path / "gw.log"
    log.write_text("".join(line + "\n" for line in lines))
    name = "gw-replay"  # its own: the metrics live as long as the test process
    pipeline = {"name": name, "source": {"type": "file", "file": str(log), "interval": "20ms"},
                "mapping": MAPPING_V1, "eventSource": "gateway",
                "to": {"url": f"http://{settings.address}", "linger": "10ms"}}
    config = collector_config(tmp_path / "buf", [pipeline])
    file = write_config(config, tmp_path / "collector.yaml")
    with AppServer(settings, {"api", "sink"}), CollectorServer(config) as collector:
        buffer = collector.collector.pipelines[0].buffer
        wait_for(lambda: buffer.stats().dead_letters == 4 and buffer.stats().events == 0, what="first pass")
        assert main(["collect", "dead-letters", "list", "--config", file]) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(d["pipeline"], d["reason"].split(":")[0], d["replay"]) for d in listed] == [
            (name, "invalid event", "map the record again"),  # b's audit
            (name, "invalid event", "map the record again"),  # c's call
            (name, "invalid event", "map the record again"),  # c's audit
            (name, "not a JSON line", "send as is")]
        # The fix, then the replay, while the collector runs.
        write_config(CollectorConfig.model_validate(
            {**config.model_dump(by_alias=True), "pipelines": [{**pipeline, "mapping": MAPPING_V2}]}),
            tmp_path / "collector.yaml")
        assert main(["collect", "--config", file, "dead-letters", "replay", "--all"]) == 0
        report = capsys.readouterr().out
        wait_until_stored(settings.postgres.url, 4)
        wait_for(lambda: buffer.stats().events == 0, what="replay delivered")
        stats = buffer.stats()
        letters = buffer.dead_letters()
    assert report.splitlines()[0] == f"{name}: 3 dead letters replayed, 2 events queued, 2 dead again"
    # The oracle: ids from the file itself (inode, offset, line digest), as the source derives them.
    inode, offset, ids = log.stat().st_ino, 0, []
    for line in lines:
        ids.append(event_id("gateway", "file", inode, offset, hashlib.sha256(line.encode()).hexdigest()))
        offset += len(line) + 1
    with psycopg.connect(settings.postgres.url) as conn:
        stored = conn.execute("SELECT id, type, subject FROM events ORDER BY id").fetchall()
    assert stored == sorted([(ids[0], "call", "a"), (f"{ids[0]}-1", "audit", "u"),
                             (ids[1], "call", "b"), (f"{ids[1]}-1", "audit", "b")])
    # b's call went twice (first pass, and again with its record): pgmeter kept one.
    assert REGISTRY.get_sample_value("pgmeter_collect_delivered_events_total", {"pipeline": name}) == 5
    assert (stats.events, stats.bytes) == (0, 0)
    # What still fails stays, with its reason; the line that is not JSON is left as it was.
    assert [(d["payload"], d["reason"].split(":")[0]) for d in letters] == [
        ("not json", "not a JSON line"), *[(d["payload"], "invalid event") for d in letters[1:]]]
    assert len(letters) == 3 and all(json.loads(d["record"])["tpp"] == "c" for d in letters[1:])


def test_an_endpoint_refusal_goes_back_as_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refusing = True

    def answer(batch: list[dict[str, object]]) -> tuple[int, dict[str, str], bytes]:
        bad = [i for i, e in enumerate(batch) if e["id"] == "bad"]
        if refusing and bad:
            problem = {"status": 400, "detail": "no meter for it yet",
                       "extensions": {"validationErrors": [{"index": i, "message": "unknown type"} for i in bad]}}
            return 400, {}, json.dumps(problem).encode()
        return 204, {}, b""

    with RecordingEndpoint(answer) as endpoint:
        config = collector_config(tmp_path / "buf", [
            {"name": "http", "source": {"type": "http"}, "to": {"url": endpoint.url, "linger": "10ms"}}])
        with CollectorServer(config) as collector:
            buffer = collector.collector.pipelines[0].buffer
            sent = [make_event("ok-1"), make_event("bad"), make_event("ok-2")]
            assert post_events(httpx.Client(base_url=collector.base_url), sent).status_code == 204
            wait_for(lambda: len(endpoint.accepted) == 2 and buffer.stats().dead_letters == 1, what="refusal")
            seq = buffer.dead_letters()[0]["seq"]
            refusing = False  # the endpoint is fixed
            # The flags' collector: --buffer DIR names its one pipeline.
            assert main(["collect", "dead-letters", "replay", "--buffer", str(tmp_path / "buf"), "--id", "999"]) == 1
            assert "no dead letter 999 in http" in capsys.readouterr().err
            assert main(["collect", "dead-letters", "replay", "--buffer", str(tmp_path / "buf"),
                         "--id", str(seq)]) == 0
            wait_for(lambda: len(endpoint.accepted) == 3, what="the replayed event")
            wait_for(lambda: buffer.stats().events == 0, what="drained")
            stats = buffer.stats()
    assert (stats.events, stats.bytes, stats.dead_letters) == (0, 0, 0)
    by_id = {e["id"]: e for e in endpoint.accepted}
    assert sorted(by_id) == ["bad", "ok-1", "ok-2"]
    assert {k: v for k, v in by_id["bad"].items() if k != "time"} == sent[1]  # as sent (time was added at the door)
