"""S3 source against an S3 server that pages, tags and checks signatures as S3 does."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgmeter.collect.ids import event_id
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server

MAPPING = '{type: "gateway.request", subject: .tpp, time: .ts, data: {n: .n}}'
AT = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def lines(*numbers: int) -> bytes:
    return b"".join(json.dumps({"tpp": f"tpp-{n % 3}", "ts": AT, "n": n}).encode() + b"\n" for n in numbers)


def pipeline(url: str, endpoint: str, **extra: object) -> dict[str, object]:
    return {"name": "s3", "source": {"type": "s3", "url": url, "bucket": "logs", "prefix": "gw/",
                                     "interval": "50ms", "batch": 2},
            "mapping": MAPPING, "eventSource": "gw-archive",
            "to": {"url": endpoint, "linger": "10ms", "backoffMax": "200ms"}, **extra}


def test_objects_under_a_prefix_are_read_once_across_pages_gzip_and_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = True
    with S3Server(page_keys=1) as s3, \
            RecordingEndpoint(lambda batch: (503, {}, b"") if down else (204, {}, b"")) as endpoint:
        objects = {"gw/2026-11-27T10.jsonl": lines(0, 1, 2),
                   "gw/2026-11-27T11.jsonl.gz": gzip.compress(lines(3, 4) + b"not json\n" + lines(5)),
                   "gw/2026-11-27T12.jsonl": lines(6, 7, 8, 9)}
        etags = {key: s3.put("logs", key, body) for key, body in objects.items()}
        s3.put("logs", "other/2026-11-27T10.jsonl", lines(100))  # outside the prefix
        config = collector_config(tmp_path / "buf", [pipeline(s3.url, endpoint.url, bufferMaxBytes=1024)])

        # A wrong secret: S3 refuses the signature; nothing is read, the source keeps trying.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with CollectorServer(config) as collector:
            wait_for(lambda: sum(status == 403 for _, _, status in s3.requests) >= 2, what="refused twice")
            assert collector.collector.pipelines[0].buffer.stats().events == 0

        # The endpoint is down and the buffer small: the source stops mid-object, its
        # position committed with what it buffered; the collector is stopped there.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        with CollectorServer(config) as collector:
            buffer = collector.collector.pipelines[0].buffer
            wait_for(lambda: buffer.stats().events >= 4, what="the buffer filling")
            position = json.loads(buffer.get_state("s3:logs/gw/") or "{}")
        assert position["key"] is not None and position["line"] > 0  # mid-object

        down = False
        with CollectorServer(config) as collector:
            wait_for(lambda: len(endpoint.accepted) == 10, what="every line")
            s3.put("logs", "gw/2026-11-27T13.jsonl", lines(10))  # a new object, later
            wait_for(lambda: len(endpoint.accepted) == 11, what="the new object")
            dead = collector.collector.pipelines[0].buffer.dead_letters()
    assert [e["data"]["n"] for e in endpoint.accepted] == list(range(11))  # key order, each once
    line_numbers = {0: 1, 1: 2, 2: 3, 3: 1, 4: 2, 5: 4, 6: 1, 7: 2, 8: 3, 9: 4}
    keys = {n: key for key, ns in (("gw/2026-11-27T10.jsonl", (0, 1, 2)), ("gw/2026-11-27T11.jsonl.gz", (3, 4, 5)),
                                   ("gw/2026-11-27T12.jsonl", (6, 7, 8, 9))) for n in ns}
    assert [e["id"] for e in endpoint.accepted[:10]] == [
        event_id("gw-archive", "s3", "logs", keys[n], etags[keys[n]], line_numbers[n]) for n in range(10)]
    assert [(d["payload"], d["reason"].split(":")[0]) for d in dead] == [("not json", "not a JSON line")]
    # The listing was paged (1 key a page) and followed by continuation token.
    assert any("continuation-token=" in path for _, path, status in s3.requests if status == 200)
    assert not any(path.startswith("/logs/other/") for _, path, _ in s3.requests)
