"""The JetStream stream and the sink's durable consumer, created idempotently.

Every role calls :func:`ensure_stream` at start (the api must never publish into
nothing, the sink must never pull from nothing), and the api and sink call it
again when the broker says the stream or consumer is gone (a NATS server that
came back without its store). Creating either with the configuration it already
has is a no-op on the server, so replicas starting together do not conflict.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from pgmeter.config import NatsConfig, SinkConfig, is_namespace
from pgmeter.runtime import Runtime

log = logging.getLogger(__name__)

# JetStream error code: "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058


def subject_for(nats: NatsConfig, namespace: str) -> str:
    return f"{nats.subject_prefix}.{namespace}"


def namespace_of_subject(nats: NatsConfig, subject: str) -> str | None:
    prefix = nats.subject_prefix + "."
    if not subject.startswith(prefix):
        return None
    namespace = subject[len(prefix):]
    # Only a subject our own api could have published names a namespace.
    return namespace if is_namespace(namespace) else None


def stream_config(nats: NatsConfig) -> StreamConfig:
    return StreamConfig(
        name=nats.stream,
        description="pgmeter: validated CloudEvents on their way to Postgres",
        subjects=[f"{nats.subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        # Counted from the time the broker stored the message, never from event time.
        max_age=nats.max_age.total_seconds(),
        num_replicas=nats.replicas,
        duplicate_window=120.0,
    )


def consumer_config(nats: NatsConfig, sink: SinkConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=nats.consumer,
        description="pgmeter sink: acked only after the events are committed in Postgres",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=nats.ack_wait.total_seconds(),
        max_deliver=-1,  # never give up on a message: an unstorable one is dead-lettered by the sink
        # Room for every sink replica to hold a couple of full fetches in flight.
        max_ack_pending=max(10_000, sink.fetch_batch * 20),
        max_waiting=512,
    )


async def ensure(js: JetStreamContext, nats: NatsConfig, sink: SinkConfig) -> None:
    """Create (or bring up to date) the stream and the durable consumer."""
    config = stream_config(nats)
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        # The stream exists with other settings (e.g. a changed maxAge): apply ours.
        log.info("updating stream configuration", extra={"stream": nats.stream})
        await js.update_stream(config)
    await js.add_consumer(nats.stream, consumer_config(nats, sink))


async def ensure_stream(runtime: Runtime) -> None:
    settings = runtime.settings
    await ensure(runtime.js, settings.nats, settings.sink)
