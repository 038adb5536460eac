"""A quota-checking API gateway in front of any ASGI app (Starlette middleware), using pgmeter.

Before each call: one check-and-reserve in Valkey (:data:`pgmeter.quota.layout.RESERVE_SCRIPT`
on the caller's hash ``<prefix>quota:v2:subject:<namespace>:<subject>:<feature>``): it
holds one unit under the id of the usage event the call will send, if the balance less
what concurrent calls hold allows it, in one round trip. So concurrent calls never
overspend a hard limit. No allowance -> ``429`` with an RFC 9457 problem body. A hash
that is missing (Valkey restarted, a new customer) or past its ``validUntil`` (a period
ended, a grant started or expired) is not trusted: the gateway asks pgmeter's value
endpoint, which computes the exact value and writes the hash back, and reserves again.

After a served call: the usage event goes to pgmeter (``POST /api/v1/events``) under the
reservation's id; pgmeter drops the reservation in the same write that counts the event
(within about a second), so the unit is never counted twice nor not at all. A call the
upstream failed (5xx) is not charged: its reservation is deleted (``HDEL``). A gateway
that dies in between leaves a reservation that expires after ``hold``.

Run it in front of your app::

    app = QuotaMiddleware(your_app, valkey=valkey.asyncio.from_url(...), pgmeter=httpx.AsyncClient(
        base_url="http://pgmeter:8888", headers={"Authorization": "Bearer ..."}), feature="calls")
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The layout is the contract; the script is pgmeter's, so a gateway cannot drift from it.
from pgmeter.quota.layout import RESERVE_SCRIPT


def tpp_from_header(headers: Headers) -> str | None:
    """The caller's subject: here a header set by the TLS-terminating proxy (e.g. from the
    client certificate of an Open Banking TPP)."""
    return headers.get("x-tpp-id")


class QuotaMiddleware:
    def __init__(self, app: ASGIApp, *, valkey: Any, pgmeter: httpx.AsyncClient, feature: str,
                 prefix: str = "pgmeter:", namespace: str = "default", event_type: str = "api.call",
                 source: str = "gateway", subject_of: Callable[[Headers], str | None] = tpp_from_header,
                 hold: float = 30.0) -> None:
        self.app = app
        self.valkey = valkey
        self.pgmeter = pgmeter
        self.feature = feature
        self.prefix = prefix
        self.namespace = namespace
        self.event_type = event_type
        self.source = source
        self.subject_of = subject_of
        self.hold_ms = int(hold * 1000)  # a reservation whose event never lands frees itself after this

    def key(self, subject: str) -> str:
        return f"{self.prefix}quota:v2:subject:{self.namespace}:{subject}:{self.feature}"

    async def reserve(self, subject: str, event_id: str) -> tuple[bool, str]:
        """(reserved, available) for one unit under ``event_id``; asks pgmeter when Valkey cannot say."""
        key = self.key(subject)
        for _ in range(2):
            status, available = await self.valkey.eval(RESERVE_SCRIPT, 1, key, event_id, "1", str(self.hold_ms))
            if status != -1:
                return status == 1, available.decode()
            # No usable hash: pgmeter computes the exact value and writes it back.
            response = await self.pgmeter.get(f"/api/v1/subjects/{subject}/entitlements/{self.feature}/value")
            if response.status_code == 404:
                return False, "0"
            response.raise_for_status()
            body = response.json()
        # Still none (no quota worker keeps the hashes): the exact answer, without a hold.
        return bool(body.get("hasAccess")), str(body.get("balance", 0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        subject = self.subject_of(Headers(scope=scope))
        if not subject:
            await _problem(send, 401, "Unauthorized", "the caller is not identified (X-TPP-Id)")
            return
        event_id = uuid.uuid4().hex
        access, balance = await self.reserve(subject, event_id)
        if not access:
            await _problem(send, 429, "Too Many Requests", f"the quota of {self.feature} is used up",
                           balance=balance, subject=subject)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if status and status < 500:
                await self.record(subject, scope, event_id)
            else:  # a call the upstream failed is not charged
                await self.valkey.hdel(self.key(subject), f"r:{event_id}")

    async def record(self, subject: str, scope: Scope, event_id: str) -> None:
        event = {"specversion": "1.0", "id": event_id, "source": self.source, "type": self.event_type,
                 "subject": subject, "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                 "data": {"n": 1, "path": scope["path"][:200]}}
        response = await self.pgmeter.post("/api/v1/events", content=json.dumps(event),
                                           headers={"content-type": "application/cloudevents+json"})
        response.raise_for_status()


async def _problem(send: Send, status: int, title: str, detail: str, **extra: Any) -> None:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
