"""Freshness: acknowledged -> visible in a meter query, and -> merged into the rollup.

One command (``python -m bench.freshness``, about 40 s and a few MB of disk) starts
embedded Postgres and NATS and the api, sink and refresher roles as processes,
creates a COUNT meter, and sends single events (one per HTTP request) at a steady
rate. For every event it measures, from the moment the api acknowledged it (204:
JetStream has it):

- visible: the meter query through the api (no cache) counts it. Queries add the
  events not merged yet, so this is the sink's ack-to-commit time plus a query;
- merged: the meter's ``last_seq`` (meter_rollups) has passed the event's seq, i.e.
  the refresher merged it into the rollup. The sink's commits wake the refresher
  (NOTIFY pgmeter_events); ``--interval`` is the refresher's timer, the fallback.

Polling granularity (``--poll``, 10 ms) is included in every figure. Targets
(issue 15): visible p99 <= 1 s, merged p99 <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import httpx

from bench.common import Role, embedded_services
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack.process import free_port

METER = {"slug": "fresh", "aggregation": "COUNT", "eventType": "fresh"}


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(name: str, samples: list[float]) -> str:
    if not samples:
        return f"{name}: no samples"
    return (f"{name}: n={len(samples)} p50 {percentile(samples, 50) * 1000:.0f} ms, "
            f"p90 {percentile(samples, 90) * 1000:.0f} ms, p99 {percentile(samples, 99) * 1000:.0f} ms, "
            f"max {max(samples) * 1000:.0f} ms")


async def measure(api: str, postgres_url: str, rate: float, seconds: float, poll: float) -> tuple[list[float], list[float]]:
    acked: dict[str, float] = {}  # event id -> monotonic time of its 204
    order: list[str] = []
    visible: dict[str, float] = {}
    merged: dict[str, float] = {}
    seqs: dict[str, int] = {}
    sending = True

    async with httpx.AsyncClient(base_url=api, timeout=10) as client:
        async def send() -> None:
            nonlocal sending
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                event_id = uuid.uuid4().hex
                body = {"specversion": "1.0", "id": event_id, "source": "bench", "type": "fresh",
                        "subject": f"s{n % 10}", "time": datetime.now(UTC).isoformat(), "data": {}}
                response = await client.post("/api/v1/events", content=json.dumps(body),
                                             headers={"content-type": "application/cloudevents+json"})
                if response.status_code == 204:
                    acked[event_id] = time.monotonic()
                    order.append(event_id)
                n += 1
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
            sending = False

        async def watch() -> None:
            conn = await asyncpg.connect(postgres_url)
            try:
                while sending or len(merged) < len(acked):
                    await asyncio.sleep(poll)
                    now_acked = list(order)
                    pending_visible = [e for e in now_acked if e not in visible]
                    if pending_visible:
                        response = await client.get(f"/api/v1/meters/{METER['slug']}/query")
                        total = int(sum(row["value"] for row in response.json()["data"]))
                        at = time.monotonic()
                        # The sink commits in stream order: the first `total` acked events are in.
                        for event_id in now_acked[:total]:
                            visible.setdefault(event_id, at)
                    pending = [e for e in now_acked if e not in merged]
                    if pending:
                        for row in await conn.fetch("SELECT id, seq FROM events WHERE namespace = 'default' "
                                                    "AND id = ANY($1)", [e for e in pending if e not in seqs]):
                            seqs[row["id"]] = row["seq"]
                        last_seq = await conn.fetchval("SELECT min(last_seq) FROM meter_rollups")
                        at = time.monotonic()
                        for event_id in pending:
                            if event_id in seqs and seqs[event_id] <= last_seq:
                                merged[event_id] = at
            finally:
                await conn.close()

        await asyncio.wait_for(asyncio.gather(send(), watch()), timeout=seconds + 120)
    to_visible = [visible[e] - acked[e] for e in order if e in visible]
    to_merged = [merged[e] - acked[e] for e in order if e in merged]
    return to_visible, to_merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="single events per second (default 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of the load (default 30)")
    parser.add_argument("--interval", type=float, default=2.0, help="refresher.interval, the fallback timer (s)")
    parser.add_argument("--poll", type=float, default=0.01, help="polling period of the watcher (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) after the run")
    args = parser.parse_args(argv)
    print(f"pgmeter freshness: {args.rate:g} events/s for {args.seconds:g} s, refresher interval {args.interval:g} s",
          flush=True)
    with embedded_services(keep=args.keep) as svc:
        migrate(svc.postgres_url)
        base = Settings(postgres={"url": svc.postgres_url}, nats={"url": svc.nats_url},  # type: ignore[arg-type]
                        refresher={"interval": args.interval}, meters=[METER], logLevel="warning")
        roles = [Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), role, svc.workdir)
                 for role in ("api", "sink", "refresher")]
        for role in roles:
            role.start()
        try:
            to_visible, to_merged = asyncio.run(
                measure(roles[0].url, svc.postgres_url, args.rate, args.seconds, args.poll))
        finally:
            for role in reversed(roles):
                role.stop()
    print(summary("acknowledged -> visible in a meter query", to_visible))
    print(summary("acknowledged -> merged into the rollup  ", to_merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
