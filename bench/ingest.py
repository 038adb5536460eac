"""Ingest benchmark: ``python -m bench.ingest [--events N]`` (or ``make bench-ingest``).

One run, on this machine, against embedded PostgreSQL and NATS in a temporary
directory, with ``pgmeter api`` and ``pgmeter sink`` as separate processes:

1. baseline: raw asyncpg COPY of the same events into the same ``events`` table
   (same partitions and indexes, no dedup, one connection, pre-built records);
2. end-to-end: the events POSTed in batches (application/cloudevents-batch+json)
   until every one is committed in Postgres with dedup - rate and ratio to 1;
3. single-event POSTs (application/cloudevents+json) to pgmeter - with the sink
   stopped (the api and NATS alone; the sink drains afterwards) and with it
   running - and to a bare Starlette endpoint answering 204, served by uvicorn
   the same way: rates and ratios;
   2b. the same with 5% re-sent ids (``--duplicates``): each request carries copies
   of events sent before (in it or in earlier requests), as SDK retries do; the rate
   counts distinct events committed, so it compares with 2 directly;
4. JetStream-ack-to-commit latency p50/p99 (from the sink's histogram) and the
   peak RSS of the api and sink processes.

Raw COPY and end-to-end alternate ``--rounds`` times and the best of each is
reported, so one noisy moment on a shared machine does not decide the ratio.

Targets: end-to-end >= 0.6x raw COPY, with or without duplicates; single-event >= 0.5x
the bare endpoint.
Timing decides nothing in the test suite; this script only reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.common import (
    CpuMeter,
    LoadResult,
    Role,
    embedded_services,
    histogram_buckets,
    histogram_quantile,
    http_request,
    run_load,
    wait_http,
)
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack.process import free_port
from pgmeter.sink import partitions

BATCH_CT = "application/cloudevents-batch+json"
SINGLE_CT = "application/cloudevents+json"
COPY_BATCH = 5000
ENDPOINTS = ["/accounts", "/accounts/{id}/balances", "/accounts/{id}/transactions", "/payments", "/consents"]


def generate(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Open Banking API-call events from 500 TPPs over the last three days."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    events = []
    for n in range(count):
        when = now - timedelta(seconds=rng.uniform(0, 3 * 86400))
        events.append({
            "specversion": "1.0", "id": f"bench-{n:09d}", "source": "bench", "type": "api.call",
            "subject": f"tpp-{rng.randrange(500):03d}",
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "data": {"endpoint": rng.choice(ENDPOINTS), "method": rng.choice(["GET", "POST"]),
                     "response_time_ms": rng.randrange(5, 900), "status": 200},
        })
    return events


def with_duplicates(events: list[dict[str, Any]], batch: int, percent: float,
                    seed: int = 11) -> list[list[dict[str, Any]]]:
    """Requests of ``batch`` new events plus ``percent``% copies of events already sent."""
    rng = random.Random(seed)
    requests = []
    for start in range(0, len(events), batch):
        fresh = events[start:start + batch]
        copies = [events[rng.randrange(start + len(fresh))] for _ in range(int(len(fresh) * percent / 100))]
        requests.append(fresh + copies)
    return requests


def records(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    ingested = datetime.now(UTC)
    out = []
    for n, event in enumerate(events):
        when = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        out.append(("default", event["id"], event["source"], event["type"], event["subject"], when,
                    json.dumps(event["data"], separators=(",", ":")), ingested, n // 1000))
    return out


async def prepare_partitions(url: str, events: list[dict[str, Any]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        days = {partitions.day_of(int(datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() * 1e6))
                for e in events}
        await partitions.PartitionMap().ensure(conn, days)
        await partitions.maintain(conn, days_ahead=7, retention_days=0)
    finally:
        await conn.close()


async def raw_copy(url: str, rows: list[tuple[Any, ...]]) -> float:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), COPY_BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "events", records=rows[start:start + COPY_BATCH],
                    columns=("namespace", "id", "source", "type", "subject", "time", "data", "ingested_at",
                             "batch_seq"))
        return len(rows) / (time.perf_counter() - started)
    finally:
        await conn.close()


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE events, event_dedup, dead_letters")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def processed(sink: Role) -> float:
    text = sink.metrics()
    return sum(float(v) for v in re.findall(r'^openmeter_events_processed_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def wait_processed(sink: Role, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processed(sink) >= count:
            return time.time()
        time.sleep(0.02)
    raise RuntimeError(f"sink committed only {processed(sink):.0f} of {count} events in {timeout:.0f}s")


def wait_acked(nats_url: str, settings: Settings, timeout: float) -> float:
    """Wait until the sink has acked every message in the stream; return that moment.

    The sink acks a message only after the transaction holding its events committed,
    so this is "everything committed", observed from the broker without costing the
    sink anything (scraping its /metrics in a tight loop would).
    """
    import nats

    async def run() -> float:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            last = (await js.stream_info(settings.nats.stream)).state.last_seq
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = await js.consumer_info(settings.nats.stream, settings.nats.consumer)
                if info.ack_floor.stream_seq >= last:
                    return time.time()
                await asyncio.sleep(0.005)
            raise RuntimeError(f"the sink did not ack up to {last} in {timeout:.0f}s")
        finally:
            await nc.close()

    return asyncio.run(run())


def serve_bare(port: int) -> None:
    """A bare Starlette app answering 204, served exactly as ``pgmeter.cli.serve`` serves pgmeter."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        await request.body()
        return Response(status_code=204)

    async def ok(request: Request) -> Response:
        return Response(status_code=200)

    app = Starlette(routes=[Route("/api/v1/events", endpoint, methods=["POST"]), Route("/readyz", ok)])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    asyncio.run(server.serve())


def single_event_factory(host: str, port: int) -> Any:
    prefix = (b'{"specversion":"1.0","source":"bench-single","type":"api.call","subject":"tpp-001",'
              b'"data":{"endpoint":"/accounts","method":"GET","response_time_ms":42},"id":"')

    def make(worker: int, n: int) -> bytes:
        body = prefix + f"s{os.getpid()}-{worker}-{n}".encode() + b'"}'
        return http_request(host, port, "/api/v1/events", body, SINGLE_CT)

    return make


def histogram_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {bound: after.get(bound, 0.0) - before.get(bound, 0.0) for bound in after}


def ack_to_commit(sink: Role) -> dict[float, float]:
    return histogram_buckets(sink.metrics(), "pgmeter_sink_ack_to_commit_seconds")


def latency_text(buckets: dict[float, float]) -> str:
    p50, p99 = histogram_quantile(buckets, 0.5), histogram_quantile(buckets, 0.99)
    if p50 is None or p99 is None:
        return "n/a"
    return f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events for the COPY and end-to-end runs")
    parser.add_argument("--batch", type=int, default=500, help="events per HTTP request in the end-to-end run")
    parser.add_argument("--rounds", type=int, default=2, help="COPY and end-to-end runs (the best is reported)")
    parser.add_argument("--duplicates", type=float, default=5.0,
                        help="percent of re-sent ids in the duplicates run (0 skips it)")
    parser.add_argument("--single-seconds", type=float, default=8.0, help="duration of each single-event run")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections per client (single)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) after the run")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0

    print(f"pgmeter ingest benchmark: {args.events:,} events, {os.cpu_count()} cores shared by client and servers",
          flush=True)
    events = generate(args.events)
    rows = records(events)
    workers = args.clients
    batch_connections = 4
    with embedded_services(keep=args.keep) as svc:
        migrate(svc.postgres_url)
        asyncio.run(prepare_partitions(svc.postgres_url, events))
        base = dict(postgres={"url": svc.postgres_url}, nats={"url": svc.nats_url}, logLevel="warning")
        api = Role(Settings(address=f"127.0.0.1:{free_port()}", **base), "api", svc.workdir)  # type: ignore[arg-type]
        sink = Role(Settings(address=f"127.0.0.1:{free_port()}", **base), "sink", svc.workdir)  # type: ignore[arg-type]
        api.start()
        sink.start()
        try:
            host, port = "127.0.0.1", api.settings.listen_port
            bodies = [http_request(host, port, "/api/v1/events", json.dumps(events[i:i + args.batch]).encode(),
                                   BATCH_CT) for i in range(0, len(events), args.batch)]

            dup_bodies = [http_request(host, port, "/api/v1/events", json.dumps(body).encode(), BATCH_CT)
                          for body in with_duplicates(events, args.batch, args.duplicates)]

            def make_batch(worker: int, n: int, bodies: list[bytes] = bodies) -> bytes | None:
                index = worker + n * workers
                return bodies[index] if index < len(bodies) else None

            def cpu_meter(with_sink: bool = True) -> CpuMeter:
                pids = {"api": api.process.pid, "postgres": svc.processes[0].pid,  # type: ignore[union-attr]
                        "nats": svc.processes[1].pid}
                if with_sink:
                    pids["sink"] = sink.process.pid  # type: ignore[union-attr]
                return CpuMeter(pids)  # type: ignore[arg-type]

            # 1 and 2: raw COPY and end-to-end, alternating, best of each.
            copy_rates: list[float] = []
            e2e_rates: list[float] = []
            dup_rates: list[float] = []
            committed = processed(sink)
            e2e_latency: dict[float, float] = {}
            for round_ in range(args.rounds):
                copy_rates.append(asyncio.run(raw_copy(svc.postgres_url, rows)))
                asyncio.run(reset(svc.postgres_url))
                cpu = cpu_meter()
                marks: dict[str, float] = {}
                before = ack_to_commit(sink)
                cpu.start()
                load = run_load(host, port, make_batch, processes=workers, connections=batch_connections,
                                on_start=lambda marks=marks: marks.setdefault("start", time.time()))
                committed_at = wait_acked(svc.nats_url, sink.settings, timeout=600)
                e2e_cpu = cpu.stop()
                committed += len(events)
                wait_processed(sink, int(committed), timeout=60)  # and every event is there
                e2e_latency = histogram_delta(before, ack_to_commit(sink))
                e2e_rates.append(len(events) / (committed_at - marks["start"]))
                bad = {s: c for s, c in load.statuses.items() if s != 204}
                print(f"  round {round_ + 1}: raw COPY {copy_rates[-1]:,.0f}/s, end-to-end {e2e_rates[-1]:,.0f}/s "
                      f"(HTTP side {load.ok * args.batch / load.seconds:,.0f}/s, p99 request "
                      f"{load.latency(0.99) * 1000:.0f} ms{', errors ' + str(bad) if bad else ''}); {e2e_cpu}",
                      flush=True)
                asyncio.run(reset(svc.postgres_url))
                if args.duplicates > 0:
                    marks = {}
                    load = run_load(host, port, lambda worker, n: make_batch(worker, n, dup_bodies),
                                    processes=workers, connections=batch_connections,
                                    on_start=lambda marks=marks: marks.setdefault("start", time.time()))
                    committed_at = wait_acked(svc.nats_url, sink.settings, timeout=600)
                    committed += len(events)
                    wait_processed(sink, int(committed), timeout=60)  # distinct events, each once
                    dup_rates.append(len(events) / (committed_at - marks["start"]))
                    print(f"  round {round_ + 1}: with {args.duplicates:g}% re-sent ids {dup_rates[-1]:,.0f} distinct "
                          f"events/s", flush=True)
                    asyncio.run(reset(svc.postgres_url))
            copy_rate, e2e_rate = max(copy_rates), max(e2e_rates)
            print(f"raw COPY (baseline)      {copy_rate:>10,.0f} events/s   (best of {args.rounds}; 1 connection, "
                  f"{COPY_BATCH}-row COPYs into the same partitions and indexes, no dedup)", flush=True)
            print(f"end-to-end HTTP batches  {e2e_rate:>10,.0f} events/s   = {e2e_rate / copy_rate:.2f}x raw COPY "
                  f"(target >= 0.6x; best of {args.rounds}; {args.batch}-event requests, "
                  f"{workers}x{batch_connections} connections, until committed in Postgres with dedup)", flush=True)
            if dup_rates:
                dup_rate = max(dup_rates)
                print(f"  ... {args.duplicates:g}% re-sent ids  {dup_rate:>10,.0f} events/s   = {dup_rate / copy_rate:.2f}x "
                      f"raw COPY, {dup_rate / e2e_rate:.2f}x without duplicates (distinct events committed; "
                      f"best of {args.rounds})", flush=True)

            # 3: single events with the sink stopped (the api and NATS alone), alternating with
            # the bare endpoint, best of each; then once more with the sink running.
            sink_rss = sink.peak_rss_mb()
            sink.stop()
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, "-m", "bench.ingest", "--serve-bare", str(bare_port)])
            bare_runs: list[tuple[LoadResult, str]] = []
            alone_runs: list[tuple[LoadResult, str]] = []
            try:
                wait_http(f"http://127.0.0.1:{bare_port}/readyz", 30, bare)
                for _ in range(args.rounds):
                    cpu = CpuMeter({"bare": bare.pid})
                    cpu.start()
                    result = run_load("127.0.0.1", bare_port, single_event_factory("127.0.0.1", bare_port),
                                      processes=workers, connections=args.connections,
                                      duration=args.single_seconds)
                    bare_runs.append((result, cpu.stop()))
                    cpu = cpu_meter(with_sink=False)
                    cpu.start()
                    result = run_load(host, port, single_event_factory(host, port), processes=workers,
                                      connections=args.connections, duration=args.single_seconds)
                    alone_runs.append((result, cpu.stop()))
            finally:
                bare.terminate()
                bare.wait(20)
            bare_load, bare_cpu = max(bare_runs, key=lambda run: run[0].rate)
            alone, alone_cpu = max(alone_runs, key=lambda run: run[0].rate)
            accepted = sum(run.ok for run, _ in alone_runs)
            sink.start()  # a new process: its processed counter starts at 0
            wait_processed(sink, accepted, timeout=300)  # drain what queued while it was down
            cpu = cpu_meter()
            before = ack_to_commit(sink)
            cpu.start()
            together = run_load(host, port, single_event_factory(host, port), processes=workers,
                                connections=args.connections, duration=args.single_seconds)
            together_cpu = cpu.stop()
            single_latency = histogram_delta(before, ack_to_commit(sink))
            # Everything accepted must end up stored (the sink drained what queued while it was down).
            wait_processed(sink, accepted + together.ok, timeout=300)
            api_rss, sink_rss = api.peak_rss_mb(), max(sink_rss, sink.peak_rss_mb())
        finally:
            api.stop()
            sink.stop()

        def single_line(label: str, result: LoadResult, cpu_text: str) -> None:
            ratio = result.rate / bare_load.rate if bare_load.rate else 0.0
            errors = {s: c for s, c in result.statuses.items() if s != 204}
            print(f"{label:<25}{result.rate:>10,.0f} req/s      = {ratio:.2f}x bare Starlette 204 "
                  f"(p50 {result.latency(0.5) * 1000:.1f} ms, p99 {result.latency(0.99) * 1000:.1f} ms"
                  f"{', errors ' + str(errors) if errors else ''}); {cpu_text}", flush=True)

        print(f"bare Starlette 204       {bare_load.rate:>10,.0f} req/s      (best of {args.rounds}; uvicorn as "
              f"pgmeter runs it, {workers}x{args.connections} keep-alive connections; {bare_cpu})")
        single_line("single-event POST", alone, f"best of {args.rounds}, sink stopped: {alone_cpu}")
        single_line("  ... with sink running", together, together_cpu)
        print(f"ack-to-commit latency    {latency_text(e2e_latency)} in the saturated end-to-end run; "
              f"{latency_text(single_latency)} under the single-event load (JetStream store time to COMMIT)")
        print(f"peak RSS                 api {api_rss:.0f} MiB, sink {sink_rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
