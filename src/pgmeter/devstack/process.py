"""A child server process that dies with us and stops cleanly.

The embedded servers are children of ``pgmeter dev`` (or of the test session).
Each is started in its own process group with a parent-death signal, so even a
``kill -9`` of the parent leaves no orphan behind, and each is stopped with the
signal its server treats as "shut down fast but cleanly".
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        os.setpgrp()  # Ctrl-C in the terminal goes to us; we stop children in order.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        stop_signal: int = signal.SIGTERM,
        user: int | None = None,
        group: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.user = user
        self.group = group
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(self.stop_signal),
                user=self.user,
                group=self.group,
                env=self.env,
                close_fds=True,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running():
            return
        assert self.process is not None
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(5)


def free_port(preferred: int = 0, host: str = "127.0.0.1", *, wait: float = 0) -> int:
    """``preferred`` if it is free (waiting up to ``wait`` seconds for it), otherwise any free port.

    The wait matters on a quick restart: a server that just stopped can hold its port
    for a moment, and a saved psql URL should keep working across ``make run``s.
    """
    deadline = time.monotonic() + wait
    while preferred:
        if _bindable(host, preferred):
            return preferred
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            raise RuntimeError("no free TCP port") from None
        return int(sock.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.running():
            raise RuntimeError(f"{what} exited during start-up:\n{process.log_tail()}")
        try:
            if check():
                return
        except Exception:  # not ready yet; any failure means "try again"
            pass
        time.sleep(0.05)
    tail = process.log_tail() if process else ""
    raise RuntimeError(f"{what} was not ready after {timeout:.0f}s\n{tail}")


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
