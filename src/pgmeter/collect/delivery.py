"""Delivery: buffer -> any OpenMeter-compatible ``POST /api/v1/events``.

Up to ``max_in_flight`` batches in flight per pipeline (each worker claims the next
events in buffer order and keeps its batch until every event in it is resolved), as
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
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, timeout: float = 30.0,
                 max_in_flight: int = 1) -> None:
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
        self.max_in_flight = max_in_flight
        # Batches are claimed in buffer order by one worker at a time: the highest
        # sequence handed out so far. A restart starts from 0 (everything still in the
        # buffer is sent again; ids make that harmless).
        self._claimed = 0
        self._claim = asyncio.Lock()
        self.connected = False  # the last attempt reached the endpoint (for /readyz)

    async def run(self) -> None:
        """``max_in_flight`` workers, each resolving one batch at a time (a far endpoint's
        round trip would otherwise cap throughput at one batch per round trip)."""
        # A restart (after an unexpected error) sends everything still buffered again;
        # the TaskGroup takes every worker down with the one that failed.
        self._claimed = 0
        async with httpx.AsyncClient(timeout=self.timeout) as client, asyncio.TaskGroup() as workers:
            for _ in range(self.max_in_flight):
                workers.create_task(self._worker(client))

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while True:
            async with self._claim:
                batch = await self._next_batch()
                self._claimed = batch[-1].seq
            await self._resolve(client, batch)

    async def _next_batch(self) -> list[Queued]:
        deadline: float | None = None
        while True:
            self.buffer.arrived.clear()
            batch = await asyncio.to_thread(self.buffer.peek, self.batch_size, self.batch_bytes, self._claimed)
            if batch and (len(batch) >= self.batch_size or deadline is not None and time.monotonic() >= deadline):
                return batch
            if batch and deadline is None:
                deadline = time.monotonic() + self.linger
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self.buffer.arrived.wait(), wait)
            except TimeoutError:
                pass

    async def _resolve(self, client: httpx.AsyncClient, batch: list[Queued]) -> None:
        """Send ``batch`` until every event in it is acknowledged or dead-lettered."""
        parts = [batch]
        attempt = 0
        while parts:
            part = parts.pop()
            body = ("[" + ",".join(q.body for q in part) + "]").encode("utf-8", "surrogatepass")
            started = time.monotonic()
            try:
                response = await client.post(self.url, content=body, headers=self.headers)
            except httpx.HTTPError as exc:
                self.connected = False
                parts.append(part)
                await self._retry_later(attempt, type(exc).__name__, None, str(exc))
                attempt += 1
                continue
            self.connected = True
            status = response.status_code
            if 200 <= status < 300:
                metrics.DELIVERY_SECONDS.labels(self.name).observe(time.monotonic() - started)
                await asyncio.to_thread(self.buffer.ack, [q.seq for q in part])
                metrics.DELIVERED.labels(self.name).inc(len(part))
                attempt = 0
            elif status in (400, 413):
                parts.extend(await self._refused(part, status, response))
            else:
                parts.append(part)
                await self._retry_later(attempt, str(status), response.headers.get("retry-after"),
                                        response.text[:200])
                attempt += 1

    async def _refused(self, batch: list[Queued], status: int, response: httpx.Response) -> list[list[Queued]]:
        """Dead-letter what the endpoint named as bad; the parts still to send."""
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
        if not bad:
            # No index to go by: halve until the refused event is alone (first half first).
            middle = len(batch) // 2
            return [batch[middle:], batch[:middle]]
        items: list[tuple[Queued, str, str | None]] = [
            (batch[i], f"endpoint answered {status}: {reason}", detail) for i, reason in sorted(bad.items())]
        await asyncio.to_thread(self.buffer.dead_letter, items)
        metrics.DEAD_LETTERED.labels(self.name, f"endpoint {status}").inc(len(items))
        log.warning("events dead-lettered: the endpoint refused them",
                    extra={"pipeline": self.name, "status": status, "events": len(items), "detail": detail})
        rest = [q for i, q in enumerate(batch) if i not in bad]
        return [rest] if rest else []

    async def _retry_later(self, attempt: int, cause: str, retry_after: str | None, detail: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.name, cause).inc()
        delay = _retry_after_seconds(retry_after)
        if delay is None:
            ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
            delay = random.uniform(0, ceiling)  # full jitter: workers and replicas do not retry in step
        if attempt == 0 or (attempt + 1) % 10 == 0:
            log.warning("delivery failed; retrying", extra={"pipeline": self.name, "cause": cause,
                                                             "attempt": attempt + 1, "delay": round(delay, 3),
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
