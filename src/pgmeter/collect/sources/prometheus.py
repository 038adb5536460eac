"""Prometheus source: instant queries on a schedule, one event per series.

Every query is evaluated at each multiple of ``interval`` since the Unix epoch (the
*instant*), once the wall clock is ``offset`` past it, so samples scraped late are in.
Instants are the same on every replica and across restarts, and the event id is
derived from (query name, instant, the series' labels): two replicas, or a replica
that evaluates an instant again after a crash, deliver the same ids and pgmeter counts
each series once per instant - without OpenMeter's leader election, whose failover can
emit a window twice or lose one.

The last instant queued is committed with its events; after a restart the missed
instants are evaluated in order (at most ``maxCatchUp`` of them), so a collector that
was down loses no window Prometheus still has. A first start begins at the latest due
instant, not at the beginning of history.

The record a mapping sees, per series:
``{"name", "query", "time" (RFC 3339 instant), "timestamp" (seconds), "metric"
(labels), "value" (a number, or the text Prometheus sent for NaN/Inf)}``.
As OpenMeter's docs warn: a range in the PromQL (``increase(x[1m])``) must equal the
interval, or windows overlap or leave gaps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import httpx

from pgmeter.collect.ids import content_hash, event_id
from pgmeter.collect.mapping import rfc3339
from pgmeter.collect.pipeline import Pipeline
from pgmeter.collect.sources.ticks import Ticks
from pgmeter.config import CollectSourceConfig, ConfigError

log = logging.getLogger("pgmeter.collect.prometheus")


class QueryFailed(Exception):
    pass


class PrometheusSource:
    def __init__(self, pipeline: Pipeline, config: CollectSourceConfig) -> None:
        if not (config.url and config.queries):
            raise ConfigError(f"pipeline {pipeline.name}: a prometheus source needs url and queries")
        self.pipeline = pipeline
        self.config = config
        self.url = config.url.rstrip("/") + "/api/v1/query"
        self.ticks = Ticks(config.interval.total_seconds(), config.offset.total_seconds(), config.max_catch_up)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                for name, promql in self.config.queries.items():
                    try:
                        await self.catch_up(client, name, promql)
                    except (httpx.HTTPError, QueryFailed) as exc:
                        log.warning("prometheus query failed; retrying", extra={
                            "pipeline": self.pipeline.name, "query": name, "error": str(exc)})
                await self.ticks.sleep()

    async def catch_up(self, client: httpx.AsyncClient, name: str, promql: str) -> None:
        key = f"prometheus:{name}"
        saved = await asyncio.to_thread(self.pipeline.buffer.get_state, key)
        instants, skipped = self.ticks.pending(None if saved is None else int(saved))
        if skipped:
            log.warning("instants skipped: down longer than maxCatchUp intervals", extra={
                "pipeline": self.pipeline.name, "query": name, "skipped": skipped})
        for instant in instants:
            series = await self.query(client, promql, instant)
            records = []
            for metric, value in series:
                record = {"name": name, "query": promql, "time": rfc3339(instant * 1000),
                          "timestamp": instant / 1000, "metric": metric, "value": value}
                records.append((record, event_id(self.pipeline.event_source, "prometheus", name, instant,
                                                 content_hash(metric))))
            await self.pipeline.offer(self.pipeline.map(records), {key: str(instant)}, block=True)

    async def query(self, client: httpx.AsyncClient, promql: str, instant_ms: int) -> list[tuple[dict[str, str], Any]]:
        response = await client.get(self.url, params={"query": promql, "time": f"{instant_ms / 1000:.3f}"})
        try:
            body = response.json()
        except json.JSONDecodeError:
            raise QueryFailed(f"HTTP {response.status_code}: not JSON") from None
        if response.status_code != 200 or body.get("status") != "success":
            raise QueryFailed(f"HTTP {response.status_code}: {body.get('error', body)}")
        data = body["data"]
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [(item["metric"], _number(item["value"][1])) for item in result]
        if kind == "scalar":
            return [({}, _number(result[1]))]
        raise QueryFailed(f"an instant query must return a vector or a scalar, not {kind}")


def _number(text: str) -> Any:
    value = float(text)
    if math.isfinite(value):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    return text
