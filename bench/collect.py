"""Collector throughput: HTTP source -> disk buffer -> pgmeter, against posting straight to pgmeter.

Both paths end in the same pgmeter (api + sink processes, embedded Postgres and NATS)
and are timed from the first request to the moment the last event is committed in
Postgres, so the comparison is end to end. The collector runs as its own process with
its SQLite buffer (WAL, synchronous=FULL) on the local disk. Also reported: how fast
the collector *accepts* (answers 204), which is what a producer sees.

    python -m bench.collect [--events 20000] [--batch 100] [--concurrency 8]

Target (issue 17): collector end to end >= 0.5x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import yaml

from bench.common import Role, embedded_services, wait_http
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack.process import free_port

BATCH_CT = "application/cloudevents-batch+json"


def bodies(run: str, events: int, batch: int) -> list[bytes]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    for start in range(0, events, batch):
        out.append(json.dumps([
            {"specversion": "1.0", "id": f"{run}-{i}", "source": "bench", "type": "api.call",
             "subject": f"tpp-{i % 50}", "time": now, "data": {"endpoint": "/accounts", "ms": i % 300}}
            for i in range(start, min(events, start + batch))]).encode())
    return out


async def post_all(url: str, payloads: list[bytes], concurrency: int) -> float:
    """POST every payload (retrying 503s); seconds until the last 204."""
    queue = list(reversed(payloads))
    started = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            payload = queue.pop()
            while True:
                response = await client.post(url, content=payload, headers={"content-type": BATCH_CT})
                if response.status_code == 204:
                    break
                if response.status_code != 503:
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.monotonic() - started


def count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def wait_count(url: str, target: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count(url) >= target:
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"only {count(url)} of {target} events stored")


def run(target: str, payloads: list[bytes], events: int, concurrency: int, pg_url: str) -> tuple[float, float]:
    """(accept rate, end-to-end rate) in events/s."""
    before = count(pg_url)
    t0 = time.monotonic()
    accept = asyncio.run(post_all(target, payloads, concurrency))
    done = wait_count(pg_url, before + events)
    return events / accept, events / (done - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is reported")
    parser.add_argument("--delivery-batch", type=int, default=500, help="the collector's to.batchSize")
    parser.add_argument("--in-flight", type=int, default=None, help="the collector's to.maxInFlight (default: its own)")
    args = parser.parse_args(argv)
    print(f"pgmeter collect benchmark: {args.events:,} events in batches of {args.batch}, "
          f"{args.concurrency} in flight, {os.cpu_count()} cores shared by everything", flush=True)
    with embedded_services() as svc:
        migrate(svc.postgres_url)
        base = dict(postgres={"url": svc.postgres_url}, nats={"url": svc.nats_url}, logLevel="warning")
        api = Role(Settings(address=f"127.0.0.1:{free_port()}", **base), "api", svc.workdir)  # type: ignore[arg-type]
        sink = Role(Settings(address=f"127.0.0.1:{free_port()}", **base), "sink", svc.workdir)  # type: ignore[arg-type]
        api.start()
        sink.start()
        listen = f"127.0.0.1:{free_port()}"
        config = svc.workdir / "collector.yaml"
        to: dict[str, object] = {"url": api.url, "batchSize": args.delivery_batch}
        if args.in_flight:
            to["maxInFlight"] = args.in_flight
        config.write_text(yaml.safe_dump({
            "listen": listen, "buffer": str(svc.workdir / "buffer"), "logLevel": "warning",
            "pipelines": [{"name": "http", "source": {"type": "http"}, "to": to}]}))
        log = open(Path(svc.workdir) / "collector.log", "ab")  # noqa: SIM115 - closed below
        collector = subprocess.Popen([sys.executable, "-m", "pgmeter", "collect", "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://{listen}/readyz", 30, collector)
            direct: list[tuple[float, float]] = []
            via: list[tuple[float, float]] = []
            # Warm-up (partitions, connections), not measured.
            run(f"{api.url}/api/v1/events", bodies("warm", 2000, args.batch), 2000, args.concurrency,
                svc.postgres_url)
            for _ in range(args.rounds):
                tag = uuid.uuid4().hex[:8]
                direct.append(run(f"{api.url}/api/v1/events", bodies(f"d{tag}", args.events, args.batch),
                                  args.events, args.concurrency, svc.postgres_url))
                via.append(run(f"http://{listen}/api/v1/events", bodies(f"c{tag}", args.events, args.batch),
                               args.events, args.concurrency, svc.postgres_url))
            best_direct = max(r[1] for r in direct)
            best_via = max(r[1] for r in via)
            print(f"  direct to pgmeter      : {best_direct:9,.0f} events/s end to end "
                  f"(accepted at {max(r[0] for r in direct):,.0f}/s)")
            print(f"  via pgmeter collect    : {best_via:9,.0f} events/s end to end "
                  f"(accepted at {max(r[0] for r in via):,.0f}/s)")
            print(f"  ratio                  : {best_via / best_direct:.2f}x (target >= 0.5x)")
        finally:
            collector.terminate()
            collector.wait(20)
            log.close()
            api.stop()
            sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
