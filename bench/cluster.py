"""``python -m bench.cluster``: past one node on NATS, with real processes on loopback.

One command (about two minutes, a few hundred MB of disk) starts embedded Postgres,
a three-node JetStream cluster (three ``nats-server`` processes, the stream with 3
replicas), the api and sinks as processes, and runs two scenarios:

1. **kill -9 a NATS node under ingest.** A producer sends single events (one per
   request, several connections) and retries a 503 or a connection error with the
   same event id until it gets a 204; a third of the way in, the node leading the
   stream is killed with SIGKILL. Then every acknowledged event must be stored
   exactly once and nothing else stored; the answers seen during re-election are
   counted.
2. **1 -> 2 -> 3 sinks on one durable consumer.** With the sinks stopped, ``--backlog``
   events are published; then k sinks start and the time until every event is
   committed gives the throughput; in the 3-sink round one sink is killed with
   SIGKILL half-way, and the round must still store every event exactly once.

Nothing here is a test (it takes minutes); the exactly-once checks print
``ok``/``FAILED`` and the command exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import nats

from bench.common import Role, embedded_services
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack import binaries
from pgmeter.devstack.process import ManagedProcess, free_port, port_open, wait_until

BATCH_CT = "application/cloudevents-batch+json"
EVENT_CT = "application/cloudevents+json"


def say(text: str) -> None:
    print(text, flush=True)


def start_nats_cluster(workdir: Path, nodes: int = 3) -> tuple[list[ManagedProcess], list[int]]:
    """``nodes`` nats-server processes in one JetStream cluster on loopback."""
    client_ports = [free_port() for _ in range(nodes)]
    route_ports = [free_port() for _ in range(nodes)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    procs = []
    for n in range(nodes):
        data = workdir / f"nats{n}"
        data.mkdir(parents=True, exist_ok=True)
        proc = ManagedProcess(
            f"nats-{n}",
            [str(binaries.nats_server()), "-a", "127.0.0.1", "-p", str(client_ports[n]), "-js", "-sd", str(data),
             "--server_name", f"n{n}", "--cluster_name", "pgmeter", "--cluster",
             f"nats://127.0.0.1:{route_ports[n]}", "--routes", routes],
            log_path=workdir / f"nats{n}.log")
        proc.start()
        procs.append(proc)
    for n, proc in enumerate(procs):
        wait_until(lambda n=n: port_open("127.0.0.1", client_ports[n]), timeout=30, what="nats-server", process=proc)
    return procs, client_ports


async def wait_jetstream(url: str, timeout: float = 60) -> None:
    """Until the cluster has a JetStream meta leader (account info answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(url.split(",")[0], connect_timeout=2, allow_reconnect=False)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def stream_leader(url: str, stream: str) -> str:
    nc = await nats.connect(url.split(",")[0], connect_timeout=2)
    try:
        info = await nc.jetstream().stream_info(stream)
        return str(info.cluster.leader)
    finally:
        await nc.close()


def event(run: str, n: int) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"{run}-{n}", "source": "bench-cluster", "type": "call",
            "subject": f"s{n % 20}", "time": datetime.now(UTC).isoformat(), "data": {"n": 1}}


async def produce(api: str, run: str, seconds: float, connections: int, on_third: asyncio.Event,
                  statuses: Counter[str]) -> set[str]:
    """Single events until ``seconds`` pass; each retried until its 204. Returns the
    acknowledged ids."""
    acked: set[str] = set()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    third = time.monotonic() + seconds / 3

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            body = json.dumps(event(run, next(counter)))
            event_id = json.loads(body)["id"]
            while True:
                if time.monotonic() >= third:
                    on_third.set()
                try:
                    response = await client.post("/api/v1/events", content=body, headers={"content-type": EVENT_CT})
                    statuses[str(response.status_code)] += 1
                    if response.status_code == 204:
                        acked.add(event_id)
                        break
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=api, timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    return acked


async def stored(url: str, prefix: str) -> Counter[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, count(*) AS n FROM events WHERE source = 'bench-cluster' "
                                "AND id LIKE $1 GROUP BY id", prefix + "-%")
        return Counter({row["id"]: row["n"] for row in rows})
    finally:
        await conn.close()


async def wait_stored(url: str, prefix: str, want: int, timeout: float) -> tuple[Counter[str], float]:
    """The run's stored events once all ``want`` are in (or at the timeout), and the
    seconds from the first one seen to the last (polled every 20 ms)."""
    started = time.monotonic()
    first: float | None = None
    while True:
        got = await stored(url, prefix)
        now = time.monotonic()
        if got and first is None:
            first = now
        if len(got) >= want or now - started > timeout:
            return got, now - (first or started)
        await asyncio.sleep(0.02)


def check(name: str, acked: set[str], got: Counter[str], sent: set[str] | None = None) -> bool:
    lost = len(acked - set(got))
    doubled = sum(1 for n in got.values() if n > 1)
    extra = len(set(got) - (sent if sent is not None else acked))
    ok = lost == doubled == extra == 0
    say(f"  {name}: {len(acked):,} acknowledged, {len(got):,} stored; lost {lost}, stored twice {doubled}, "
        f"stored but never sent {extra}: {'ok' if ok else 'FAILED'}")
    return ok


async def kill_one_half_way(url: str, prefix: str, want: int, victim: Role) -> tuple[Counter[str], float]:
    """Wait for all ``want`` events, killing ``victim`` with SIGKILL once half are in."""
    waiter = asyncio.ensure_future(wait_stored(url, prefix, want, 180))
    while len(await stored(url, prefix)) < want // 2:
        await asyncio.sleep(0.05)
    assert victim.process is not None
    victim.process.kill()
    return await waiter


async def publish_backlog(api: str, run: str, count: int) -> set[str]:
    ids = set()
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        for start in range(0, count, 500):
            batch = [event(run, n) for n in range(start, min(count, start + 500))]
            response = await client.post("/api/v1/events", content=json.dumps(batch), headers={"content-type": BATCH_CT})
            assert response.status_code == 204, response.text
            ids.update(str(e["id"]) for e in batch)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30, help="duration of the kill -9 scenario (default 30)")
    parser.add_argument("--connections", type=int, default=8, help="producer connections (default 8)")
    parser.add_argument("--backlog", type=int, default=50_000, help="events per sink round (default 50k)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    ok = True
    with embedded_services(keep=args.keep) as svc:
        svc.processes[1].stop()  # the single nats-server: a cluster replaces it
        nats_procs, ports = start_nats_cluster(svc.workdir)
        try:
            url = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
            asyncio.run(wait_jetstream(url))
            migrate(svc.postgres_url)
            base = Settings(postgres={"url": svc.postgres_url},  # type: ignore[arg-type]
                            nats={"url": url, "replicas": 3, "ackWait": 5}, logLevel="warning")

            def role(kind: str, name: str) -> Role:
                # A directory per process: Role names its config and log after the role.
                workdir = svc.workdir / name
                workdir.mkdir(exist_ok=True)
                return Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), kind, workdir)

            api = role("api", "api").start()
            sinks = [role("sink", f"sink{n}") for n in range(3)]
            sinks[0].start()
            say(f"pgmeter cluster bench: 3 nats-server (stream replicas 3), api, sinks; {os.cpu_count()} CPUs")

            # 1. kill -9 the stream's leader under ingest.
            statuses: Counter[str] = Counter()
            third = asyncio.Event()
            run = uuid.uuid4().hex[:8]

            async def scenario() -> set[str]:
                producer = asyncio.ensure_future(produce(api.url, run, args.seconds, args.connections, third, statuses))
                await third.wait()
                leader = await stream_leader(url, base.nats.stream)
                victim = int(leader.removeprefix("n"))
                os.kill(nats_procs[victim].pid or 0, signal.SIGKILL)
                say(f"  killed nats-server {leader} (the stream leader) with SIGKILL at t={args.seconds / 3:.0f}s")
                return await producer

            started = time.monotonic()
            acked = asyncio.run(scenario())
            rate = len(acked) / (time.monotonic() - started)
            got, elapsed = asyncio.run(wait_stored(svc.postgres_url, run, len(acked), timeout=120))
            say(f"  producer: {rate:,.0f} events/s acknowledged; answers {dict(statuses)}")
            ok &= check("kill -9 of the stream leader", acked, got)

            # 2. 1 -> 2 -> 3 sinks on one durable consumer (the dead node stays dead: 2 of 3).
            sinks[0].stop()
            rates = []
            for k in (1, 2, 3):
                prefix = f"{run}b{k}"
                sent = asyncio.run(publish_backlog(api.url, prefix, args.backlog))
                with ThreadPoolExecutor(k) as pool:  # start-ups in parallel
                    list(pool.map(lambda sink: sink.start(), sinks[:k]))
                if k == 3:
                    got, elapsed = asyncio.run(kill_one_half_way(svc.postgres_url, prefix, len(sent), sinks[2]))
                else:
                    got, elapsed = asyncio.run(wait_stored(svc.postgres_url, prefix, len(sent), 180))
                # From the first commit seen to the last: the sinks' start-up is not counted.
                rates.append(len(got) / elapsed)
                say(f"  {k} sink(s): {len(got):,} events committed in {elapsed:.2f} s = {rates[-1]:,.0f} events/s"
                    + (" (one killed with SIGKILL half-way)" if k == 3 else ""))
                ok &= check(f"{k} sink(s)", sent, got, sent)
                for sink in sinks[:k]:
                    sink.stop()
            say(f"  throughput 1 -> 2 -> 3 sinks: {' -> '.join(f'{r:,.0f}' for r in rates)} events/s "
                "(first to last commit seen; Postgres and every process share this machine's cores)")
            api.stop()
        finally:
            for proc in nats_procs:
                proc.stop()
    say("all checks ok" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
