"""File source: JSON lines followed across restarts, rotation and partial lines."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
MAPPING = '{type: "gateway.request", subject: .tpp, time: .ts, data: {bytes: .bytes, n: .n}}'


def line(n: int) -> str:
    ts = (BASE + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"n": n, "tpp": f"tpp-{n % 3}", "ts": ts, "bytes": n * 10}) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_lines_are_read_once_across_restart_rotation_and_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    append(log, "".join(line(n) for n in range(0, 20)) + "not json\n")
    with RecordingEndpoint(lambda batch: (204, {}, b"")) as endpoint:
        config = collector_config(tmp_path / "buf", [{
            "name": "gw", "source": {"type": "file", "file": str(log), "interval": "20ms", "batch": 7},
            "mapping": MAPPING, "eventSource": "gateway", "to": {"url": endpoint.url, "linger": "10ms"}}])

        def seen() -> list[int]:
            return [e["data"]["n"] for e in endpoint.accepted]

        with CollectorServer(config) as collector:
            wait_for(lambda: len(seen()) == 20, what="first 20 lines")
            dead = collector.collector.pipelines[0].buffer.dead_letters()
        # While stopped: more lines, then logrotate (rename + new file).
        append(log, "".join(line(n) for n in range(20, 30)))
        log.rename(tmp_path / "access.log.1")
        append(log, "".join(line(n) for n in range(30, 35)) + line(35)[:10])  # 35 is half written
        with CollectorServer(config):
            wait_for(lambda: len(seen()) == 35, what="old file's rest, then the new file")
            time.sleep(0.3)
            assert len(seen()) == 35  # the half line waits
            append(log, line(35)[10:])
            wait_for(lambda: len(seen()) == 36, what="the finished line")
            # Rotation while running: the old handle's late lines come first.
            log.rename(tmp_path / "access.log.2")
            append(tmp_path / "access.log.2", line(36))
            append(log, line(37))
            wait_for(lambda: len(seen()) == 38, what="lines around a live rotation")
    assert seen() == list(range(38))
    ids = [e["id"] for e in endpoint.accepted]
    assert len(set(ids)) == 38
    first: dict[str, Any] = endpoint.accepted[0]
    assert (first["type"], first["subject"], first["source"], first["time"]) == \
        ("gateway.request", "tpp-0", "gateway", BASE.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert [d["payload"] for d in dead] == ["not json"]
    assert dead[0]["reason"].startswith("not a JSON line: ")
