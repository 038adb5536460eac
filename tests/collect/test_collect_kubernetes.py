"""Kubernetes source: running pods' seconds per interval, against an API server that
paginates, snapshots and expires lists as Kubernetes does."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgmeter.collect.ids import event_id
from tests.support.collect import CollectorServer, RecordingEndpoint, collector_config, wait_for
from tests.support.kubernetes import KubernetesApi

TOKEN = "service-account-token-0123456789"
INTERVAL = 0.2
MAPPING = '{type: "pod.seconds", subject: (.labels.tpp // .namespace), time: .time, data: {seconds: .seconds, pod: .name}}'


def pod(namespace: str, name: str, started: datetime, phase: str = "Running", tpp: str | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}",
                         "labels": {"tpp": tpp} if tpp else {}},
            "spec": {"nodeName": "node-1"},
            "status": {"phase": phase, "startTime": started.isoformat().replace("+00:00", "Z")}}


def test_running_pods_are_metered_once_per_interval_across_pages_expiry_replicas_and_a_restart(
        tmp_path: Path) -> None:
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    pods = [pod("bank-a", "gw-1", long_ago, tpp="tpp-1"), pod("bank-a", "gw-2", long_ago, tpp="tpp-2"),
            pod("bank-a", "batch-1", long_ago), pod("bank-a", "gw-3", long_ago, phase="Pending"),
            pod("kube-system", "dns", long_ago)]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with KubernetesApi(TOKEN) as api, RecordingEndpoint(lambda b: (204, {}, b"")) as endpoint, \
            RecordingEndpoint(lambda b: (204, {}, b"")) as replica_endpoint:
        api.set_pods(pods)

        def config(buffer: str, url: str) -> Any:
            return collector_config(tmp_path / buffer, [{
                "name": "pods", "eventSource": "k8s-prod", "mapping": MAPPING,
                "source": {"type": "kubernetes", "url": api.url, "tokenFile": str(token_file),
                           "namespaces": ["bank-a"], "interval": f"{INTERVAL}s", "batch": 1},
                "to": {"url": url, "linger": "10ms"}}])

        with CollectorServer(config("buf", endpoint.url)), CollectorServer(config("replica", replica_endpoint.url)):
            wait_for(lambda: len(endpoint.accepted) >= 9, what="three instants")
            api.expire_next_list = True  # the next list's second page answers 410 Gone
            started = datetime.now(UTC)
            pods.append(pod("bank-a", "gw-4", started, tpp="tpp-1"))
            api.set_pods(pods)
            wait_for(lambda: any(e["data"]["pod"] == "gw-4" for e in endpoint.accepted), what="the new pod")
        stopped = len(endpoint.accepted)
        time.sleep(3 * INTERVAL)  # the collector is down for a few instants
        with CollectorServer(config("buf", endpoint.url)):
            wait_for(lambda: len(endpoint.accepted) >= stopped + 15, what="caught up and going on")
    assert any(status == 410 for _, _, status in api.lists)  # the expired list was started again
    assert any("continue=" in query for _, query, status in api.lists if status == 200)  # pages followed
    starts = {p["metadata"]["name"]: datetime.fromisoformat(p["status"]["startTime"]) for p in pods}
    by_pod: dict[str, list[int]] = defaultdict(list)
    for event in endpoint.accepted:
        name = event["data"]["pod"]
        instant = datetime.fromisoformat(event["time"])
        instant_ms = int(instant.timestamp() * 1000)
        # The oracle: seconds run in the interval ending at the instant.
        expected = min(INTERVAL, (instant - starts[name]).total_seconds())
        assert abs(event["data"]["seconds"] - expected) < 1e-9, (name, event)
        assert event["id"] == event_id("k8s-prod", "kubernetes", f"uid-bank-a-{name}", instant_ms)
        assert event["subject"] == {"gw-1": "tpp-1", "gw-2": "tpp-2", "gw-4": "tpp-1", "batch-1": "bank-a"}[name]
        by_pod[name].append(instant_ms)
    assert set(by_pod) == {"gw-1", "gw-2", "batch-1", "gw-4"}  # running, in the namespace
    step = int(INTERVAL * 1000)
    for name, instants in by_pod.items():
        # Once per instant, and no instant missing - the restart caught up the ones it was down for.
        assert instants == list(range(instants[0], instants[-1] + step, step)), name
    # The replica produced the same events for the instants both saw.
    mine = {e["id"]: e for e in endpoint.accepted}
    shared = [e for e in replica_endpoint.accepted if e["id"] in mine]
    assert len(shared) >= 3 and all(mine[e["id"]] == e for e in shared)
