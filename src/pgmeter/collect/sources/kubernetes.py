"""Kubernetes source: pod execution time, as OpenMeter's collector meters it.

At every scheduled instant (:mod:`pgmeter.collect.sources.ticks`: each multiple of
``interval`` since the epoch) the running pods are listed from the API server and each
becomes one record with the seconds it ran in the interval ending at that instant:
``min(interval, instant - startTime)``. The id is derived from (pod UID, instant), so
replicas, and a replica that lists an instant again after a crash, produce the same
events and the endpoint counts each pod once per interval - OpenMeter's collector
needs leader election for that, and gives each event a random id.

After a restart the missed instants are caught up (at most ``maxCatchUp``) for the pods
running now that had started by then; a pod that ended while the collector was down
is not seen, as with any scrape. A pod that ends between two instants loses its last
partial interval, as OpenMeter's does.

Lists are paginated as Kubernetes clients do it: ``limit`` and the ``continue`` token
of each page, all pages of one list from the same snapshot; a 410 Gone (the token's
snapshot was compacted) starts the list again. Plain HTTP and JSON through httpx,
with the service account's bearer token and CA in a cluster - no Kubernetes client
library is needed for one paginated GET.

The record a mapping sees, per pod: ``{"name", "namespace", "uid", "labels",
"annotations", "nodeName", "phase", "startTime", "time" (RFC 3339 instant),
"timestamp" (seconds), "seconds"}``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from pgmeter.collect.ids import event_id
from pgmeter.collect.mapping import rfc3339
from pgmeter.collect.pipeline import Pipeline
from pgmeter.collect.sources.ticks import Ticks
from pgmeter.config import CollectSourceConfig

log = logging.getLogger("pgmeter.collect.kubernetes")

IN_CLUSTER = "https://kubernetes.default.svc"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_RESTARTS = 3  # lists started again after 410 Gone, before this instant is retried later


class ListFailed(Exception):
    pass


class KubernetesSource:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.url = (config.url or IN_CLUSTER).rstrip("/")
        self.token_file = Path(config.token_file) if config.token_file else \
            (SERVICE_ACCOUNT / "token" if not config.url else None)
        ca = config.ca_file or (str(SERVICE_ACCOUNT / "ca.crt") if not config.url else None)
        self.verify: str | bool = ca or True
        self.interval_s = config.interval.total_seconds()
        self.ticks = Ticks(self.interval_s, config.offset.total_seconds(), config.max_catch_up)
        self.state_key = "kubernetes:pods"

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30, verify=self.verify) as client:
            while True:
                try:
                    await self.catch_up(client)
                except (httpx.HTTPError, ListFailed) as exc:
                    log.warning("kubernetes list failed; retrying", extra={"pipeline": self.pipeline.name,
                                                                           "error": str(exc)})
                await self.ticks.sleep()

    async def catch_up(self, client: httpx.AsyncClient) -> None:
        saved = await asyncio.to_thread(self.pipeline.buffer.get_state, self.state_key)
        instants, skipped = self.ticks.pending(None if saved is None else int(saved))
        if skipped:
            log.warning("instants skipped: down longer than maxCatchUp intervals",
                        extra={"pipeline": self.pipeline.name, "skipped": skipped})
        pods = await self.running_pods(client)
        for instant in instants:
            records = []
            for pod in pods:
                record = self.record(pod, instant)
                if record is not None:
                    records.append((record, event_id(self.pipeline.event_source, "kubernetes", record["uid"], instant)))
            await self.pipeline.offer(self.pipeline.map(records), {self.state_key: str(instant)}, block=True)

    def record(self, pod: dict[str, Any], instant_ms: int) -> dict[str, Any] | None:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        started = status.get("startTime")
        if status.get("phase") != "Running" or not started or not meta.get("uid"):
            return None
        ran = datetime.fromtimestamp(instant_ms / 1000, UTC) - datetime.fromisoformat(started.replace("Z", "+00:00"))
        seconds = min(self.interval_s, ran.total_seconds())
        if seconds <= 0:  # started after this instant
            return None
        return {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta["uid"],
                "labels": meta.get("labels", {}), "annotations": meta.get("annotations", {}),
                "nodeName": pod.get("spec", {}).get("nodeName"), "phase": status["phase"], "startTime": started,
                "time": rfc3339(instant_ms * 1000), "timestamp": instant_ms / 1000,
                "seconds": int(seconds) if float(seconds).is_integer() else seconds}

    async def running_pods(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        paths = [f"/api/v1/namespaces/{ns}/pods" for ns in self.config.namespaces] or ["/api/v1/pods"]
        pods: list[dict[str, Any]] = []
        for path in paths:
            pods.extend(await self._list(client, path))
        return pods

    async def _list(self, client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
        headers = {"accept": "application/json"}
        if self.token_file is not None:  # read each time: projected tokens are rotated
            headers["authorization"] = f"Bearer {(await asyncio.to_thread(self.token_file.read_text)).strip()}"
        for _ in range(MAX_RESTARTS):
            items: list[dict[str, Any]] = []
            params: dict[str, Any] = {"limit": self.config.batch, "fieldSelector": "status.phase=Running"}
            if self.config.label_selector:
                params["labelSelector"] = self.config.label_selector
            while True:
                response = await client.get(self.url + path, params=params, headers=headers)
                if response.status_code == 410:  # the snapshot behind `continue` is gone
                    break
                if response.status_code != 200:
                    raise ListFailed(f"GET {path}: HTTP {response.status_code}: {response.text[:200]}")
                body = response.json()
                items.extend(body.get("items") or [])
                token = (body.get("metadata") or {}).get("continue")
                if not token:
                    return items
                params["continue"] = token
        raise ListFailed(f"GET {path}: the list expired {MAX_RESTARTS} times in a row")
