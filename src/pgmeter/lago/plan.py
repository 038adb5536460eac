"""Deciding which Lago events a window piece's usage calls for.

A *piece* is the part of one window (HOUR or DAY, in the customer's time zone) that
one Lago subscription record owned: windows are split where a subscription starts
or ends (an upgrade at 14:20 gives 14:00-14:20 to the old record, 14:20-15:00 to the
new one). Each piece is sent as it grows: the running total of an open window goes
out every run, and what changes afterwards goes as a correction.

Lago events cannot be updated or deleted, so every change is a new event with its
own deterministic id. What it carries depends on how the billable metric aggregates:

| meter       | Lago metric | first event   | correction                                   |
|-------------|-------------|---------------|----------------------------------------------|
| SUM, COUNT  | sum_agg     | piece total   | the difference (may be negative)             |
| MAX         | max_agg     | piece max     | the new max (late events only raise a max)   |
| LATEST      | latest_agg  | piece latest  | the new value, timestamped one second later  |

AVG, MIN and UNIQUE_COUNT cannot be corrected with additional Lago events (no
min_agg; averages and distinct counts do not combine across events), so the sync
refuses to map them rather than bill silently wrong numbers.

Lago's ClickHouse event store reads a value with ``toDecimal128OrZero(value, 26)``:
12 integer digits, anything larger becomes 0. A sum_agg value of 1e12 or more is
therefore sent as several events, each below 1e12 (exact on both stores); a MAX or
LATEST value that large cannot be split and is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

SYNCABLE = frozenset({"SUM", "COUNT", "MAX", "LATEST"})
# What each syncable meter needs on the Lago side.
LAGO_AGGREGATION = {"SUM": "sum_agg", "COUNT": "sum_agg", "MAX": "max_agg", "LATEST": "latest_agg"}
# Every Lago event value stays strictly below this (see the module docstring).
VALUE_LIMIT = Decimal(10) ** 12
PART_MAX = VALUE_LIMIT - 1


class UnsupportedMeter(ValueError):
    pass


def check_syncable(slug: str, aggregation: str) -> None:
    if aggregation not in SYNCABLE:
        raise UnsupportedMeter(
            f"meter {slug} aggregates with {aggregation}, which Lago events cannot correct "
            f"after late events; map a SUM, COUNT, MAX or LATEST meter instead"
        )


def metric_problem(aggregation: str, property: str, metric: dict[str, object] | None, code: str) -> str | None:
    """Why billable metric ``code`` cannot bill this meter's usage, or None if it can.

    Lago accepts events for any code and property with 200, so a wrong metric would
    bill silently wrong amounts (count_agg counts pgmeter's per-window events, not the
    usage they carry) or nothing at all. Checked before anything is sent.
    """
    if metric is None:
        return f"billable metric {code} does not exist in Lago"
    wanted = LAGO_AGGREGATION[aggregation]
    found = metric.get("aggregation_type")
    if found != wanted:
        why = {
            "count_agg": "count_agg counts Lago events, and pgmeter sends one event per window, not per "
                         "counted event",
            "unique_count_agg": "unique_count_agg counts distinct property values, not the usage pgmeter sends",
        }.get(str(found), f"{found} does not combine pgmeter's per-window values")
        return f"billable metric {code} aggregates with {found}; a {aggregation} meter needs {wanted} ({why})"
    if metric.get("field_name") != property:
        return (f"billable metric {code} reads property {metric.get('field_name')!r}, but the mapping sends "
                f"{property!r} (set field_name or the mapping's property so they match)")
    if metric.get("recurring"):
        return f"billable metric {code} is recurring: it would carry window totals over into later periods"
    if metric.get("expression"):
        return (f"billable metric {code} has an expression ({metric.get('expression')!r}), applied per event: "
                f"pgmeter's events are window totals, so it would not compute what it does per usage event")
    return None


@dataclass(frozen=True)
class Sent:
    """One outbox row of a piece (every revision and part so far)."""

    revision: int
    value: Decimal
    window_value: Decimal
    status: str = "sent"  # pending, sent, failed (Lago refused it), refused (pgmeter did)
    external_subscription_id: str = ""
    timestamp: Decimal = Decimal(0)
    window_end: datetime | None = None

    @property
    def billed(self) -> bool:
        return self.status in ("pending", "sent")


@dataclass(frozen=True)
class Piece:
    """Usage of one window owned by one Lago subscription record (or by none)."""

    subject: str
    window_start: datetime
    window_end: datetime
    external_subscription_id: str
    lago_subscription_id: str  # '' when no subscription was active: refused
    start: datetime  # the piece's own bounds inside the window
    end: datetime
    timestamp: Decimal  # Lago timestamp: inside the window and the subscription's range
    usage: Decimal
    refused: str | None = None

    @property
    def key(self) -> tuple[str, datetime, str]:
        return (self.subject, self.window_start, self.lago_subscription_id)


@dataclass(frozen=True)
class Item:
    """One outbox row: a Lago event to send, or one pgmeter refused to send."""

    transaction_id: str
    meter_key: str
    code: str
    subject: str
    external_subscription_id: str
    lago_subscription_id: str
    window_start: datetime
    window_end: datetime
    revision: int
    part: int
    value: Decimal
    window_value: Decimal
    timestamp: Decimal
    property: str
    status: str = "pending"
    reason: str | None = None

    def lago_event(self) -> dict[str, object]:
        return {
            "transaction_id": self.transaction_id,
            "external_subscription_id": self.external_subscription_id,
            "code": self.code,
            "timestamp": format_timestamp(self.timestamp),
            # A decimal string keeps the value exact; Lago parses numeric strings.
            "properties": {self.property: format_decimal(self.value)},
        }


def format_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def format_timestamp(timestamp: Decimal) -> int | float:
    """Unix seconds; milliseconds kept when a piece starts mid-second (Lago accepts them)."""
    return int(timestamp) if timestamp == timestamp.to_integral_value() else float(timestamp)


def transaction_id(meter_key: str, code: str, subject: str, window_start: datetime, lago_subscription_id: str,
                   revision: int, part: int) -> str:
    """Stable across retries and restarts: the same piece, revision and part, the same id."""
    key = f"{meter_key}|{code}|{subject}|{window_start.isoformat()}|{lago_subscription_id}|{revision}|{part}"
    return "pgm_" + hashlib.sha256(key.encode()).hexdigest()[:40]


def split_value(value: Decimal) -> list[Decimal]:
    """``value`` as parts that sum to it exactly, each with an absolute value below 1e12."""
    sign = -1 if value < 0 else 1
    rest = abs(value)
    parts = []
    while rest > PART_MAX:
        parts.append(sign * PART_MAX)
        rest -= PART_MAX
    parts.append(sign * rest)
    return parts


def next_items(*, aggregation: str, meter_key: str, code: str, property: str, piece: Piece,
               history: list[Sent]) -> list[Item]:
    """The outbox rows that bring Lago in line with ``piece.usage`` (none if it already is)."""
    # Revisions count every row (ids must never repeat); what Lago holds counts only
    # the rows it accepted, so rejected usage is sent again with the next change.
    revision = max((h.revision for h in history), default=-1) + 1
    latest = [h for h in history if h.revision == revision - 1]
    if latest and not latest[0].billed and latest[0].window_value == piece.usage:
        return []  # refused or rejected as it stands; nothing new to say
    billed = [h for h in history if h.billed]
    last_revision = max((h.revision for h in billed), default=None)
    last = next((h for h in billed if h.revision == last_revision), None)

    def rows(values: list[Decimal], status: str = "pending", reason: str | None = None,
             timestamp: Decimal = piece.timestamp) -> list[Item]:
        return [Item(
            transaction_id=transaction_id(meter_key, code, piece.subject, piece.window_start,
                                          piece.lago_subscription_id, revision, part),
            meter_key=meter_key, code=code, subject=piece.subject,
            external_subscription_id=piece.external_subscription_id,
            lago_subscription_id=piece.lago_subscription_id,
            window_start=piece.window_start, window_end=piece.window_end, revision=revision, part=part,
            value=value, window_value=piece.usage, timestamp=timestamp, property=property,
            status=status, reason=reason,
        ) for part, value in enumerate(values)]

    if piece.refused is not None:
        if piece.usage == 0 and not billed:
            return []
        if latest and latest[0].status == "refused":
            # Still refused, with more usage: the refusal row is updated in place (it
            # is never sent), not repeated every run while the window grows.
            revision -= 1
        return rows([piece.usage], "refused", piece.refused)
    if aggregation in ("SUM", "COUNT"):
        value = piece.usage - sum((h.value for h in billed), Decimal(0))
        return rows(split_value(value)) if value != 0 else []
    if aggregation == "MAX":
        if last is not None and piece.usage <= last.window_value:
            return []
    elif aggregation == "LATEST":
        if last is not None and piece.usage == last.window_value:
            return []
    else:
        raise UnsupportedMeter(aggregation)
    if abs(piece.usage) >= VALUE_LIMIT:
        return rows([piece.usage], "refused",
                    f"value {format_decimal(piece.usage)} is 1e12 or more: Lago's ClickHouse store would bill 0, "
                    f"and a {aggregation} value cannot be split")
    timestamp = piece.timestamp
    if aggregation == "LATEST":
        # latest_agg picks the newest timestamp; a correction must be newer than
        # what it corrects yet stay inside its piece.
        room = int((piece.end - piece.start) / timedelta(seconds=1)) - 1
        timestamp += min(revision, max(room, 0))
    return rows([piece.usage], timestamp=timestamp)
