"""Deciding which Lago events a window's usage calls for.

Lago events cannot be updated or deleted, so a window whose usage changed after it
was sent (late events) gets a new event with its own deterministic id. What that
event carries depends on how the Lago billable metric aggregates:

| meter       | Lago metric | first event   | correction                                   |
|-------------|-------------|---------------|----------------------------------------------|
| SUM, COUNT  | sum_agg     | window total  | the difference (may be negative for SUM)     |
| MAX         | max_agg     | window max    | the new max (late events only raise a max)   |
| LATEST      | latest_agg  | window latest | the new value, timestamped one second later  |

AVG, MIN and UNIQUE_COUNT cannot be corrected with additional Lago events (no
min_agg; averages and distinct counts do not combine across events), so the sync
refuses to map them rather than bill silently wrong numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

SYNCABLE = frozenset({"SUM", "COUNT", "MAX", "LATEST"})


class UnsupportedMeter(ValueError):
    pass


def check_syncable(slug: str, aggregation: str) -> None:
    if aggregation not in SYNCABLE:
        raise UnsupportedMeter(
            f"meter {slug} aggregates with {aggregation}, which Lago events cannot correct "
            f"after late events; map a SUM, COUNT, MAX or LATEST meter instead"
        )


@dataclass(frozen=True)
class Sent:
    """What the outbox holds for one window: every revision so far."""

    revision: int
    value: Decimal
    window_value: Decimal
    failed: bool = False  # Lago rejected it: numbered, but not billed


@dataclass(frozen=True)
class Item:
    """One Lago event to send."""

    transaction_id: str
    meter_key: str
    code: str
    subject: str
    external_subscription_id: str
    window_start: datetime
    window_end: datetime
    revision: int
    value: Decimal
    window_value: Decimal
    timestamp: int
    property: str

    def lago_event(self) -> dict[str, object]:
        return {
            "transaction_id": self.transaction_id,
            "external_subscription_id": self.external_subscription_id,
            "code": self.code,
            "timestamp": self.timestamp,
            # A decimal string keeps the value exact; Lago parses numeric strings.
            "properties": {self.property: format_decimal(self.value)},
        }


def format_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def transaction_id(meter_key: str, code: str, subject: str, window_start: datetime, revision: int) -> str:
    """Stable across retries and restarts: the same window and revision, the same id."""
    key = f"{meter_key}|{code}|{subject}|{window_start.isoformat()}|{revision}"
    return "pgm_" + hashlib.sha256(key.encode()).hexdigest()[:40]


def next_item(
    *,
    aggregation: str,
    meter_key: str,
    code: str,
    property: str,
    subject: str,
    external_subscription_id: str,
    window_start: datetime,
    window_end: datetime,
    usage: Decimal,
    history: list[Sent],
) -> Item | None:
    """The event that brings Lago in line with ``usage``, or None if it already is."""
    # Revisions count every row (ids must never repeat); what Lago holds counts only
    # the rows it accepted, so rejected usage is sent again with the next change.
    revision = max((h.revision for h in history), default=-1) + 1
    billed = [h for h in history if not h.failed]
    last = max(billed, key=lambda h: h.revision) if billed else None
    if aggregation in ("SUM", "COUNT"):
        value = usage - sum((h.value for h in billed), Decimal(0))
        if value == 0:
            return None
    elif aggregation == "MAX":
        if last is not None and usage <= last.window_value:
            return None
        value = usage
    elif aggregation == "LATEST":
        if last is not None and usage == last.window_value:
            return None
        value = usage
    else:
        raise UnsupportedMeter(aggregation)
    timestamp = int(window_start.timestamp())
    if aggregation == "LATEST":
        # latest_agg picks the newest timestamp; a correction must be newer than
        # what it corrects yet stay inside its window.
        timestamp += min(revision, int((window_end - window_start) / timedelta(seconds=1)) - 1)
    return Item(
        transaction_id=transaction_id(meter_key, code, subject, window_start, revision),
        meter_key=meter_key, code=code, subject=subject,
        external_subscription_id=external_subscription_id,
        window_start=window_start, window_end=window_end, revision=revision,
        value=value, window_value=usage, timestamp=timestamp, property=property,
    )
