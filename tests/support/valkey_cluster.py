"""A real three-master Valkey cluster on loopback, from the valkey-server the tests already use.

Formed by hand (no valkey-cli): each node gets a third of the 16384 slots
(``CLUSTER ADDSLOTSRANGE``), the first meets the others (``CLUSTER MEET``, with each
node's own bus port, since port + 10000 can be taken or out of range), and the
cluster is ready when every node reports ``cluster_state:ok``. No replicas: the tests
exercise slot routing, not failover.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import valkey

from pgmeter.devstack import binaries
from pgmeter.devstack.process import ManagedProcess, wait_until
from tests.support.services import free_port

SLOTS = 16384


def _node(port: int) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=1)


def _answers(port: int) -> bool:
    try:
        with _node(port) as client:
            return bool(client.ping())
    except valkey.ConnectionError:
        return False


def _ok(ports: list[int]) -> bool:
    for port in ports:
        with _node(port) as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(ports)}" not in text:
                return False
    return True


@contextmanager
def valkey_cluster(directory: Path, masters: int = 3) -> Iterator[list[int]]:
    """Start ``masters`` cluster nodes and form them into one cluster; yields their ports."""
    ports = [free_port() for _ in range(masters)]
    # Each node's own bus port: the default (port + 10000) may be taken, or past 65535.
    buses = [free_port() for _ in range(masters)]
    processes = []
    try:
        for port, bus in zip(ports, buses, strict=True):
            data = directory / f"node-{port}"
            data.mkdir(parents=True, exist_ok=True)
            proc = ManagedProcess(f"valkey-cluster-{port}", [
                str(binaries.valkey_server()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--cluster-enabled", "yes",
                "--cluster-config-file", str(data / "nodes.conf"), "--cluster-node-timeout", "2000",
                "--cluster-port", str(bus)],
                log_path=data / "valkey.log")
            proc.start()
            processes.append(proc)
        for port, proc in zip(ports, processes, strict=True):
            wait_until(lambda port=port: _answers(port), timeout=30, what="valkey cluster node", process=proc)
        share = SLOTS // masters
        for i, port in enumerate(ports):
            last = SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1
            with _node(port) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        with _node(ports[0]) as client:
            for port, bus in zip(ports[1:], buses[1:], strict=True):
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        wait_until(lambda: _ok(ports), timeout=30, what="valkey cluster state ok")
        yield ports
    finally:
        for proc in processes:
            proc.stop()
