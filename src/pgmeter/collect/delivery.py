"""Delivery: buffer -> any OpenMeter-compatible ``POST /api/v1/events``.

One batch in flight per pipeline, oldest events first, as
``application/cloudevents-batch+json``. What each answer does:

- 2xx: the batch leaves the buffer (the only way an event leaves, besides dead letters).
- 400 / 413: the endpoint will never take these events as they are. pgmeter's problem
  names the bad events (``validationErrors[].index``): those are dead-lettered with the
  endpoint's detail and the rest are sent again at once. Without indexes (OpenMeter,
  or 413) the batch is halved until the bad event is alone, then dead-lettered - one
  bad event never takes good ones with it.
- anything else (network error, 401/403/404, 408, 429, 5xx): retried, forever, with
  capped exponential backoff and full jitter - or after exactly ``Retry-After`` when
  the endpoint sent one. (OpenMeter's preset drops after 3 retries; a buffer that
  gives up defeats its purpose. A misconfigured token shows in
  ``pgmeter_collect_delivery_failures_total{cause="401"}`` and the buffer age.)

An event acknowledged twice (a crash between the 2xx and the delete) is harmless:
ids are deterministic and the endpoint dedups on (namespace, source, id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from pgmeter.collect import metrics
from pgmeter.collect.buffer import Buffer, Queued

log = logging.getLogger("pgmeter.collect.delivery")

BATCH = "application/cloudevents-batch+json"
MAX_RETRY_AFTER = 300.0


class Delivery:
    def __init__(self, name: str, buffer: Buffer, url: str, *, token: str | None = None,
                 batch_size: int = 500, batch_bytes: int = 512 * 1024, linger: float = 0.1,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, timeout: float = 30.0) -> None:
        self.name = name
        self.buffer = buffer
        self.url = url.rstrip("/")
        if not self.url.endswith("/api/v1/events"):
            self.url += "/api/v1/events"
        self.headers = {"content-type": BATCH}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._limit = batch_size  # shrinks while isolating an event the endpoint refuses
        self._attempt = 0
        self.connected = False  # the last attempt reached the endpoint (for /readyz)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while True:
                batch = await self._next_batch()
                await self._send(client, batch)

    async def _next_batch(self) -> list[Queued]:
        deadline: float | None = None
        while True:
            self.buffer.arrived.clear()
            batch = await asyncio.to_thread(self.buffer.peek, self._limit, self.batch_bytes)
            if batch and (len(batch) >= self._limit or deadline is not None and time.monotonic() >= deadline):
                return batch
            if batch and deadline is None:
                deadline = time.monotonic() + self.linger
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self.buffer.arrived.wait(), wait)
            except TimeoutError:
                pass

    async def _send(self, client: httpx.AsyncClient, batch: list[Queued]) -> None:
        body = ("[" + ",".join(q.body for q in batch) + "]").encode("utf-8", "surrogatepass")
        started = time.monotonic()
        try:
            response = await client.post(self.url, content=body, headers=self.headers)
        except httpx.HTTPError as exc:
            self.connected = False
            await self._retry_later(type(exc).__name__, None, str(exc))
            return
        self.connected = True
        status = response.status_code
        if 200 <= status < 300:
            metrics.DELIVERY_SECONDS.labels(self.name).observe(time.monotonic() - started)
            await asyncio.to_thread(self.buffer.ack, [q.seq for q in batch])
            metrics.DELIVERED.labels(self.name).inc(len(batch))
            self._attempt = 0
            self._limit = min(self.batch_size, self._limit * 2)
            return
        if status in (400, 413):
            await self._refused(batch, status, response)
            return
        await self._retry_later(str(status), response.headers.get("retry-after"), response.text[:200])

    async def _refused(self, batch: list[Queued], status: int, response: httpx.Response) -> None:
        problem = _problem(response)
        detail = str(problem.get("detail") or response.text[:2000])
        bad: dict[int, str] = {}
        # pgmeter puts them under "extensions"; RFC 7807 allows them at the top level too.
        extensions = problem.get("extensions")
        errors = (extensions.get("validationErrors") if isinstance(extensions, dict) else None) \
            or problem.get("validationErrors") or []
        for error in errors if isinstance(errors, list) else []:
            index = error.get("index") if isinstance(error, dict) else None
            if isinstance(index, int) and 0 <= index < len(batch):
                message = f"{error.get('field', '')} {error.get('message', '')}".strip()
                bad[index] = f"{bad[index]}; {message}" if index in bad else message
        if not bad and len(batch) == 1:
            bad[0] = detail
        if bad:
            items: list[tuple[Queued, str, str | None]] = [
                (batch[i], f"endpoint answered {status}: {reason}", detail) for i, reason in sorted(bad.items())]
            await asyncio.to_thread(self.buffer.dead_letter, items)
            metrics.DEAD_LETTERED.labels(self.name, f"endpoint {status}").inc(len(items))
            log.warning("events dead-lettered: the endpoint refused them",
                        extra={"pipeline": self.name, "status": status, "events": len(items), "detail": detail})
            return
        # No index to go by: halve until the refused event is alone.
        self._limit = max(1, len(batch) // 2)

    async def _retry_later(self, cause: str, retry_after: str | None, detail: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.name, cause).inc()
        delay = _retry_after_seconds(retry_after)
        if delay is None:
            ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(self._attempt, 30)))
            delay = random.uniform(0, ceiling)  # full jitter: replicas do not retry in step
        self._attempt += 1
        if self._attempt == 1 or self._attempt % 10 == 0:
            log.warning("delivery failed; retrying", extra={"pipeline": self.name, "cause": cause,
                                                             "attempt": self._attempt, "delay": round(delay, 3),
                                                             "detail": detail})
        await asyncio.sleep(delay)


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), capped; ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))
