"""``pgmeter dev``: comes up, keeps its data, and leaves nothing running when stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import yaml

from pgmeter.devstack.process import free_port
from tests.support.app import wait_ready


class Dev:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGMETER_")}
        env["PGMETER_ADDRESS"] = f"127.0.0.1:{self.port}"
        self.log = log
        started = time.monotonic()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgmeter", "dev", "--data-dir", str(data_dir)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_dir.parent,
            )
        self.wait_ready()
        self.startup_seconds = time.monotonic() - started
        self.children = psutil.Process(self.process.pid).children(recursive=True)

    def wait_ready(self) -> None:
        wait_ready(self.process, f"http://127.0.0.1:{self.port}", self.log, 60)

    def url(self, name: str) -> str:
        match = re.search(rf"^\s+{name}\s+(\S+)", self.log.read_text(), re.MULTILINE)
        assert match, self.log.read_text()
        return match.group(1)

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(30)


def assert_all_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 10
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


def test_dev_starts_stops_cleanly_and_keeps_data(server_dir: Path) -> None:
    """Ctrl-C (SIGINT) stops the first run, SIGTERM (Kubernetes, systemd) the restart:
    both stop cleanly, and the restart finds the first run's data."""
    data_dir = server_dir / ".pgmeter"
    first = Dev(data_dir, server_dir / "first.log")
    print(f"pgmeter dev ready in {first.startup_seconds:.1f} s")
    names = {p.name() for p in first.children}
    assert {"postgres", "nats-server", "valkey-server"} <= names, names
    api = first.url("api")
    assert api == f"http://127.0.0.1:{first.port}/api/v1"  # the banner names the address it serves
    # It answers there, with the example meters pgmeter dev configures.
    example = yaml.safe_load(resources.files("pgmeter.devstack").joinpath("example.yaml").read_text())
    meters = httpx.get(f"{api}/meters", timeout=10).json()
    assert sorted(m["slug"] for m in meters) == sorted(m["slug"] for m in example["meters"])
    with psycopg.connect(first.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('survives a restart')")
    assert first.stop(signal.SIGINT) == 0
    assert_all_gone(first.children)

    second = Dev(data_dir, server_dir / "second.log")
    with psycopg.connect(second.url("postgres")) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("survives a restart",)]
    assert second.stop(signal.SIGTERM) == 0
    assert_all_gone(second.children)


def test_dev_killed_hard_leaves_no_orphans_and_restarts(server_dir: Path) -> None:
    data_dir = server_dir / ".pgmeter"
    first = Dev(data_dir, server_dir / "first.log")
    first.process.kill()
    first.process.wait(10)
    assert_all_gone(first.children)
    # No stale lock or pid file blocks the next start.
    second = Dev(data_dir, server_dir / "second.log")
    assert second.stop(signal.SIGINT) == 0
    assert_all_gone(second.children)


def test_second_dev_on_same_directory_is_refused(server_dir: Path) -> None:
    data_dir = server_dir / ".pgmeter"
    first = Dev(data_dir, server_dir / "first.log")
    try:
        result = subprocess.run([sys.executable, "-m", "pgmeter", "dev", "--data-dir", str(data_dir)],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PGMETER_ADDRESS": f"127.0.0.1:{free_port()}"})
        assert result.returncode == 1
        assert "another `pgmeter dev` is using" in result.stderr
    finally:
        assert first.stop(signal.SIGINT) == 0
    assert_all_gone(first.children)


@pytest.mark.parametrize("command", [["dev", "--data-dir", "{dir}/data"], ["sink"]])
def test_a_taken_port_fails_at_once_with_one_line_and_nothing_left(server_dir: Path, command: list[str]) -> None:
    """Once, a taken port left `pgmeter dev` saying "up", then ignoring Ctrl-C for minutes."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGMETER_")}
        env["PGMETER_ADDRESS"] = f"127.0.0.1:{port}"
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pgmeter", *(part.format(dir=server_dir) for part in command)],
                                capture_output=True, text=True, env=env, cwd=server_dir, timeout=60)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"pgmeter: cannot listen on 127.0.0.1:{port}: Address already in use (another pgmeter, or set PGMETER_ADDRESS)"]
    assert "is up" not in result.stdout
    assert elapsed < 20, elapsed
    # Nothing was started: no embedded server holds the data directory.
    assert not (server_dir / "data" / "postgres").exists()
