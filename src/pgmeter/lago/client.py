"""A small client for Lago's batch events endpoint and the outcomes we act on.

Lago's ``POST /api/v1/events/batch`` is all-or-nothing: one bad or duplicate event
rolls the whole batch back and the 422 lists errors by index. The client turns the
answer into per-event outcomes so the sync can mark what is delivered and resend
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

BATCH_LIMIT = 100  # LAGO_EVENTS_BATCH_MAX_LENGTH's default


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
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send_batch(self, events: list[dict[str, Any]]) -> BatchOutcome:
        assert 0 < len(events) <= BATCH_LIMIT
        try:
            response = await self._http.post("/api/v1/events/batch", json={"events": events})
        except httpx.HTTPError as exc:
            return BatchOutcome(retry_after=0, error=f"{type(exc).__name__}: {exc}")
        if response.status_code == 200:
            return BatchOutcome(delivered=True)
        if response.status_code == 429:
            return BatchOutcome(retry_after=_reset_seconds(response), error="429 rate limited")
        if response.status_code >= 500 or response.status_code in (408, 502, 503, 504):
            return BatchOutcome(retry_after=0, error=f"{response.status_code} {response.text[:200]}")
        if response.status_code == 422:
            return _per_index(response, len(events))
        # 400/401/403/404: a configuration problem (key, URL); nothing to gain by
        # resending now, but nothing was stored either, so the items stay pending.
        return BatchOutcome(retry_after=0, error=f"{response.status_code} {response.text[:200]}")


def _reset_seconds(response: httpx.Response) -> float:
    for header in ("X-RateLimit-Reset", "Retry-After"):
        value = response.headers.get(header)
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                continue
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
