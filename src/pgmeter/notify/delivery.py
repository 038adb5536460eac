"""Webhook delivery from the ``notification_deliveries`` outbox, signed as Standard Webhooks.

Each due delivery is claimed (``FOR UPDATE SKIP LOCKED``, so several processes share
the work), sent, and then marked SUCCESS on a 2xx within ``notifications.timeout``, or
scheduled again after the next delay of ``notifications.retrySchedule`` (Svix's by
default), or FAILED when the schedule is used up. A claim left SENDING by a process
that died is taken again after twice the timeout. Nothing is lost while a receiver is
down: the rows wait in Postgres.

Signing (the ``standardwebhooks`` reference implementation): ``webhook-id`` is the
event id (the same on every attempt, so receivers can deduplicate),
``webhook-timestamp`` the attempt's time, ``webhook-signature`` ``v1,<base64
HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`` with the channel's ``whsec_`` secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from standardwebhooks import Webhook

from pgmeter.dependencies import describe
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
RULES_CHECK = 1.0
BATCH = 20
MAX_ATTEMPTS_KEPT = 20
MAX_RESPONSE_BODY = 1024

_CLAIM = """
UPDATE notification_deliveries d SET state = 'SENDING', updated_at = now()
FROM (SELECT event_id, channel_id FROM notification_deliveries
      WHERE (state IN ('PENDING', 'RESENDING') AND next_attempt_at <= now())
         OR (state = 'SENDING' AND updated_at < now() - $1::interval)
      ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) due
WHERE d.event_id = due.event_id AND d.channel_id = due.channel_id
RETURNING d.event_id, d.channel_id, d.attempt_count
"""


def sign(secret: str, event_id: str, at: datetime, body: str) -> dict[str, str]:
    return {"webhook-id": event_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(event_id, at, body)}


class Dispatcher:
    def __init__(self, runtime: Runtime) -> None:
        config = runtime.settings.notifications
        self.pool: asyncpg.Pool = runtime.pool
        self.schedule = config.retry_schedule
        self.timeout = config.timeout.total_seconds()
        self.wake = asyncio.Event()
        self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        # Whether any active rule exists (checked at most every RULES_CHECK seconds): a quota
        # worker that stores nothing computes values only while someone wants them.
        self.has_rules = False
        self.rules_checked = float("-inf")

    async def run(self) -> None:
        try:
            while True:
                try:
                    sent = await self.once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("notification delivery round failed", extra={"error": describe(exc)})
                    sent = 0
                if sent < BATCH:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=self._next_wait())
                    except TimeoutError:
                        pass
        finally:
            await self.client.aclose()

    def _next_wait(self) -> float:
        shortest = min((d.total_seconds() for d in self.schedule if d.total_seconds() > 0), default=POLL_INTERVAL)
        return max(0.05, min(POLL_INTERVAL, shortest / 2))

    async def once(self) -> int:
        async with self.pool.acquire() as conn:
            if time.monotonic() - self.rules_checked >= RULES_CHECK:
                self.has_rules = bool(await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM notification_rules WHERE deleted_at IS NULL AND NOT disabled)"))
                self.rules_checked = time.monotonic()
            claimed = await conn.fetch(_CLAIM, timedelta(seconds=2 * self.timeout), BATCH)
        await asyncio.gather(*(self.deliver(row["event_id"], row["channel_id"], row["attempt_count"])
                               for row in claimed))
        return len(claimed)

    async def deliver(self, event_id: str, channel_id: str, attempt_count: int) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT e.payload::text AS payload, c.url, c.custom_headers::text AS headers, c.signing_secret, "
                "c.disabled OR c.deleted_at IS NOT NULL AS gone FROM notification_events e, notification_channels c "
                "WHERE e.id = $1 AND c.id = $2", event_id, channel_id)
        if row is None or row["gone"]:
            await self._finish(event_id, channel_id, "FAILED", "the channel is disabled or deleted", None, attempt_count)
            return
        body = row["payload"]
        # The body is the stored payload re-serialised compactly; the signature covers exactly these bytes.
        body = json.dumps(json.loads(body), separators=(",", ":"))
        now = datetime.now(UTC)
        headers = {**json.loads(row["headers"] or "{}"), **sign(row["signing_secret"], event_id, now, body),
                   "content-type": "application/json", "user-agent": "pgmeter-notifications"}
        started = time.perf_counter()
        attempt: dict[str, Any] = {"timestamp": now.isoformat().replace("+00:00", "Z")}
        try:
            response = await self.client.post(row["url"], content=body, headers=headers)
            ok = 200 <= response.status_code < 300
            attempt["response"] = {"statusCode": response.status_code, "body": response.text[:MAX_RESPONSE_BODY],
                                   "duration": f"{(time.perf_counter() - started) * 1000:.0f}ms", "url": row["url"]}
            reason = None if ok else f"the receiver answered {response.status_code}"
        except httpx.HTTPError as exc:
            ok = False
            reason = f"could not deliver: {describe(exc)}"
            attempt["response"] = {"duration": f"{(time.perf_counter() - started) * 1000:.0f}ms", "url": row["url"]}
        attempt["state"] = "SUCCESS" if ok else "FAILED"
        attempts = attempt_count + 1
        if ok:
            await self._finish(event_id, channel_id, "SUCCESS", None, attempt, attempts)
        elif attempts < len(self.schedule):
            await self._finish(event_id, channel_id, "PENDING", reason, attempt, attempts,
                               retry_in=self.schedule[attempts])
        else:
            await self._finish(event_id, channel_id, "FAILED", reason, attempt, attempts)

    async def _finish(self, event_id: str, channel_id: str, state: str, reason: str | None,
                      attempt: dict[str, Any] | None, attempts: int, retry_in: timedelta | None = None) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE notification_deliveries SET state = $3, reason = $4, attempt_count = $5, "
                "next_attempt_at = CASE WHEN $6::interval IS NULL THEN NULL ELSE now() + $6::interval END, "
                "attempts = CASE WHEN $7::jsonb IS NULL THEN attempts ELSE "
                "  (SELECT coalesce(jsonb_agg(a ORDER BY n), '[]') FROM (SELECT a, n FROM jsonb_array_elements("
                "    attempts || jsonb_build_array($7::jsonb)) WITH ORDINALITY AS x(a, n) ORDER BY n DESC LIMIT $8) y) END, "
                "updated_at = now() WHERE event_id = $1 AND channel_id = $2",
                event_id, channel_id, state, reason, attempts, retry_in,
                attempt, MAX_ATTEMPTS_KEPT)


async def start(runtime: Runtime) -> Dispatcher:
    dispatcher = Dispatcher(runtime)
    runtime.notify = dispatcher
    runtime.spawn("notify-dispatcher", dispatcher.run())
    quota = runtime.quota
    if quota is not None:
        from pgmeter.notify import rules

        async def evaluate(computed: Any, resets: list[str]) -> None:
            if await rules.evaluate(runtime.pool, computed, resets):
                dispatcher.wake.set()

        quota.listeners.append(evaluate)
        quota.interested.append(lambda: dispatcher.has_rules)
    return dispatcher
