"""A small client for the parts of Lago's API the sync uses, and the outcomes it acts on.

Events: ``POST /api/v1/events/batch`` is all-or-nothing: one bad or duplicate event
rolls the whole batch back and the 422 lists errors by index. The client turns the
answer into per-event outcomes so the sync can mark what is delivered and resend
the rest.

Reads (to validate a mapping before anything is sent, because Lago accepts events
for unknown metrics and subscriptions with 200 and drops them at invoicing):
``GET /api/v1/billable_metrics/{code}``, ``GET /api/v1/subscriptions?external_id=``
(every record of an external id: an upgrade keeps the external id and starts a new
record), ``GET /api/v1/customers/{external_id}`` (time zone, grace period) and
``GET /api/v1/billing_entities/{code}`` (their defaults).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from pgmeter.config import lago_base_url

# Lago's own default for LAGO_EVENTS_BATCH_MAX_LENGTH; lago.batchSize overrides it.
BATCH_LIMIT = 100
# The longest pause after a 429, whatever Lago's headers say: a reset given as an
# epoch timestamp, or a misconfigured proxy, must not park the sync for hours.
MAX_RETRY_WAIT = 60.0


class LagoUnavailable(Exception):
    """Lago could not answer a read (network, 5xx, 429, auth): try again next run."""


@dataclass
class BatchOutcome:
    """What Lago did with one batch."""

    delivered: bool = False
    # index -> already stored (transaction_id value_already_exist only)
    duplicates: set[int] = field(default_factory=set)
    # index -> Lago's error details (anything but value_already_exist)
    rejected: dict[int, str] = field(default_factory=dict)
    # Retry the whole batch later, not before this many seconds.
    retry_after: float | None = None
    error: str | None = None


class LagoClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        # httpx logs every request at INFO: with a run a minute that is thousands of
        # log lines a day saying nothing the sync's own run log does not.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._http = httpx.AsyncClient(
            base_url=lago_base_url(base_url),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- events --------------------------------------------------------------------

    async def send_batch(self, events: list[dict[str, Any]]) -> BatchOutcome:
        assert events
        try:
            response = await self._http.post("/api/v1/events/batch", json={"events": events})
        except httpx.HTTPError as exc:
            return BatchOutcome(retry_after=0, error=f"{type(exc).__name__}: {exc}")
        if response.status_code == 200:
            return BatchOutcome(delivered=True)
        if response.status_code == 429:
            return BatchOutcome(retry_after=retry_wait(response.headers), error="429 rate limited")
        if response.status_code >= 500 or response.status_code == 408:
            return BatchOutcome(retry_after=0, error=f"{response.status_code} {response.text[:200]}")
        if response.status_code == 422:
            return _per_index(response, len(events))
        # 400/401/403/404: a configuration problem (key, URL); nothing to gain by
        # resending now, but nothing was stored either, so the items stay pending.
        return BatchOutcome(retry_after=0, error=f"{response.status_code} {response.text[:200]}")

    # -- reads ---------------------------------------------------------------------

    async def _get(self, path: str, params: Any = None) -> dict[str, Any] | None:
        """The JSON body, None on 404; anything else unusable raises LagoUnavailable."""
        try:
            response = await self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise LagoUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LagoUnavailable(f"GET {path}: {response.status_code} {response.text[:200]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise LagoUnavailable(f"GET {path}: not JSON") from exc
        if not isinstance(body, dict):
            raise LagoUnavailable(f"GET {path}: unexpected body")
        return body

    async def billable_metric(self, code: str) -> dict[str, Any] | None:
        body = await self._get(f"/api/v1/billable_metrics/{quote(code, safe='')}")
        return None if body is None else body.get("billable_metric")

    async def subscriptions(self, external_id: str) -> list[dict[str, Any]]:
        """Every started record of ``external_id``: active, and terminated ones (an
        upgrade or downgrade terminates the old record and starts a new one)."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            body = await self._get("/api/v1/subscriptions", params=[
                ("external_id", external_id), ("status[]", "active"), ("status[]", "terminated"),
                ("page", str(page)), ("per_page", "100")])
            if body is None:
                return found
            found.extend(s for s in body.get("subscriptions", []) if s.get("external_id") == external_id)
            next_page = (body.get("meta") or {}).get("next_page")
            if not next_page or next_page == page:
                return found
            page = int(next_page)

    async def customer(self, external_id: str) -> dict[str, Any] | None:
        body = await self._get(f"/api/v1/customers/{quote(external_id, safe='')}")
        return None if body is None else body.get("customer")

    async def billing_entity(self, code: str) -> dict[str, Any] | None:
        body = await self._get(f"/api/v1/billing_entities/{quote(code, safe='')}")
        return None if body is None else body.get("billing_entity")


def retry_wait(headers: httpx.Headers, *, now: float | None = None) -> float:
    """Seconds to wait after a 429: ``Retry-After`` (seconds), or ``X-RateLimit-Reset``
    as seconds or as an epoch timestamp; at most :data:`MAX_RETRY_WAIT`."""
    for header in ("Retry-After", "X-RateLimit-Reset"):
        value = headers.get(header)
        if not value:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if seconds > 1e9:  # an epoch timestamp (2001 or later), not a duration
            seconds -= time.time() if now is None else now
        return min(MAX_RETRY_WAIT, max(0.0, seconds))
    return 1.0


def _per_index(response: httpx.Response, count: int) -> BatchOutcome:
    try:
        body = response.json()
    except ValueError:
        return BatchOutcome(retry_after=0, error=f"422 without JSON: {response.text[:200]}")
    details = body.get("error_details") if isinstance(body, dict) else None
    outcome = BatchOutcome()
    if not isinstance(details, dict):
        return BatchOutcome(retry_after=0, error=f"422 {str(body)[:200]}")
    for key, errors in details.items():
        if not str(key).isdigit() or int(key) >= count:
            # A batch-level error (no_events, too_many_events): our bug, not the data's.
            return BatchOutcome(retry_after=0, error=f"422 {details}")
        index = int(key)
        if errors == {"transaction_id": ["value_already_exist"]}:
            outcome.duplicates.add(index)
        else:
            outcome.rejected[index] = str(errors)
    if not outcome.duplicates and not outcome.rejected:
        # A 422 that names no event: resending the same batch at once would loop.
        return BatchOutcome(retry_after=0, error=f"422 without per-event errors: {str(body)[:200]}")
    return outcome
