"""A local HTTP server that behaves like Lago (lago-api v1.51) where billing depends on it.

Lago itself cannot run here, so the sync is tested against this stand-in. It models
what decides whether usage is billed, as lago-api's code does it (not only what its
API documents), so a test that passes here would bill the same in Lago:

Events (``POST /api/v1/events/batch``)
- ``Authorization: Bearer <key>``; a missing or unknown key is 401.
- ``{"events": [...]}``: a missing root key is 400; an empty list or more than
  ``batch_max`` (LAGO_EVENTS_BATCH_MAX_LENGTH, 100) events is a 422 on ``events``.
- Only ``transaction_id`` and ``code`` are required and ``timestamp`` must parse
  (Unix seconds, decimals allowed). Unknown codes and unknown or empty
  ``external_subscription_id`` s are accepted with 200, and dropped at invoicing.
- The batch is all-or-nothing: any error stores none of it.
- Duplicates depend on the event store: ``store="postgres"`` answers 422
  ``{"<index>": {"transaction_id": ["value_already_exist"]}}`` for a
  ``transaction_id`` already stored for that subscription (or repeated in the batch);
  ``store="clickhouse"`` answers 200 and keeps the first copy. The ClickHouse store
  reads values with ``toDecimal128OrZero(value, 26)``: 1e12 or more bills 0.
- Rate limiting answers 429 with ``X-RateLimit-Limit/Remaining/Reset``.

Reads: ``GET /api/v1/billable_metrics/{code}``, ``GET /api/v1/subscriptions``
(``external_id``, ``status[]`` defaulting to active, pages), ``GET
/api/v1/customers/{id}`` (``applicable_timezone``, ``billing_configuration
.invoice_grace_period``) and ``GET /api/v1/billing_entities/{code}``; 404 when absent.

Invoicing (driven by :meth:`FakeLago.advance`, the clock the test controls)
- hh:10 UTC: each active subscription whose billing day (calendar: the 1st for
  monthly plans, Monday for weekly ones) is today in the customer's time zone, and
  that started before today, gets an invoice for the period that ended at local
  midnight, from ``max(period start, started_at)``. With an invoice grace period of
  0 it is final at once, counting the events stored at that moment; with N days it
  is a draft, finalized by the hh:20 job on local date + N, counting what is stored
  then.
- Termination and upgrade (:meth:`terminate`, :meth:`upgrade`) invoice the
  terminated record at once, from its period start to ``terminated_at`` (final at
  once with grace 0). An upgrade keeps the external id and starts a new record.
- An invoice counts the events of its ``external_subscription_id`` whose timestamp
  is inside its charges window: the period, clipped to ``started_at`` and
  ``terminated_at``, both inclusive (Lago's event stores filter by external id and
  timestamp, not by record: an upgrade's records overlap by the milliseconds between
  the new record's start and the old one's termination). Everything else is
  ignored. Units per billable metric: sum_agg, max_agg, latest_agg (the newest
  timestamp), count_agg, on ``field_name``.

Tests steer it with ``outage`` (503 for the next N event batches), ``rate_limit``
(429 for the next N batches), ``fail_after_store`` (store, then answer 500),
``reads_down`` (503 on every read) and ``hold_answers`` (store, then keep the
client waiting, so a test can kill it between Lago's commit and its bookkeeping).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import zoneinfo
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.devstack.process import free_port
from tests.support.app import ThreadedServer

CLICKHOUSE_LIMIT = Decimal(10) ** 12


@dataclass
class Subscription:
    lago_id: str
    external_id: str
    customer: str
    plan_code: str
    interval: str  # monthly | weekly (calendar billing)
    started_at: datetime
    terminated_at: datetime | None = None

    @property
    def status(self) -> str:
        return "active" if self.terminated_at is None else "terminated"

    def json(self) -> dict[str, Any]:
        return {
            "lago_id": self.lago_id, "external_id": self.external_id, "external_customer_id": self.customer,
            "plan_code": self.plan_code, "status": self.status, "billing_time": "calendar",
            # As Lago serializes them: started_at to the millisecond, terminated_at to the second.
            "started_at": self.started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "terminated_at": (None if self.terminated_at is None else
                              self.terminated_at.isoformat(timespec="seconds").replace("+00:00", "Z")),
        }


@dataclass
class Invoice:
    subscription: Subscription
    from_: datetime
    to: datetime  # exclusive for periodic invoices; terminated_at (inclusive) on termination
    reason: str  # subscription_periodic | termination
    status: str  # draft | finalized
    finalize_on: date  # local date from which the hh:20 job finalizes a draft
    units: dict[str, Decimal] = field(default_factory=dict)


class FakeLago:
    def __init__(self, api_key: str = "lago-test-key", *, store: str = "postgres", batch_max: int = 100,
                 now: datetime | None = None) -> None:
        assert store in ("postgres", "clickhouse")
        self.api_key = api_key
        self.store = store
        self.batch_max = batch_max
        self.port = free_port()
        self.lock = threading.Lock()
        self.stored: list[dict[str, Any]] = []
        self._ids: set[tuple[str, str]] = set()
        self._lago_ids = itertools.count(1)
        self.metrics: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.entities: dict[str, dict[str, Any]] = {"default": {"code": "default", "timezone": "UTC",
                                                                "invoice_grace_period": 0}}
        self.subscriptions: list[Subscription] = []
        self.invoices: list[Invoice] = []
        self.clock = now or datetime(2000, 1, 1, tzinfo=UTC)
        self.calls = 0              # event batches received
        self.reads = 0              # GETs received
        self.outage = 0             # answer 503 to the next N batches
        self.rate_limit = 0         # answer 429 to the next N batches
        self.rate_limit_reset = "0"  # X-RateLimit-Reset sent with them
        self.fail_after_store = 0   # store the batch, then answer 500, N times
        self.reads_down = False     # answer 503 to every GET
        self.hold_answers = threading.Event()
        app = Starlette(routes=[
            Route("/api/v1/events/batch", self._batch, methods=["POST"]),
            Route("/api/v1/billable_metrics/{code}", self._metric, methods=["GET"]),
            Route("/api/v1/subscriptions", self._subscriptions, methods=["GET"]),
            Route("/api/v1/customers/{external_id}", self._customer, methods=["GET"]),
            Route("/api/v1/billing_entities/{code}", self._entity, methods=["GET"]),
        ])
        self._server = ThreadedServer(app, "127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeLago:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    # -- set-up, as an operator would do in Lago -------------------------------------

    def add_metric(self, code: str, aggregation_type: str = "sum_agg", field_name: str | None = "value",
                   **extra: Any) -> None:
        self.metrics[code] = {"code": code, "name": code, "aggregation_type": aggregation_type,
                              "field_name": None if aggregation_type == "count_agg" else field_name,
                              "recurring": False, "expression": None, "filters": [], **extra}

    def add_customer(self, external_id: str, timezone: str | None = None, grace_days: int | None = None) -> None:
        self.customers[external_id] = {"external_id": external_id, "timezone": timezone,
                                       "billing_entity_code": "default", "invoice_grace_period": grace_days}

    def subscribe(self, external_id: str, customer: str, started_at: datetime, *, plan_code: str = "basic",
                  interval: str = "monthly") -> Subscription:
        if customer not in self.customers:
            self.add_customer(customer)
        record = Subscription(f"sub-{next(self._lago_ids)}", external_id, customer, plan_code, interval, started_at)
        with self.lock:
            self.subscriptions.append(record)
        return record

    def terminate(self, external_id: str, at: datetime) -> Subscription:
        """Terminate the active record at ``at`` and invoice it at once (advance the
        clock to ``at`` first)."""
        with self.lock:
            record = next(s for s in self.subscriptions if s.external_id == external_id and s.terminated_at is None)
            record.terminated_at = at
            start = self._period_start(record, at)
            self._invoice(record, max(start, record.started_at), at, "termination", at)
        return record

    def upgrade(self, external_id: str, at: datetime, plan_code: str) -> Subscription:
        """As lago-api's ActivateService: the new record starts at ``at``; the old one is
        terminated a few milliseconds later (its own ``Time.current``), so the two
        records' charge windows overlap by those milliseconds."""
        old = self.terminate(external_id, at + timedelta(milliseconds=3))
        return self.subscribe(external_id, old.customer, at, plan_code=plan_code, interval=old.interval)

    # -- the clock ---------------------------------------------------------------------

    def advance(self, to: datetime) -> None:
        """Run Lago's hourly jobs (billing at :10, finalizing at :20) up to ``to``."""
        tick = self.clock.replace(minute=0, second=0, microsecond=0)
        while tick <= to:
            for minute, job in ((10, self._bill), (20, self._finalize_due)):
                at = tick + timedelta(minutes=minute)
                if self.clock < at <= to:
                    with self.lock:
                        job(at)
            tick += timedelta(hours=1)
        self.clock = max(self.clock, to)

    def timezone(self, customer: str) -> str:
        return self.customers[customer]["timezone"] or self.entities["default"]["timezone"]

    def grace_days(self, customer: str) -> int:
        grace = self.customers[customer]["invoice_grace_period"]
        return int(self.entities["default"]["invoice_grace_period"] if grace is None else grace)

    def _local(self, record: Subscription, instant: datetime) -> datetime:
        return instant.astimezone(zoneinfo.ZoneInfo(self.timezone(record.customer)))

    def _midnight(self, record: Subscription, day: date) -> datetime:
        tz = zoneinfo.ZoneInfo(self.timezone(record.customer))
        return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)

    def _billing_day(self, record: Subscription, day: date) -> bool:
        return day.day == 1 if record.interval == "monthly" else day.weekday() == 0

    def _period_start(self, record: Subscription, instant: datetime) -> datetime:
        """Local midnight of the last billing day at or before ``instant``."""
        day = self._local(record, instant).date()
        while not self._billing_day(record, day):
            day -= timedelta(days=1)
        return self._midnight(record, day)

    def _bill(self, at: datetime) -> None:
        for record in self.subscriptions:
            if record.terminated_at is not None:
                continue
            today = self._local(record, at).date()
            if not self._billing_day(record, today):
                continue
            end = self._midnight(record, today)
            if self._local(record, record.started_at).date() >= today:
                continue  # Lago skips subscriptions started today or later
            if any(i.subscription is record and i.reason == "subscription_periodic" and i.to == end
                   for i in self.invoices):
                continue
            start = self._period_start(record, end - timedelta(microseconds=1))
            self._invoice(record, max(start, record.started_at), end, "subscription_periodic", at)

    def _invoice(self, record: Subscription, start: datetime, end: datetime, reason: str, at: datetime) -> None:
        grace = self.grace_days(record.customer)
        invoice = Invoice(record, start, end, reason, "draft",
                          self._local(record, at).date() + timedelta(days=grace))
        self.invoices.append(invoice)
        if grace == 0:
            self._finalize(invoice)

    def _finalize_due(self, at: datetime) -> None:
        for invoice in self.invoices:
            if invoice.status == "draft" and invoice.finalize_on <= self._local(invoice.subscription, at).date():
                self._finalize(invoice)

    def _finalize(self, invoice: Invoice) -> None:
        """Fees from the events stored now; a final invoice never changes again."""
        invoice.units = self._units(invoice)
        invoice.status = "finalized"

    def _units(self, invoice: Invoice) -> dict[str, Decimal]:
        record = invoice.subscription
        inside = []
        for event in self.stored:
            timestamp = _timestamp(event)
            # As the event stores aggregate: by external_subscription_id and a timestamp
            # inside the charges window (clipped to started_at/terminated_at, both
            # inclusive), not by the record an event was attributed to.
            if event.get("external_subscription_id") != record.external_id or event["code"] not in self.metrics:
                continue
            if not invoice.from_ <= timestamp or not (timestamp < invoice.to if invoice.reason != "termination"
                                                      else timestamp <= invoice.to):
                continue
            inside.append((timestamp, event))
        units: dict[str, Decimal] = {}
        for code, metric in self.metrics.items():
            events = [(t, e) for t, e in inside if e["code"] == code]
            kind = metric["aggregation_type"]
            if kind == "count_agg":
                units[code] = Decimal(len(events))
                continue
            values = [(t, v) for t, e in events if (v := self._value(e, metric["field_name"])) is not None]
            if kind == "sum_agg":
                units[code] = sum((v for _, v in values), Decimal(0))
            elif kind == "max_agg":
                units[code] = max((v for _, v in values), default=Decimal(0))
            elif kind == "latest_agg":
                units[code] = max(values, key=lambda tv: tv[0])[1] if values else Decimal(0)
            elif kind == "unique_count_agg":
                units[code] = Decimal(len({v for _, v in values}))
        return units

    def _value(self, event: dict[str, Any], name: str | None) -> Decimal | None:
        raw = (event.get("properties") or {}).get(name) if name else None
        if raw is None:
            return None
        try:
            value = Decimal(str(raw))
        except InvalidOperation:
            return None
        if self.store == "clickhouse" and abs(value) >= CLICKHOUSE_LIMIT:
            return Decimal(0)  # toDecimal128OrZero(value, 26): 12 integer digits at most
        return value

    # -- what tests read -------------------------------------------------------------------

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """Everything received, summed per (external_subscription_id, code)."""
        sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        with self.lock:
            for event in self.stored:
                value = Decimal(str(event["properties"]["value"]))
                sums[(event["external_subscription_id"], event["code"])] += value
        return dict(sums)

    def final_invoices(self) -> list[Invoice]:
        with self.lock:
            return [i for i in self.invoices if i.status == "finalized"]

    # -- HTTP ------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def _batch(self, request: Request) -> Response:
        with self.lock:
            self.calls += 1
            if not self._authorized(request):
                return JSONResponse({"status": 401, "error": "Unauthorized"}, status_code=401)
            if self.outage > 0:
                self.outage -= 1
                return JSONResponse({"status": 503, "error": "Service Unavailable"}, status_code=503)
            if self.rate_limit > 0:
                self.rate_limit -= 1
                return JSONResponse(
                    {"status": 429, "error": "Too Many Requests"}, status_code=429,
                    headers={"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": self.rate_limit_reset},
                )
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"status": 400, "error": "BadRequest: invalid JSON"}, status_code=400)
        if not isinstance(body, dict) or "events" not in body:
            return JSONResponse({"status": 400, "error": "BadRequest: param is missing or the value is "
                                 "empty: events"}, status_code=400)
        events = body["events"]
        if not isinstance(events, list) or not events:
            return _unprocessable({"events": ["no_events"]})
        if len(events) > self.batch_max:
            return _unprocessable({"events": ["too_many_events"]})
        with self.lock:
            errors: dict[str, dict[str, list[str]]] = {}
            seen_in_batch: set[tuple[str, str]] = set()
            fresh = []
            for index, event in enumerate(events):
                problems = _validate(event)
                key = (str(event.get("external_subscription_id") or ""), str(event.get("transaction_id")))
                repeat = key in self._ids or key in seen_in_batch
                if not problems and repeat and self.store == "postgres":
                    problems["transaction_id"] = ["value_already_exist"]
                seen_in_batch.add(key)
                if problems:
                    errors[str(index)] = problems
                elif not repeat:
                    fresh.append((key, event))
            if errors:
                return _unprocessable(errors)
            stored = []
            for key, event in fresh:  # the ClickHouse store keeps the first copy only
                record = {**event, "lago_id": f"lago-{next(self._lago_ids)}"}
                self._ids.add(key)
                self.stored.append(record)
                stored.append(record)
            if self.fail_after_store > 0:
                self.fail_after_store -= 1
                return JSONResponse({"status": 500, "error": "Internal Server Error"}, status_code=500)
        while self.hold_answers.is_set():
            await asyncio.sleep(0.02)
        return JSONResponse({"events": stored})

    def _read_refusal(self, request: Request) -> Response | None:
        with self.lock:
            self.reads += 1
        if not self._authorized(request):
            return JSONResponse({"status": 401, "error": "Unauthorized"}, status_code=401)
        if self.reads_down:
            return JSONResponse({"status": 503, "error": "Service Unavailable"}, status_code=503)
        return None

    async def _metric(self, request: Request) -> Response:
        if (refusal := self._read_refusal(request)) is not None:
            return refusal
        metric = self.metrics.get(request.path_params["code"])
        if metric is None:
            return _not_found("billable_metric")
        return JSONResponse({"billable_metric": metric})

    async def _subscriptions(self, request: Request) -> Response:
        if (refusal := self._read_refusal(request)) is not None:
            return refusal
        statuses = request.query_params.getlist("status[]") or ["active"]
        external_id = request.query_params.get("external_id")
        page = int(request.query_params.get("page", "1"))
        per_page = int(request.query_params.get("per_page", "100"))
        with self.lock:
            found = [s.json() for s in self.subscriptions
                     if s.status in statuses and (external_id is None or s.external_id == external_id)]
        pages = max(1, -(-len(found) // per_page))
        chunk = found[(page - 1) * per_page: page * per_page]
        return JSONResponse({"subscriptions": chunk, "meta": {
            "current_page": page, "next_page": page + 1 if page < pages else None,
            "prev_page": page - 1 if page > 1 else None, "total_pages": pages, "total_count": len(found)}})

    async def _customer(self, request: Request) -> Response:
        if (refusal := self._read_refusal(request)) is not None:
            return refusal
        customer = self.customers.get(request.path_params["external_id"])
        if customer is None:
            return _not_found("customer")
        return JSONResponse({"customer": {
            "external_id": customer["external_id"], "timezone": customer["timezone"],
            "applicable_timezone": self.timezone(customer["external_id"]),
            "billing_entity_code": customer["billing_entity_code"],
            "billing_configuration": {"invoice_grace_period": customer["invoice_grace_period"]},
        }})

    async def _entity(self, request: Request) -> Response:
        if (refusal := self._read_refusal(request)) is not None:
            return refusal
        entity = self.entities.get(request.path_params["code"])
        return JSONResponse({"billing_entity": entity}) if entity else _not_found("billing_entity")


def _timestamp(event: dict[str, Any]) -> datetime:
    """Unix seconds to the microsecond, parsed as a decimal (a float would misplace a
    millisecond and with it the subscription an event belongs to)."""
    seconds = Decimal(str(event["timestamp"]))
    whole = int(seconds // 1)
    return datetime.fromtimestamp(whole, UTC) + timedelta(microseconds=int((seconds - whole) * 1_000_000))


def _validate(event: Any) -> dict[str, list[str]]:
    """What Lago checks at the door: transaction_id, code, and a parsable timestamp."""
    if not isinstance(event, dict):
        return {"event": ["invalid_format"]}
    problems: dict[str, list[str]] = {}
    for name in ("transaction_id", "code"):
        if not event.get(name):
            problems[name] = ["value_is_mandatory"]
    timestamp = event.get("timestamp")
    if timestamp is not None:
        try:
            float(timestamp)
        except (TypeError, ValueError):
            problems["timestamp"] = ["invalid_format"]
    return problems


def _unprocessable(details: dict[str, Any]) -> Response:
    return JSONResponse({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                         "error_details": details}, status_code=422)


def _not_found(resource: str) -> Response:
    return JSONResponse({"status": 404, "error": "Not Found", "code": f"{resource}_not_found"}, status_code=404)
