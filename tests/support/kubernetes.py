"""A Kubernetes API server for pods, following the list semantics clients rely on:

- ``GET /api/v1/pods`` and ``/api/v1/namespaces/{ns}/pods``, items ordered by
  namespace/name, ``metadata.resourceVersion`` on the list;
- ``limit`` and ``continue``: every page of one list comes from the snapshot (the
  resourceVersion) of its first page, whatever changed since; a token whose snapshot
  was compacted answers 410 Gone with a ``Status`` (reason ``Expired``), as etcd
  compaction makes a real server do;
- ``labelSelector`` (``k=v`` terms, comma-separated) and ``fieldSelector``
  ``status.phase=...``;
- a bearer token, 401 ``Status`` without it.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.devstack.process import free_port
from tests.support.app import ThreadedServer


class KubernetesApi:
    def __init__(self, token: str) -> None:
        self.token = token
        self.version = 1
        self.snapshots: dict[int, list[dict[str, Any]]] = {1: []}
        self.compacted_before = 0  # snapshots older than this are gone
        self.expire_next_list = False  # compact right after the next first page is served
        self.lists: list[tuple[str, str, int]] = []  # (path, query, status)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedServer(Starlette(routes=[
            Route("/api/v1/pods", self._pods), Route("/api/v1/namespaces/{namespace}/pods", self._pods)]),
            "127.0.0.1", self.port)

    def set_pods(self, pods: list[dict[str, Any]]) -> None:
        """A new state of the cluster (a new resourceVersion)."""
        self.version += 1
        self.snapshots[self.version] = sorted(copy.deepcopy(pods), key=lambda p: (
            p["metadata"]["namespace"], p["metadata"]["name"]))

    def compact(self) -> None:
        self.compacted_before = self.version

    def __enter__(self) -> KubernetesApi:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    async def _pods(self, request: Request) -> Response:
        response = self._answer(request)
        self.lists.append((request.url.path, request.url.query, response.status_code))
        return response

    def _answer(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        q = request.query_params
        token = q.get("continue")
        if token:
            state = json.loads(base64.b64decode(token))
            version, after = state["rv"], state["start"]
            if version < self.compacted_before:
                return _status(410, "Expired", "The provided continue parameter is too old to display a "
                                               "consistent list result.")
        else:
            version, after = self.version, ""
        namespace = request.path_params.get("namespace")
        items = [p for p in self.snapshots[version]
                 if (namespace is None or p["metadata"]["namespace"] == namespace)
                 and _matches(p, q.get("labelSelector"), q.get("fieldSelector"))
                 and f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}' > after]
        limit = int(q.get("limit") or 0) or len(items) or 1
        page, more = items[:limit], len(items) > limit
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if more:
            last = page[-1]["metadata"]
            metadata["continue"] = base64.b64encode(json.dumps(
                {"rv": version, "start": f'{last["namespace"]}/{last["name"]}'}).encode()).decode()
            metadata["remainingItemCount"] = len(items) - limit
        if not token and more and self.expire_next_list:  # the cluster moves on and etcd compacts
            self.expire_next_list = False
            self.set_pods(self.snapshots[version])
            self.compact()
        return JSONResponse({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": page})


def _matches(pod: dict[str, Any], labels: str | None, fields: str | None) -> bool:
    for term in filter(None, (labels or "").split(",")):
        key, _, value = term.partition("=")
        if pod["metadata"].get("labels", {}).get(key) != value:
            return False
    for term in filter(None, (fields or "").split(",")):
        key, _, value = term.partition("=")
        if key != "status.phase" or pod.get("status", {}).get("phase") != value:
            return False
    return True


def _status(code: int, reason: str, message: str) -> Response:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code}, status_code=code)
