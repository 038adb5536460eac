"""Re-sent events are normal (issue 19): the duplicate path must be as quiet as the first copy.

A private PostgreSQL, so its server log holds only this test's statements: a load with
5% re-sent ids (in the same request, in later requests, and with other times) must
store every distinct event exactly once and make PostgreSQL log no ERROR at all.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import psycopg

from pgmeter.config import Settings
from pgmeter.devstack.process import free_port
from tests.support.app import AppServer
from tests.support.ingest import PrivatePostgres, make_event, post_events, wait_until_stored

DISTINCT = 2000
BATCH = 50


def test_five_percent_duplicates_store_once_and_log_no_error(server_dir: Path, nats_server: Any) -> None:
    # server_dir, not tmp_path: the server runs as an unprivileged user when tests run as root.
    postgres = PrivatePostgres(server_dir).start()
    try:
        tag = free_port()
        settings = Settings(address=f"127.0.0.1:{free_port()}", postgres={"url": postgres.url},
                            nats={"url": nats_server.url, "stream": f"DUP_{tag}", "subject_prefix": f"dup{tag}.events",
                                  "consumer": f"sink_dup_{tag}"})
        rng = random.Random(19)
        originals = [make_event(f"dup-{n:05d}", source="dups", data={"n": n}) for n in range(DISTINCT)]
        requests: list[list[dict[str, Any]]] = []
        sent: list[dict[str, Any]] = []
        for start in range(0, DISTINCT, BATCH):
            batch = originals[start:start + BATCH]
            # 5% re-sends: copies of events already sent, in this request or an earlier one.
            resent = [dict(rng.choice(sent + batch), data={"copy": True}) for _ in range(BATCH * 5 // 100)]
            sent.extend(batch)
            requests.append(batch + resent)
        log_before = (server_dir / "pg.log").stat().st_size
        with AppServer(settings, {"api", "sink"}) as app, app.client() as client:
            for body in requests:
                assert post_events(client, body).status_code == 204
            wait_until_stored(postgres.url, DISTINCT, timeout=60)
            # Copies arriving after their original committed, as an SDK retry does.
            for body in requests[:5]:
                assert post_events(client, body).status_code == 204
            marker = make_event("marker", source="dups")
            assert post_events(client, marker).status_code == 204
            wait_until_stored(postgres.url, DISTINCT + 1, timeout=60)
        with psycopg.connect(postgres.url) as conn:
            assert conn.execute("SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE data ? 'copy') "
                                "FROM events WHERE source = 'dups'").fetchone() == (DISTINCT + 1, DISTINCT + 1, 0)
            assert conn.execute("SELECT count(*) FROM event_dedup").fetchone() == (DISTINCT + 1,)
        with open(server_dir / "pg.log", "rb") as log:
            log.seek(log_before)
            errors = [line for line in log.read().decode(errors="replace").splitlines() if "ERROR" in line]
        assert errors == []
    finally:
        postgres.stop()
