"""Prometheus series of the ingest path (api and sink).

The two ``openmeter_*`` counters keep the names OpenMeter dashboards use. Each is
counted only once the thing it counts is durable: ingested after the JetStream ack,
processed after the Postgres COMMIT (and only events stored for the first time).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_INGESTED = Counter(
    "openmeter_events_ingested", "Events accepted by the api and acknowledged by JetStream", ["namespace"])
EVENTS_PROCESSED = Counter(
    "openmeter_events_processed", "Events committed to Postgres for the first time by the sink", ["namespace"])
EVENTS_DUPLICATE = Counter(
    "pgmeter_events_duplicate", "Events the sink dropped because (namespace, source, id) was already stored",
    ["namespace"])
DEAD_LETTERS = Counter(
    "pgmeter_dead_letters", "Messages or single events the sink could not store, kept in dead_letters")
INGEST_REJECTED = Counter(
    "pgmeter_ingest_rejected", "Ingest requests answered with an error, by status", ["status"])
PUBLISH_MESSAGES = Counter(
    "pgmeter_ingest_messages", "JetStream messages published by the api (group-committed batches)")
SINK_PENDING = Gauge(
    "pgmeter_sink_pending_messages", "Messages in the stream not yet delivered to the sink consumer")
SINK_ACK_PENDING = Gauge(
    "pgmeter_sink_ack_pending_messages", "Messages delivered to a sink and not yet acknowledged")
SINK_BATCH_EVENTS = Histogram(
    "pgmeter_sink_batch_events", "Events per sink transaction",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000))
# From the moment JetStream stored a message (and so acknowledged it to the api)
# to the moment the sink's transaction holding its events committed.
ACK_TO_COMMIT = Histogram(
    "pgmeter_sink_ack_to_commit_seconds", "Time from the JetStream ack of a message to the commit of its events",
    buckets=(0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
             0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60))
