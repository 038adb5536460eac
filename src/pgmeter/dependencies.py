"""The state of each dependency (Postgres, NATS, Valkey), logged once per change.

An outage is an expected condition, not a bug: during one, every request that needs
the dependency fails the same way, and a line per failure (or a traceback per
reconnect attempt) buries everything else. So each dependency has a state: the
first failure logs one WARNING ("nats: disconnected"), the way back logs one INFO
("nats: available again after 4.1 s"), and every failure in between is only
counted in ``pgmeter_dependency_errors_total{dependency}``.

Something has to notice the way back. NATS says so itself (its reconnect callback)
and every acknowledged publish proves it; for Postgres, a dependency given a
``probe`` checks it once a second while it is down, so recovery is logged even when
no request comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

log = logging.getLogger("pgmeter.dependencies")

DEPENDENCY_ERRORS = Counter(
    "pgmeter_dependency_errors", "Failures talking to a dependency: requests refused with 503, "
    "failed readiness checks, client errors and reconnect attempts", ["dependency"])
DEPENDENCY_UP = Gauge(
    "pgmeter_dependency_up", "1 while the dependency answers, 0 from its first failure until it answers again",
    ["dependency"])

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0
# A dependency that fails again this soon after recovering is flapping: the new
# outage and its end are logged at DEBUG (and counted), so flapping cannot flood the log.
FLAP_QUIET = 30.0


def describe(exc: BaseException) -> str:
    """What went wrong, in words that never carry an address or a credential.

    Exception texts of connection errors name hosts and ports
    ("Connect call failed ('10.0.3.7', 5432)"), so only the kind is kept.
    """
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "connection lost"
    if isinstance(exc, OSError):
        return "network error"
    name = type(exc).__name__  # e.g. the Valkey client's own TimeoutError and ConnectionError
    if name.endswith("TimeoutError"):
        return "timed out"
    if name.endswith("ConnectionError"):
        return "connection failed"
    if type(exc).__module__.startswith("nats") and name in ("Error", "NoServersError"):
        return "server unreachable"  # nats-py raises its bare base class when no server answers
    return name


class Dependency:
    """One dependency's up/down state for one process."""

    def __init__(self, name: str, probe: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.probe = probe
        self.down_since: float | None = None
        self.closed = False  # the process is shutting down: its own disconnects are no outage
        self._recovered_at = -FLAP_QUIET
        self._level = logging.WARNING  # of the current outage's lines
        self._watcher: asyncio.Task[None] | None = None
        DEPENDENCY_UP.labels(name).set(1)
        DEPENDENCY_ERRORS.labels(name)  # the series exists (at 0) before the first failure

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, reason: str) -> None:
        """Count a failure; log it only if the dependency was up until now."""
        if self.closed:
            return
        DEPENDENCY_ERRORS.labels(self.name).inc()
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        DEPENDENCY_UP.labels(self.name).set(0)
        flapping = self.down_since - self._recovered_at < FLAP_QUIET
        self._level = logging.DEBUG if flapping else logging.WARNING
        log.log(self._level, "%s: %s", self.name, reason, extra={"dependency": self.name})
        if self.probe is not None and (self._watcher is None or self._watcher.done()):
            try:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())
            except RuntimeError:  # no loop (a synchronous caller): the next success recovers it
                pass

    def recovered(self) -> None:
        """The dependency answered: log the way back if it was down."""
        if self.down_since is None:
            return
        self._recovered_at = time.monotonic()
        took = self._recovered_at - self.down_since
        self.down_since = None
        DEPENDENCY_UP.labels(self.name).set(1)
        log.log(logging.INFO if self._level > logging.DEBUG else logging.DEBUG,
                "%s: available again after %.1f s", self.name, took,
                extra={"dependency": self.name, "outage_seconds": round(took, 1)})

    async def _watch(self) -> None:
        assert self.probe is not None
        while self.down_since is not None:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(self.probe(), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception:
                DEPENDENCY_ERRORS.labels(self.name).inc()
                continue
            self.recovered()

    def close(self) -> None:
        self.closed = True
        if self._watcher is not None:
            self._watcher.cancel()
