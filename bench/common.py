"""Shared benchmark plumbing: embedded services, pgmeter roles as processes, an HTTP load generator.

Everything runs on the local machine, client and servers sharing its cores, so
every result is reported next to a baseline measured in the same run.

The load generator is deliberately lean (raw asyncio protocol, pre-built request
bytes, keep-alive connections, several processes): on a small machine a heavy
client would measure itself instead of the server.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from pgmeter.config import Settings
from pgmeter.devstack import services
from pgmeter.devstack.process import ManagedProcess, free_port


@dataclass
class Services:
    workdir: Path
    postgres_url: str
    nats_url: str
    processes: list[ManagedProcess] = field(default_factory=list)


@contextmanager
def embedded_services(keep: bool = False) -> Iterator[Services]:
    """PostgreSQL and NATS (JetStream) from the dev wheels, in a temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix="pgmeter-bench-", dir=os.environ.get("TMPDIR", "/tmp")))
    workdir.chmod(0o755)
    started: list[ManagedProcess] = []
    try:
        pg, pg_url = services.start_postgres(workdir / "postgres", free_port(), log_path=workdir / "postgres.log")
        started.append(pg)
        nats_proc, nats_url = services.start_nats(workdir / "nats", free_port(), log_path=workdir / "nats.log")
        started.append(nats_proc)
        yield Services(workdir, pg_url, nats_url, started)
    finally:
        for proc in reversed(started):
            proc.stop()
        if not keep:
            services.remove_tree(workdir)


class Role:
    """``python -m pgmeter --config <file> <role>`` as a child process, restartable with
    the same config and port. ``name`` (default: the role) names its files, for several
    processes of one role."""

    def __init__(self, settings: Settings, role: str, workdir: Path, name: str | None = None) -> None:
        self.settings = settings
        self.role = role
        self.name = name or role
        self.config = workdir / f"{self.name}.yaml"
        self.config.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
        self.log = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.address}"

    def start(self, timeout: float = 90) -> Role:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGMETER_")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pgmeter", "--config", str(self.config), self.role],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_http(f"{self.url}/readyz", timeout, self.process, self.log)
        return self

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.name} is not running"
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid) if self.process else 0.0

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"{url}: process exited\n{tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class CpuMeter:
    """CPU seconds used by named process trees between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.trees = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.before: dict[str, float] = {}
        self.wall = 0.0
        self.total_before = 0.0

    def _sample(self) -> dict[str, float]:
        import psutil

        used: dict[str, float] = {}
        for name, root in self.trees.items():
            seconds = 0.0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        times = proc.cpu_times()
                        seconds += times.user + times.system
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            used[name] = seconds
        return used

    def start(self) -> None:
        import psutil

        self.before = self._sample()
        times = psutil.cpu_times()
        self.total_before = times.user + times.system + times.nice + times.irq + times.softirq
        self.wall = time.monotonic()

    def stop(self) -> str:
        import psutil

        after = self._sample()
        times = psutil.cpu_times()
        total = times.user + times.system + times.nice + times.irq + times.softirq - self.total_before
        wall = time.monotonic() - self.wall
        parts = [f"{name} {after[name] - self.before.get(name, 0.0):.1f}s" for name in self.trees]
        return f"cpu over {wall:.1f}s wall: " + ", ".join(parts) + f", whole machine {total:.1f}s"


def histogram_buckets(metrics_text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of an unlabelled Prometheus histogram: {upper bound: count}."""
    buckets: dict[float, float] = {}
    for match in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', metrics_text, re.MULTILINE):
        buckets[float("inf") if match[1] == "+Inf" else float(match[1])] = float(match[2])
    return buckets


def histogram_quantile(buckets_or_text: dict[float, float] | str, quantile: float, name: str = "") -> float | None:
    """Approximate a quantile from cumulative buckets (linear within the bucket).

    Pass the text of /metrics and the histogram's ``name``, or buckets already read
    (e.g. the difference of two scrapes, to get one phase of a run).
    """
    counts = (histogram_buckets(buckets_or_text, name) if isinstance(buckets_or_text, str)
              else buckets_or_text)
    buckets = sorted(counts.items())
    if not buckets or buckets[-1][1] == 0:
        return None
    target = quantile * buckets[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if bound == float("inf"):
                return previous_bound
            share = (target - previous_count) / (count - previous_count) if count > previous_count else 1.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return None


# -- HTTP load generator -------------------------------------------------------------------


def http_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending the next request as soon as the last is answered."""

    def __init__(self, next_request: Callable[[], bytes | None], statuses: dict[int, int],
                 latencies: list[float], done: asyncio.Future[None]) -> None:
        self.next_request = next_request
        self.statuses = statuses
        self.latencies = latencies
        self.done = done
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        request = self.next_request()
        if request is None:
            assert self.transport is not None
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            marker = buffer.find(b"content-length:", 0, end)
            if marker < 0:
                marker = buffer.find(b"Content-Length:", 0, end)
            if marker >= 0:
                line_end = buffer.find(b"\r\n", marker, end + 2)
                length = int(buffer[marker + 15:line_end])
            total = end + 4 + length
            if len(buffer) < total:
                return
            status = int(buffer[9:12])
            del buffer[:total]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.latencies.append(time.perf_counter() - self.sent_at)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _client_process(host: str, port: int, connections: int, make: Callable[[int, int], bytes | None],
                    worker: int, start: mp.synchronize.Event, stop_at: mp.sharedctypes.Synchronized,
                    results: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        loop = asyncio.get_running_loop()
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        counter = 0
        start.wait()
        deadline = float(stop_at.value)
        begun = time.time()

        def next_request() -> bytes | None:
            nonlocal counter
            if deadline and time.time() >= deadline:
                return None
            request = make(worker, counter)
            counter += 1
            return request

        futures = []
        for _ in range(connections):
            done: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(lambda d=done: _Connection(next_request, statuses, latencies, d), host, port)
            futures.append(done)
        await asyncio.gather(*futures)
        results.put((worker, begun, time.time(), statuses, latencies))

    asyncio.run(run())


@dataclass
class LoadResult:
    seconds: float
    statuses: dict[int, int]
    latencies: list[float]

    @property
    def ok(self) -> int:
        return sum(count for status, count in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def latency(self, quantile: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


def run_load(host: str, port: int, make: Callable[[int, int], bytes | None], *, processes: int,
             connections: int, duration: float | None = None, on_start: Callable[[], None] | None = None
             ) -> LoadResult:
    """Run ``processes`` client processes with ``connections`` each.

    ``make(worker, n)`` returns the n-th request of a worker, or ``None`` when that
    connection has nothing more to send. With ``duration``, clients stop after it.
    """
    ctx = mp.get_context("fork")
    start = ctx.Event()
    stop_at = ctx.Value("d", 0.0)
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = [ctx.Process(target=_client_process,
                           args=(host, port, connections, make, worker, start, stop_at, results), daemon=True)
               for worker in range(processes)]
    for process in workers:
        process.start()
    time.sleep(0.3)  # let every client import and reach the start line
    if duration:
        stop_at.value = time.time() + duration + 0.05
    if on_start:
        on_start()
    start.set()
    collected = [results.get(timeout=600) for _ in workers]
    for process in workers:
        process.join(30)
    begun = min(result[1] for result in collected)
    ended = max(result[2] for result in collected)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    for _, _, _, counts, lat in collected:
        for status, count in counts.items():
            statuses[status] = statuses.get(status, 0) + count
        latencies.extend(lat)
    return LoadResult(ended - begun, statuses, latencies)
