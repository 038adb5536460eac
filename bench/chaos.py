"""Chaos soak: ``python -m bench.chaos [--duration 180] [--quick]`` (or ``make bench-chaos``).

Every role runs as its own process (``pgmeter api``, two ``pgmeter sink``,
``pgmeter refresher``) against embedded PostgreSQL, NATS (JetStream) and Valkey on
loopback ports, all in a temporary directory. While a producer sends events at a
steady rate, faults strike one after another at random: ``kill -9`` of a sink, the
api, the refresher, the postmaster, nats-server or valkey-server, each followed by
a restart on the same port and data directory after a short random outage.

The producer behaves like an SDK under faults: batches retried with backoff on
5xx and connection errors, resending the same ids, about 5% of events re-sent ids
that were acknowledged before, about 1% late events (2 to 20 hours old). Only
events answered 204 count as acknowledged.

At the end faults stop, the producer finishes the batch in hand, the stream drains
(every acknowledged event stored and the JetStream consumer with nothing pending),
and verification is exact:

- every acknowledged event is stored exactly once (lost, double-counted, and
  stored-but-never-acknowledged events are counted separately);
- every cell of two meters (COUNT per subject and hour; SUM per subject, region and
  hour), as answered by the api, equals a tally computed here from what was
  acknowledged.

Recovery time of a fault: from the strike until the struck component is ready again
and every event acknowledged before the strike is stored (a sink's in-flight events
come back only after the consumer's ack wait). Faults are not overlapped, but a
fault may strike while an earlier one is still recovering.

Nothing here asserts timing; the table reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import Role
from pgmeter.config import Settings
from pgmeter.db.migrate import migrate
from pgmeter.devstack import services
from pgmeter.devstack.process import ManagedProcess, free_port
from tests.support.faults import consumer_idle, kill_postmaster

SOURCE = "chaos"
EVENT_TYPE = "chaos.call"
SUBJECTS = 20
REGIONS = ("eu", "us", "ap")
METERS = [
    {"slug": "chaos_calls", "aggregation": "COUNT", "eventType": EVENT_TYPE},
    {"slug": "chaos_units", "aggregation": "SUM", "eventType": EVENT_TYPE, "valueProperty": "$.units",
     "groupBy": {"region": "$.region"}},
]
FAULT_KINDS = ("sink", "api", "refresher", "postmaster", "nats-server", "valkey")
RETRY_STATUSES = {500, 502, 503, 504}


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def hour_of(text: str) -> datetime:
    """The start of the UTC hour an RFC 3339 time falls in."""
    return parse(text).replace(minute=0, second=0, microsecond=0)


# -- components ----------------------------------------------------------------------------


class ServiceProcess:
    """An embedded server restartable on the same port and data directory."""

    def __init__(self, name: str, starter: Callable[..., tuple[ManagedProcess, str]], workdir: Path) -> None:
        self.name = name
        self.starter = starter
        self.dir = workdir / name
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self) -> None:
        self.process, self.url = self.starter(self.dir, self.port, log_path=self.log)

    def kill(self) -> None:
        assert self.process is not None and self.process.running(), f"{self.name} is not running"
        if self.name == "postmaster":
            kill_postmaster(self.process)  # and wait for its orphaned backends to go
        else:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# -- the producer --------------------------------------------------------------------------


@dataclass
class ProducerStats:
    acknowledged: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> event, first ack
    new_acked: list[int] = field(default_factory=list)  # per thread: new ids acknowledged (a prefix)
    resends_acked: int = 0
    late_acked: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    unconfirmed: set[str] = field(default_factory=set)  # sent, never answered 204 before the end
    errors: list[str] = field(default_factory=list)


class Producer:
    """``threads`` SDK-like senders sharing ``rate`` events/s, in batches of ``batch``.

    Each thread's new ids are ``w<thread>-<seq>`` acknowledged in increasing order (a
    batch is retried until answered 204 before the next is built), so "everything
    thread t had acknowledged at time x" is the id prefix up to ``new_acked[t]``.
    """

    def __init__(self, base_url: str, *, rate: float, threads: int, batch: int, seed: int,
                 resend_share: float = 0.05, late_share: float = 0.01) -> None:
        assert threads < 10  # ids compare as text per thread: w0-... to w9-...
        self.base_url = base_url
        self.interval = batch * threads / rate
        self.batch = batch
        self.resend_share = resend_share
        self.late_share = late_share
        self.stats = ProducerStats(new_acked=[0] * threads)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.give_up_at = float("inf")
        self.threads = [threading.Thread(target=self._run, args=(t, random.Random(seed * 100 + t)), daemon=True)
                        for t in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, timeout: float) -> None:
        """Stop after the batch in hand; a batch not acknowledged within ``timeout`` is unconfirmed."""
        self.give_up_at = time.monotonic() + timeout
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout + 15)

    def snapshot(self) -> list[int]:
        with self.lock:
            return list(self.stats.new_acked)

    def _run(self, t: int, rng: random.Random) -> None:
        seq = 0
        mine: list[dict[str, Any]] = []  # this thread's acknowledged events, for re-sends
        next_at = time.monotonic()
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while not self.stopping.is_set():
                batch: list[dict[str, Any]] = []
                fresh: list[dict[str, Any]] = []
                for _ in range(self.batch):
                    if mine and rng.random() < self.resend_share:
                        batch.append(rng.choice(mine))
                        continue
                    now = datetime.now(UTC)
                    late = rng.random() < self.late_share
                    at = now - timedelta(seconds=rng.uniform(2 * 3600, 20 * 3600)) if late else now
                    fresh.append({"specversion": "1.0", "id": f"w{t}-{seq:08d}", "source": SOURCE,
                                  "type": EVENT_TYPE, "subject": f"customer-{rng.randrange(SUBJECTS)}",
                                  "time": rfc3339(at),
                                  "data": {"units": rng.randint(1, 9), "region": rng.choice(REGIONS),
                                           **({"late": True} if late else {})}})
                    batch.append(fresh[-1])
                    seq += 1
                if not self._send(client, batch):
                    with self.lock:
                        self.stats.unconfirmed.update(event["id"] for event in batch)
                    return
                with self.lock:
                    for event in batch:
                        if event["id"] in self.stats.acknowledged:
                            self.stats.resends_acked += 1
                        else:
                            self.stats.acknowledged[event["id"]] = event
                            self.stats.late_acked += "late" in event["data"]
                    self.stats.new_acked[t] += len(fresh)
                mine.extend(fresh)
                next_at += self.interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic() - self.interval)  # no burst after an outage

    def _send(self, client: httpx.Client, batch: list[dict[str, Any]]) -> bool:
        body = json.dumps(batch)
        delay = 0.05
        while True:
            try:
                response = client.post("/api/v1/events", content=body,
                                       headers={"content-type": "application/cloudevents-batch+json"})
                with self.lock:
                    self.stats.statuses[str(response.status_code)] += 1
                if response.status_code == 204:
                    return True
                if response.status_code not in RETRY_STATUSES:
                    with self.lock:
                        self.stats.errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.TransportError as exc:
                with self.lock:
                    self.stats.statuses[type(exc).__name__] += 1
            if time.monotonic() > self.give_up_at:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# -- recovery monitor ----------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # monotonic
    acked_before: list[int]
    in_flight: int | None = None  # acknowledged, not yet stored, right before the strike
    outage: float = 0.0
    ready_at: float | None = None
    visible_at: float | None = None

    @property
    def recovery(self) -> float | None:
        if self.ready_at is None or self.visible_at is None:
            return None
        return max(self.ready_at, self.visible_at) - self.at


def missing(url: str, acked: list[int]) -> int:
    """How many ids of the threads' acknowledged prefixes are not stored (yet)."""
    wanted = [(t, n) for t, n in enumerate(acked) if n]
    if not wanted:
        return 0
    columns = ", ".join(f"count(DISTINCT id) FILTER (WHERE id BETWEEN 'w{t}-' AND 'w{t}-{n - 1:08d}')"
                        for t, n in wanted)
    with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '5s'")
        row = conn.execute(f"SELECT {columns} FROM events WHERE source = %s", (SOURCE,)).fetchone()
    assert row is not None
    return sum(max(0, n - int(found)) for found, (_, n) in zip(row, wanted, strict=True))


def visible(url: str, acked: list[int]) -> bool:
    return missing(url, acked) == 0


class Monitor(threading.Thread):
    """Marks each fault's ``visible_at``: when all events acknowledged before it are stored."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.faults: list[Fault] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.25):
            self.check()

    def check(self) -> None:
        # Later faults have longer prefixes: once one is not visible, none after it is.
        for fault in [f for f in self.faults if f.visible_at is None]:
            try:
                if not visible(self.url, fault.acked_before):
                    return
            except (psycopg.Error, OSError):
                return  # Postgres is down: try again later
            fault.visible_at = time.monotonic()


# -- verification --------------------------------------------------------------------------


Cell = tuple[Any, ...]  # (window start, subject, group-by values...)


def query_cells(api: str, slug: str, group_by: list[str], start: datetime, end: datetime) -> dict[Cell, float]:
    params: list[tuple[str, str | int | float | bool | None]] = [
        ("windowSize", "HOUR"), ("from", rfc3339(start)), ("to", rfc3339(end))]
    params += [("groupBy", key) for key in group_by]
    response = httpx.get(f"{api}/api/v1/meters/{slug}/query", params=params, timeout=60)
    response.raise_for_status()
    cells = {}
    for row in response.json()["data"]:
        key = (parse(row["windowStart"]), row["subject"], *(row["groupBy"].get(k) or "" for k in group_by if k != "subject"))
        cells[key] = float(row["value"])
    return cells


def expected_cells(events: list[dict[str, Any]]) -> tuple[dict[Cell, float], dict[Cell, float]]:
    calls: Counter[Cell] = Counter()
    units: Counter[Cell] = Counter()
    for event in events:
        hour = hour_of(event["time"])
        calls[(hour, event["subject"])] += 1
        units[(hour, event["subject"], event["data"]["region"])] += event["data"]["units"]
    return ({k: float(v) for k, v in calls.items()}, {k: float(v) for k, v in units.items()})


def compare(got: dict[Cell, float], want: dict[Cell, float]) -> int:
    return sum(1 for key in set(got) | set(want) if got.get(key, 0.0) != want.get(key, 0.0))


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of faults (default 180)")
    parser.add_argument("--quick", action="store_true", help="45 s of faults")
    parser.add_argument("--rate", type=float, default=300, help="events/s the producer aims at")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--ack-wait", type=float, default=None,
                        help="nats.ackWait in seconds (default: pgmeter's own default)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args(argv)
    duration = 45.0 if args.quick else args.duration
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-chaos-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    print(f"chaos: seed {args.seed}, {duration:.0f} s of faults, {args.rate:.0f} events/s, work dir {workdir}",
          flush=True)
    postgres = ServiceProcess("postmaster", services.start_postgres, workdir)
    broker = ServiceProcess("nats-server", services.start_nats, workdir)
    valkey = ServiceProcess("valkey", services.start_valkey, workdir)
    roles: list[Role] = []
    producer: Producer | None = None
    monitor: Monitor | None = None
    try:
        for service in (postgres, broker, valkey):
            service.start()
        migrate(postgres.url)
        nats_settings: dict[str, Any] = {"url": broker.url, "stream": "CHAOS", "subjectPrefix": "chaos.events",
                                         "consumer": "chaos-sink"}
        if args.ack_wait is not None:
            nats_settings["ackWait"] = timedelta(seconds=args.ack_wait)
        base = Settings(postgres={"url": postgres.url}, nats=nats_settings, valkey={"url": valkey.url},
                        meters=METERS, logLevel="warning")

        def role(name: str, kind: str) -> Role:
            return Role(base.model_copy(update={"address": f"127.0.0.1:{free_port()}"}), kind, workdir, name=name)

        api = role("api", "api")
        roles = [api, role("sink-1", "sink"), role("sink-2", "sink"), role("refresher", "refresher")]
        for process in roles:
            process.start()
        api_url = f"http://{api.settings.address}"
        targets: dict[str, list[Role | ServiceProcess]] = {
            "sink": [roles[1], roles[2]], "api": [api], "refresher": [roles[3]],
            "postmaster": [postgres], "nats-server": [broker], "valkey": [valkey]}

        producer = Producer(api_url, rate=args.rate, threads=4, batch=10, seed=args.seed)
        monitor = Monitor(postgres.url)
        producer.start()
        monitor.start()
        began = time.monotonic()
        time.sleep(min(5.0, duration / 6))  # steady state first
        kinds: list[str] = []
        while time.monotonic() - began < duration:
            if not kinds:  # every kind once per round, in random order
                kinds = list(FAULT_KINDS)
                rng.shuffle(kinds)
            kind = kinds.pop()
            target = rng.choice(targets[kind])
            acked_now = producer.snapshot()
            try:
                in_flight: int | None = missing(postgres.url, acked_now)
            except (psycopg.Error, OSError):
                in_flight = None
            fault = Fault(kind, target.name, time.monotonic(), acked_now, in_flight)
            target.kill()
            fault.outage = rng.uniform(0.2, 2.0)
            time.sleep(fault.outage)
            target.start()
            fault.ready_at = time.monotonic()
            monitor.faults.append(fault)
            print(f"  {fault.at - began:6.1f}s {kind:<11} {target.name:<10} down {fault.outage:.1f}s, "
                  f"ready after {fault.ready_at - fault.at:.1f}s; {fault.in_flight} events in flight at the strike",
                  flush=True)
            time.sleep(rng.uniform(1.0, 4.0))
        faults_ended = time.monotonic()

        producer.finish(timeout=60)
        stats = producer.stats
        acked = list(stats.acknowledged.values())
        drain_deadline = time.monotonic() + 180
        settled = False
        while time.monotonic() < drain_deadline:
            monitor.check()
            if (visible(postgres.url, producer.snapshot())
                    and consumer_idle(broker.url, base.nats.stream, base.nats.consumer)):
                settled = True
                break
            time.sleep(0.5)
        drained = time.monotonic() - faults_ended
        monitor.halt.set()
        monitor.join(5)
        monitor.check()

        with psycopg.connect(postgres.url) as conn:
            stored: Counter[str] = Counter(dict(conn.execute(
                "SELECT id, count(*) FROM events WHERE source = %s GROUP BY id", (SOURCE,)).fetchall()))
        lost = sum(1 for event_id in stats.acknowledged if event_id not in stored)
        doubled = sum(count - 1 for count in stored.values() if count > 1)
        extra = sum(1 for event_id in stored if event_id not in stats.acknowledged
                    and event_id not in stats.unconfirmed)

        hours = sorted(hour_of(event["time"]) for event in acked)
        start, end = hours[0], hours[-1] + timedelta(hours=1)
        want_calls, want_units = expected_cells(acked)
        wrong_calls = compare(query_cells(api_url, "chaos_calls", ["subject"], start, end), want_calls)
        wrong_units = compare(query_cells(api_url, "chaos_units", ["subject", "region"], start, end), want_units)

        faults = monitor.faults
        by_kind = Counter(f.kind for f in faults)
        recoveries = [f.recovery for f in faults if f.recovery is not None]
        slowest = max(faults, key=lambda f: f.recovery or 0.0) if faults else None
        rows = [
            ("duration (faults / drain after)", f"{faults_ended - began:.0f} s / {drained:.0f} s"),
            ("faults", f"{len(faults)}: " + ", ".join(f"{k} x{by_kind[k]}" for k in FAULT_KINDS if by_kind[k])),
            ("events acknowledged (distinct)", f"{len(stats.acknowledged):,}"),
            ("  re-sent ids acknowledged", f"{stats.resends_acked:,}"),
            ("  late events acknowledged", f"{stats.late_acked:,}"),
            ("  rate", f"{len(stats.acknowledged) / max(faults_ended - began, 1):.0f} events/s"),
            ("producer answers", ", ".join(f"{k} x{v}" for k, v in sorted(stats.statuses.items()))),
            ("lost", f"{lost}"),
            ("double-counted", f"{doubled}"),
            ("stored, never acknowledged", f"{extra} (+{len(stats.unconfirmed)} unconfirmed at the end)"),
            ("meter cells wrong", f"{wrong_calls} of {len(want_calls)} COUNT, {wrong_units} of {len(want_units)} SUM"),
            ("max recovery", (f"{slowest.recovery:.1f} s ({slowest.kind} {slowest.target})"
                              if slowest and slowest.recovery is not None else "n/a")),
            ("recovery by kind (max)", ", ".join(
                f"{k} {max(f.recovery or 0.0 for f in faults if f.kind == k):.1f}s" for k in FAULT_KINDS if by_kind[k])),
            ("faults never recovered", f"{len(faults) - len(recoveries)}"),
            ("faults striking events in flight", f"{sum(1 for f in faults if f.in_flight)} of {len(faults)} "
             f"(acknowledged, not yet stored; max {max((f.in_flight or 0 for f in faults), default=0)})"),
        ]
        width = max(len(name) for name, _ in rows)
        print("\n" + "\n".join(f"| {name:<{width}} | {value}" for name, value in rows))
        for error in stats.errors[:5]:
            print(f"unexpected answer: {error}")
        ok = (settled and lost == 0 and doubled == 0 and extra == 0 and wrong_calls == 0 and wrong_units == 0
              and not stats.errors)
        print("\nPASS" if ok else "\nFAIL (logs kept in the work directory)")
        if not ok:
            args.keep = True
        return 0 if ok else 1
    finally:
        if monitor is not None:
            monitor.halt.set()
        if producer is not None and not producer.stopping.is_set():
            producer.finish(timeout=1)
        for process in reversed(roles):
            process.stop()
        for service in (valkey, broker, postgres):
            service.stop()
        if not args.keep:
            services.remove_tree(workdir)
        else:
            print(f"work directory kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
