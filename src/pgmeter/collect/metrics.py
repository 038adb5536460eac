"""The collector's Prometheus metrics, labelled by pipeline."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("pgmeter_collect_received_events_total",
                   "Events a source produced and the buffer accepted", ["pipeline"])
DELIVERED = Counter("pgmeter_collect_delivered_events_total",
                    "Events the endpoint acknowledged (2xx) and the buffer released", ["pipeline"])
DEAD_LETTERED = Counter("pgmeter_collect_dead_lettered_events_total",
                        "Events moved to the buffer's dead letters", ["pipeline", "reason"])
REFUSED = Counter("pgmeter_collect_refused_total",
                  "Source reads refused because the buffer was full (HTTP: answered 503)", ["pipeline"])
DELIVERY_FAILURES = Counter("pgmeter_collect_delivery_failures_total",
                            "Delivery attempts that will be retried, by cause", ["pipeline", "cause"])
BUFFER_EVENTS = Gauge("pgmeter_collect_buffer_events", "Events waiting in the buffer", ["pipeline"])
BUFFER_BYTES = Gauge("pgmeter_collect_buffer_bytes", "Bytes of event text waiting in the buffer", ["pipeline"])
BUFFER_AGE = Gauge("pgmeter_collect_buffer_oldest_age_seconds",
                   "Age of the oldest event waiting in the buffer", ["pipeline"])
DELIVERY_SECONDS = Histogram("pgmeter_collect_delivery_seconds",
                             "Time of one delivery request (acknowledged batches)", ["pipeline"])
