"""``python -m bench.quota``: how fast quota balances reach Valkey and how fast they are read.

Starts embedded PostgreSQL, NATS and Valkey, pgmeter's ``api`` and ``sink`` roles as
processes (the quota worker runs beside the sink), 20 TPPs with a metered entitlement
each, and measures in one run:

- acknowledged event -> reflected in the Valkey balance: a background load of
  ``--rate`` events/s over the TPPs while a probe posts one event at a time for its
  own TPP and times from the 204 to the moment the hash's ``usage`` shows it (target
  p99 <= 1 s);
- ``GET /api/v1/subjects/{tpp}/entitlements/calls/value`` served from Valkey against
  ``GET /api/v1/health`` on the same server, interleaved, one keep-alive client
  (target: p99 within 2x);
- a gateway's direct ``HMGET`` of the hash (target p99 <= 1 ms);
- a gateway's check-and-reserve (``RESERVE_SCRIPT``), alone and among 100 live holds.

Every figure is measured on this machine in this run; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import valkey

from bench.common import Role, embedded_services
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack import services
from pgmeter.devstack.process import free_port
from pgmeter.quota import layout

TPPS = 20


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def event(subject: str) -> dict[str, object]:
    return {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "bench", "type": "api.call",
            "subject": subject, "data": {"n": 1}}


def load(url: str, rate: float, stop: threading.Event) -> None:
    """``rate`` events/s in batches of 10, spread over the TPPs."""
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            batch = [event(f"tpp-{(i + k) % TPPS}") for k in range(10)]
            i += 10
            client.post("/api/v1/events", content=json.dumps(batch),
                        headers={"content-type": "application/cloudevents-batch+json"})
            next_at += 10 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="background events per second")
    args = parser.parse_args()
    with embedded_services() as svc:
        vk_proc, vk_url = services.start_valkey(svc.workdir / "valkey", free_port(),
                                                log_path=svc.workdir / "valkey.log")
        svc.processes.append(vk_proc)
        migrate(svc.postgres_url)
        base = Settings.model_validate({
            "postgres": {"url": svc.postgres_url}, "nats": {"url": svc.nats_url}, "valkey": {"url": vk_url},
            "meters": [{"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call", "valueProperty": "$.n"}]})
        api = Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), "api", Path(svc.workdir)).start()
        sink = Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), "sink", Path(svc.workdir)).start()
        vk = valkey.Valkey.from_url(vk_url)
        try:
            with httpx.Client(base_url=api.url, timeout=30) as client:
                assert client.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                             "meterSlug": "api_calls"}).status_code == 201
                for n in [*range(TPPS), "probe"]:
                    key = f"tpp-{n}"
                    assert client.post("/api/v1/customers", json={
                        "name": key, "key": key, "usageAttribution": {"subjectKeys": [key]}}).status_code == 201
                    assert client.post(f"/api/v2/customers/{key}/entitlements", json={
                        "type": "metered", "featureKey": "calls", "issueAfterReset": 1_000_000_000,
                        "usagePeriod": {"interval": "MONTH"}}).status_code == 201
                probe_key = layout.subject_key("pgmeter:", "default", "tpp-probe", "calls")

                def usage() -> int:
                    raw = vk.hget(probe_key, "usage")
                    return -1 if raw is None else int(raw)

                deadline = time.monotonic() + 30
                while usage() != 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                stop = threading.Event()
                loader = threading.Thread(target=load, args=(api.url, args.rate, stop), daemon=True)
                loader.start()
                lags: list[float] = []
                try:
                    for i in range(args.probes):
                        response = client.post("/api/v1/events", content=json.dumps(event("tpp-probe")),
                                               headers={"content-type": "application/cloudevents+json"})
                        acked = time.perf_counter()
                        assert response.status_code == 204, response.text
                        while usage() < i + 1:
                            time.sleep(0.001)
                        lags.append(time.perf_counter() - acked)
                finally:
                    stop.set()
                    loader.join()
                print(f"event acknowledged -> in Valkey, {args.probes} probes under {args.rate:.0f} events/s: "
                      f"p50 {percentile(lags, 50) * 1000:.0f} ms, p99 {percentile(lags, 99) * 1000:.0f} ms, "
                      f"max {max(lags) * 1000:.0f} ms", flush=True)

                value_times: list[float] = []
                health_times: list[float] = []
                for _ in range(args.reads):
                    t = time.perf_counter()
                    response = client.get("/api/v1/subjects/tpp-3/entitlements/calls/value")
                    value_times.append(time.perf_counter() - t)
                    assert response.headers.get("X-Pgmeter-Value-Source") == "valkey", response.headers
                    t = time.perf_counter()
                    assert client.get("/api/v1/health").status_code == 200
                    health_times.append(time.perf_counter() - t)
                v99, h99 = percentile(value_times, 99), percentile(health_times, 99)
                print(f"/value from Valkey: p50 {percentile(value_times, 50) * 1000:.2f} ms, p99 {v99 * 1000:.2f} ms; "
                      f"/api/v1/health: p50 {percentile(health_times, 50) * 1000:.2f} ms, p99 {h99 * 1000:.2f} ms; "
                      f"ratio p99 {v99 / h99:.2f}x", flush=True)

                key = layout.subject_key("pgmeter:", "default", "tpp-3", "calls")
                reads: list[float] = []
                for _ in range(args.reads * 2):
                    t = time.perf_counter()
                    vk.hmget(key, "v", "hasAccess", "balance", "validUntil")
                    reads.append(time.perf_counter() - t)
                print(f"direct HMGET: p50 {percentile(reads, 50) * 1000:.3f} ms, "
                      f"p99 {percentile(reads, 99) * 1000:.3f} ms", flush=True)

                # Check-and-reserve, as a gateway runs it before each call: with no other hold in
                # the hash, and with 100 live holds (a busy gateway's calls in flight). Each hold is
                # then deleted, untimed, as for a call not served, so the hash keeps its size.
                reserve = vk.register_script(layout.RESERVE_SCRIPT)
                for held in (0, 100):
                    for n in range(held):
                        assert reserve(keys=[key], args=[f"busy-{n}", "1", "600000"])[0] == 1
                    times: list[float] = []
                    for n in range(args.reads * 2):
                        t = time.perf_counter()
                        status, _ = reserve(keys=[key], args=[f"r-{n}", "1", "60000"])
                        times.append(time.perf_counter() - t)
                        assert status == 1
                        vk.hdel(key, f"r:r-{n}")
                    print(f"check-and-reserve (EVALSHA), {held} other holds: p50 {percentile(times, 50) * 1000:.3f} ms, "
                          f"p99 {percentile(times, 99) * 1000:.3f} ms; ratio to HMGET p99 "
                          f"{percentile(times, 99) / percentile(reads, 99):.2f}x", flush=True)
        finally:
            vk.close()
            sink.stop()
            api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
