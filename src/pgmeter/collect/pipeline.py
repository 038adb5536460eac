"""One pipeline: source -> mapping -> disk buffer -> delivery.

Sources call :meth:`Pipeline.offer` with their records and the position they reach.
What happens when the buffer is full is the source's choice (``block``): pull sources
(SQL, file, Prometheus) wait and try again, keeping their position, so nothing is
skipped; push sources (HTTP, OTLP) get :class:`BufferFull` and answer 503 with
Retry-After, so the producer keeps the events and retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from pgmeter.collect import metrics
from pgmeter.collect.buffer import Buffer, BufferFull
from pgmeter.collect.delivery import Delivery
from pgmeter.collect.mapping import Mapped, Mapping
from pgmeter.config import PipelineConfig
from pgmeter.ingest.limits import EventLimits

log = logging.getLogger("pgmeter.collect")

FULL_RETRY_SECONDS = 1.0
TOKEN_ENV = "PGMETER_COLLECT_TOKEN"


def event_source(config: PipelineConfig) -> str:
    """The CloudEvent ``source`` when the mapping sets none (and part of every derived id)."""
    return config.event_source or f"pgmeter-collect/{config.name}"


class Pipeline:
    def __init__(self, config: PipelineConfig, buffer_dir: Path, limits: EventLimits) -> None:
        self.config = config
        self.name = config.name
        self.event_source = event_source(config)
        self.buffer = Buffer(buffer_dir / f"{config.name}.sqlite", config.buffer_max_bytes)
        self.mapping = Mapping(config.mapping, self.event_source, limits)
        self.limits = limits
        to = config.to
        # No token in the file: the one named by tokenEnv, else PGMETER_COLLECT_TOKEN (how
        # the chart passes its Secret, and how the flags take it).
        token = to.token or os.environ.get(to.token_env or TOKEN_ENV) or None
        self.delivery = Delivery(config.name, self.buffer, to.url, token=token, batch_size=to.batch_size,
                                 batch_bytes=to.batch_bytes, linger=to.linger.total_seconds(),
                                 backoff_initial=to.backoff_initial.total_seconds(),
                                 backoff_max=to.backoff_max.total_seconds(), timeout=to.timeout.total_seconds(),
                                 max_in_flight=to.max_in_flight)

    def map(self, records: list[tuple[Any, str]]) -> Mapped:
        """Map ``(record, deterministic id)`` pairs; invalid results come back in ``rejected``."""
        out = Mapped([], [])
        for record, record_id in records:
            one = self.mapping.apply(record, record_id)
            out.events.extend(one.events)
            out.rejected.extend(one.rejected)
        return out

    async def offer(self, mapped: Mapped, state: dict[str, str] | None = None, *, block: bool) -> None:
        """Queue mapped events and the source position in one commit.

        ``block``: wait while the buffer is full (pull sources); otherwise raise
        :class:`BufferFull` (push sources answer 503).
        """
        warned = False
        while True:
            try:
                await self.buffer.put(mapped.events, state, mapped.rejected)
                break
            except BufferFull:
                metrics.REFUSED.labels(self.name).inc()
                if not block:
                    raise
                if not warned:
                    log.warning("buffer full: the source waits for delivery", extra={"pipeline": self.name})
                    warned = True
                await asyncio.sleep(FULL_RETRY_SECONDS)
        metrics.RECEIVED.labels(self.name).inc(len(mapped.events))
        if mapped.rejected:
            metrics.DEAD_LETTERED.labels(self.name, "invalid").inc(len(mapped.rejected))
            log.warning("events dead-lettered: invalid after mapping",
                        extra={"pipeline": self.name, "events": len(mapped.rejected),
                               "reason": mapped.rejected[0].reason})

    def refresh_gauges(self) -> None:
        stats = self.buffer.stats()
        metrics.BUFFER_EVENTS.labels(self.name).set(stats.events)
        metrics.BUFFER_BYTES.labels(self.name).set(stats.bytes)
        metrics.BUFFER_AGE.labels(self.name).set(stats.oldest_age)
