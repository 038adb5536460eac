"""``pgmeter demo``: realistic Open Banking traffic for a running api.

Metered API calls from a handful of TPPs (third-party providers) to account
information, payment and funds-confirmation endpoints, each with a method and a
response time, spread over the last hours so the console's charts have a shape.
Like real gateways it also sends a few duplicates (a retried batch: the sink
stores them once), late events (days old, arriving now) and events a meter
cannot read (a response time of "n/a": listed with a validation error).

It uses only the public ingest route, as any producer would.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import httpx

# TPP id -> share of the traffic.
TPPS = {
    "tpp-moneywise": 0.34, "tpp-budgetly": 0.22, "tpp-payfast": 0.18,
    "tpp-lendwell": 0.12, "tpp-taxhelper": 0.09, "tpp-sandbox": 0.05,
}
# (endpoint, method, share, median response time in ms)
ENDPOINTS = [
    ("/aisp/accounts", "GET", 0.24, 80),
    ("/aisp/accounts/{AccountId}/balances", "GET", 0.22, 60),
    ("/aisp/accounts/{AccountId}/transactions", "GET", 0.20, 240),
    ("/aisp/account-access-consents", "POST", 0.08, 150),
    ("/pisp/domestic-payment-consents", "POST", 0.09, 180),
    ("/pisp/domestic-payments", "POST", 0.08, 320),
    ("/cbpii/funds-confirmations", "POST", 0.06, 90),
    ("/aisp/account-access-consents/{ConsentId}", "DELETE", 0.03, 70),
]
BATCH = 100
DUPLICATE_SHARE = 0.01
LATE_SHARE = 0.02
INVALID_SHARE = 0.005
RETRIES = 5


@dataclass
class Summary:
    sent: int = 0  # events in accepted requests, duplicates included
    duplicates: int = 0
    late: int = 0
    invalid: int = 0
    per_tpp: Counter[str] = field(default_factory=Counter)
    retries: int = 0


class DemoError(Exception):
    """The api refused the traffic; the message says why."""


def make_event(rng: random.Random, now: datetime, span: timedelta, summary: Summary) -> dict[str, Any]:
    tpp = rng.choices(list(TPPS), weights=list(TPPS.values()))[0]
    endpoint, method, _, median = rng.choices(ENDPOINTS, weights=[e[2] for e in ENDPOINTS])[0]
    # Recent traffic is heavier; latencies are log-normal around the endpoint's median.
    when = now - span * rng.random() ** 1.6
    if rng.random() < LATE_SHARE:
        when = now - timedelta(days=rng.uniform(2, 5))
        summary.late += 1
    latency: int | str = max(1, round(rng.lognormvariate(0, 0.5) * median))
    if rng.random() < INVALID_SHARE:
        latency = "n/a"
        summary.invalid += 1
    summary.per_tpp[tpp] += 1
    return {
        "specversion": "1.0", "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "source": "demo-gateway", "type": "api.call", "subject": tpp,
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {"endpoint": endpoint, "method": method, "response_time_ms": latency,
                 "status": 201 if method == "POST" else 204 if method == "DELETE" else 200},
    }


def post_batch(client: httpx.Client, batch: list[dict[str, Any]], summary: Summary) -> None:
    body = json.dumps(batch)
    for attempt in range(RETRIES + 1):
        response = client.post("/api/v1/events", content=body,
                               headers={"Content-Type": "application/cloudevents-batch+json"})
        if response.status_code == 204:
            return
        if response.status_code in (429, 503) and attempt < RETRIES:
            summary.retries += 1
            time.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise DemoError(f"{response.status_code} from POST /api/v1/events: {detail}")


def progress(out: TextIO, done: int, total: int, started: float) -> None:
    width = 30
    filled = width * done // total
    rate = done / max(time.monotonic() - started, 1e-6)
    out.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events  {rate:,.0f}/s")
    out.flush()


def run(url: str, token: str | None, events: int, rate: float, span: timedelta, seed: int | None,
        out: TextIO = sys.stderr) -> Summary:
    """Send ``events`` events at about ``rate`` per second; returns what was sent."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    summary = Summary()
    now = datetime.now(UTC)
    started = time.monotonic()
    previous: list[dict[str, Any]] = []
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        while summary.sent < events:
            size = min(BATCH, events - summary.sent)
            # A retried request: some events of the previous batch arrive again.
            repeats = [event for event in previous if rng.random() < DUPLICATE_SHARE][: size - 1]
            summary.duplicates += len(repeats)
            summary.per_tpp.update(event["subject"] for event in repeats)
            batch = [make_event(rng, now, span, summary) for _ in range(size - len(repeats))] + repeats
            post_batch(client, batch, summary)
            previous = batch
            summary.sent += len(batch)
            progress(out, summary.sent, events, started)
            # Pace to the rate: sleep until this many events were due.
            due = started + summary.sent / rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
    out.write("\n")
    return summary


def report(summary: Summary, url: str, elapsed: float) -> str:
    lines = [
        f"sent {summary.sent} events in {elapsed:.1f} s: {summary.sent - summary.duplicates} distinct, "
        f"{summary.duplicates} duplicates (stored once), {summary.late} late (2-5 days old), "
        f"{summary.invalid} a meter cannot read (see the console's Events screen)",
        "per TPP (as sent): " + ", ".join(f"{tpp} {count}" for tpp, count in summary.per_tpp.most_common()),
    ]
    if summary.retries:
        lines.append(f"{summary.retries} requests retried after 503/429")
    lines.append(f"Open {url.rstrip('/')}/ to see the usage (it appears within a few seconds).")
    return "\n".join(lines)
