"""``pgmeter dev``: PostgreSQL, NATS and Valkey from wheels, data under one directory.

The directory (default ``.pgmeter/``) keeps the Postgres cluster and the JetStream
store across restarts. A lock file held with ``flock`` stops a second ``pgmeter
dev`` on the same directory; the kernel drops the lock when the process dies, so
a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pgmeter.devstack import services
from pgmeter.devstack.process import ManagedProcess, free_port

# Preferred ports, away from the standard ones so a system Postgres/NATS/Redis on
# this machine never collides; any free port is taken when one stays busy longer
# than PORT_WAIT seconds (a server that just stopped may hold it for a moment).
PREFERRED_PORTS = {"postgres": 55432, "nats": 54222, "valkey": 56379}
PORT_WAIT = 3.0


def _port(service: str) -> int:
    return free_port(PREFERRED_PORTS[service], wait=PORT_WAIT)


class StackError(RuntimeError):
    pass


@dataclass
class DevStack:
    data_dir: Path
    postgres_url: str = ""
    nats_url: str = ""
    valkey_url: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)
    _lock_fd: int | None = None

    def start(self) -> DevStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        logs = self.data_dir / "logs"
        try:
            pg, self.postgres_url = services.start_postgres(
                self.data_dir / "postgres", _port("postgres"), log_path=logs / "postgres.log")
            self.processes.append(pg)
            nats, self.nats_url = services.start_nats(
                self.data_dir / "nats", _port("nats"), log_path=logs / "nats.log")
            self.processes.append(nats)
            valkey, self.valkey_url = services.start_valkey(
                self.data_dir / "valkey", _port("valkey"), log_path=logs / "valkey.log")
            self.processes.append(valkey)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Reverse order: nothing talks to Postgres once NATS and Valkey are gone.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.data_dir / "dev.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StackError(f"another `pgmeter dev` is using {self.data_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
