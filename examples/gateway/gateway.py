"""A quota-checking API gateway in front of any ASGI app (Starlette middleware), using pgmeter.

Before each call: one ``HMGET`` of the caller's quota hash in Valkey (layout:
``pgmeter.quota.layout``, ``<prefix>quota:v1:subject:<namespace>:<subject>:<feature>``).
A hash that is missing (Valkey restarted, a new customer) or past its ``validUntil``
(a period ended, a grant started or expired) is not trusted: the gateway asks pgmeter's
value endpoint, which computes the exact value and writes the hash back. No access ->
``429`` with an RFC 9457 problem body. After the call: one usage event to pgmeter
(``POST /api/v1/events``); its effect reaches the hash within about a second.

The middleware only reads Valkey; pgmeter is the only writer. Usage between a call and
the hash catching up is not reserved: a burst can overshoot by what arrives in that
second (soft enforcement, as OpenMeter's own access checks).

Run it in front of your app::

    app = QuotaMiddleware(your_app, valkey=valkey.asyncio.from_url(...), pgmeter=httpx.AsyncClient(
        base_url="http://pgmeter:8888", headers={"Authorization": "Bearer ..."}), feature="calls")
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FIELDS = ("v", "hasAccess", "balance", "validUntil")


def tpp_from_header(headers: Headers) -> str | None:
    """The caller's subject: here a header set by the TLS-terminating proxy (e.g. from the
    client certificate of an Open Banking TPP)."""
    return headers.get("x-tpp-id")


class QuotaMiddleware:
    def __init__(self, app: ASGIApp, *, valkey: Any, pgmeter: httpx.AsyncClient, feature: str,
                 prefix: str = "pgmeter:", namespace: str = "default", event_type: str = "api.call",
                 source: str = "gateway", subject_of: Callable[[Headers], str | None] = tpp_from_header) -> None:
        self.app = app
        self.valkey = valkey
        self.pgmeter = pgmeter
        self.feature = feature
        self.prefix = prefix
        self.namespace = namespace
        self.event_type = event_type
        self.source = source
        self.subject_of = subject_of

    def key(self, subject: str) -> str:
        return f"{self.prefix}quota:v1:subject:{self.namespace}:{subject}:{self.feature}"

    async def allowed(self, subject: str) -> tuple[bool, str]:
        """(has access, balance) from Valkey, or from pgmeter when Valkey cannot say."""
        version, access, balance, valid_until = await self.valkey.hmget(self.key(subject), *FIELDS)
        if version == b"1" and valid_until is not None and time.time() * 1000 < int(valid_until):
            return access == b"1", balance.decode()
        response = await self.pgmeter.get(f"/api/v1/subjects/{subject}/entitlements/{self.feature}/value")
        if response.status_code == 404:
            return False, "0"
        response.raise_for_status()
        body = response.json()
        return bool(body.get("hasAccess")), str(body.get("balance", 0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        subject = self.subject_of(Headers(scope=scope))
        if not subject:
            await _problem(send, 401, "Unauthorized", "the caller is not identified (X-TPP-Id)")
            return
        access, balance = await self.allowed(subject)
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

        await self.app(scope, receive, watch)
        if status < 500:  # a call the upstream failed is not charged
            await self.record(subject, scope)

    async def record(self, subject: str, scope: Scope) -> None:
        event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": self.source, "type": self.event_type,
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
