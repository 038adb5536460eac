"""Quota balances, check-and-reserve and the query cache on a real three-master Valkey cluster.

Every command pgmeter sends touches one key, so nothing needs two keys in one slot; this
checks that it holds in practice: the writer, the reader, the reservation script and
the rebuild after data loss all work through a cluster client whose keys land on
several masters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import valkey
from valkey.cluster import ValkeyCluster

from pgmeter.config import Settings
from pgmeter.quota import layout
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events
from tests.support.valkey_cluster import valkey_cluster

METER = {"slug": "api_calls", "aggregation": "SUM", "eventType": "api.call",
     "valueProperty": "$.n"}


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def test_quota_on_a_three_master_cluster(settings: Settings, tmp_path: Path) -> None:
    with valkey_cluster(tmp_path / "cluster") as ports:
        config = settings.valkey.model_copy(update={"url": f"redis://127.0.0.1:{ports[0]}", "cluster": True})
        built = settings.model_copy(update={"meters": [METER], "valkey": config})
        prefix = config.key_prefix
        vk = ValkeyCluster(host="127.0.0.1", port=ports[1])  # any node will do
        try:
            with AppServer(built, {"api", "sink"}) as server, server.client() as api:
                assert api.post("/api/v1/features", json={"key": "calls", "name": "calls",
                                                          "meterSlug": "api_calls"}).status_code == 201
                for i in range(6):
                    assert api.post("/api/v1/customers", json={"name": f"t{i}", "key": f"tpp-{i}"}).status_code == 201
                    assert api.post(f"/api/v2/customers/tpp-{i}/entitlements", json={
                        "type": "metered", "featureKey": "calls", "issueAfterReset": 5,
                        "usagePeriod": {"interval": "DAY"}}).status_code == 201
                keys = [layout.subject_key(prefix, "default", f"tpp-{i}", "calls") for i in range(6)]

                def quota(key: str) -> layout.Quota | None:
                    return layout.Quota.parse(vk.hgetall(key))

                wait_for(lambda: all((q := quota(k)) is not None and q.balance == 5 for k in keys))
                # The keys really are spread: hashes, the due set and the heartbeat on several masters.
                spread = {vk.get_node_from_key(k).name for k in [*keys, layout.due_key(prefix),
                                                                  layout.worker_key(prefix)]}
                assert len(spread) >= 2, spread
                wait_for(lambda: vk.exists(layout.worker_key(prefix)) == 1)

                # Check-and-reserve through the cluster client, then the event under that id: the
                # worker's write counts it and drops the hold.
                status, available = vk.eval(layout.RESERVE_SCRIPT, 1, keys[0], "ev-1", "2", "60000")
                assert (int(status), available) == (1, b"3")
                assert int(vk.eval(layout.RESERVE_SCRIPT, 1, keys[0], "ev-2", "4", "60000")[0]) == 0
                assert post_events(api, [make_event("ev-1", subject="tpp-0", data={"n": 2})]).status_code == 204
                wait_for(lambda: (q := quota(keys[0])) is not None and q.usage == 2)
                assert not [f for f in vk.hkeys(keys[0]) if f.startswith(b"r:")]
                value = api.get("/api/v1/subjects/tpp-0/entitlements/calls/value")
                assert value.headers["X-Pgmeter-Value-Source"] == "valkey" and value.json()["balance"] == 3

                # The query cache (single-key GET/SET) works on the cluster too.
                for _ in range(2):
                    assert api.get("/api/v1/meters/api_calls/query").status_code == 200

                # Every master loses its data: the worker rebuilds every hash.
                for port in ports:
                    with valkey.Valkey(host="127.0.0.1", port=port) as node:
                        node.flushall()
                wait_for(lambda: all(quota(k) is not None for k in keys))
                q0 = quota(keys[0])
                assert q0 is not None and q0.usage == 2 and q0.balance == 3
        finally:
            vk.close()


@pytest.mark.parametrize("flag", ["true", "false"])
def test_the_cluster_flag_is_configuration(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGMETER_VALKEY_CLUSTER", flag)
    assert Settings().valkey.cluster is (flag == "true")
