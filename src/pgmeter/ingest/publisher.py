"""Group commit: the events of concurrent requests share JetStream messages.

Awaiting one JetStream ack per request caps an api process at a few thousand
requests per second, and one message per *event* would also make the sink do
per-event broker work. Instead requests hand their encoded events to a buffer per
namespace, and a buffer becomes one message ("is sealed") when

- no message of that namespace is waiting for its ack: at the end of the current
  event-loop turn, so the requests that arrived together leave together and a lone
  request is not delayed at all (a message sealed because it was full does not
  count as waiting: all of a large request's messages leave together);
- otherwise, when the message in flight is acked or the buffer has waited
  ``ingest.linger``, whichever comes first (so under load a batch holds whatever
  arrived during one broker round trip, and ``linger`` bounds the wait);
- or at once when it holds ``ingest.maxBatchEvents`` events or the server's max
  payload would be exceeded.

Each sealed message is published on its own task (several can be in flight), and
a request is answered once every message carrying any of its events is acked - or
fails as a whole, and then nothing is reported as stored that is not. An event is
never split; a large request may span messages. If one of them fails the request
gets a 503 although its other messages were stored: the producer retries and the
sink's dedup on (namespace, source, id) makes that harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from pgmeter.config import Settings
from pgmeter.dependencies import Dependency, describe
from pgmeter.ingest import metrics, stream
from pgmeter.ingest.cloudevents import EventTuple, now_micros
from pgmeter.ingest.wire import ENVELOPE_BYTES, build_message, encode_chunks
from pgmeter.runtime import Runtime, nats_read_loop_alive

log = logging.getLogger(__name__)

# A JetStream ack slower than this means the broker is unwell: the client gets a 503.
PUBLISH_TIMEOUT = 5.0
# Messages in flight per api process; beyond it sealed messages queue for a slot.
MAX_IN_FLIGHT = 64
# Publishes that only time out for this long, on a connection that says it is up,
# mean the connection is dead without knowing it (a peer gone silently, a client
# that stopped reading): it is torn down and reconnected.
STALE_AFTER = 10.0


class PublishUnavailable(Exception):
    """The events could not be stored durably; answer 503 and let the producer retry."""


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[None]
    unsealed: int = 0  # buffers holding some of its events, not yet sealed
    in_flight: int = 0  # sealed messages carrying some of its events, not yet acked

    def settle(self) -> None:
        if self.unsealed == 0 and self.in_flight == 0 and not self.future.done():
            self.future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class _Buffer:
    fragments: list[bytes] = field(default_factory=list)
    requests: list[_Request] = field(default_factory=list)
    events: int = 0
    size: int = 0
    timer: asyncio.Handle | None = None
    paced: bool = False  # sealed by time (not by being full): later buffers wait for its ack


class Publisher:
    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings,
                 state: Dependency | None = None) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        # The ``nats`` dependency: an ack proves it up, a failure counts (and logs once).
        self.state = state or Dependency("nats")
        self._sending: dict[int, float] = {}  # id(buffer) -> when its publish started
        self._timeouts_since: float | None = None  # first of the publish timeouts since the last ack
        self.linger = settings.ingest.linger.total_seconds()
        self.max_events = settings.ingest.max_batch_events
        self._buffers: dict[str, _Buffer] = {}
        self._in_flight: dict[str, int] = {}  # namespace -> time-sealed messages awaiting their ack
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._closed = False
        self._resync_task: asyncio.Task[None] | None = None
        self.budget = self._budget()

    def _budget(self) -> int:
        """The most event bytes one message may carry (server max payload less the envelope).

        Read again after every publish: a reconnect may land on a server with another limit.
        """
        return max(1024, self.nc.max_payload - ENVELOPE_BYTES)

    def encode(self, events: list[EventTuple]) -> list[tuple[bytes, int]]:
        """Encode a request's events into fragments that each fit in one message.

        Raises ``UnicodeEncodeError`` (unpaired surrogates) and
        :class:`pgmeter.ingest.wire.EventTooLarge`; nothing is published then.
        """
        return encode_chunks(events, self.budget, self.max_events)

    async def publish(self, namespace: str, chunks: list[tuple[bytes, int]]) -> None:
        """Return once every fragment is stored in JetStream; raise :class:`PublishUnavailable` if not."""
        if not chunks:
            return
        if self._closed or not self.nc.is_connected or not nats_read_loop_alive(self.nc):
            self.state.failed("not connected")
            raise PublishUnavailable("the event broker (NATS) is not connected")
        request = _Request(asyncio.get_running_loop().create_future())
        budget = self.budget
        buffer = self._buffers.get(namespace)
        for fragment, count in chunks:
            if buffer is not None and (buffer.events + count > self.max_events
                                       or buffer.size + len(fragment) + 1 > budget):
                self._seal(namespace, full=True)
                buffer = None
            if buffer is None:
                buffer = self._open(namespace)
            buffer.fragments.append(fragment)
            buffer.events += count
            buffer.size += len(fragment) + 1
            if not buffer.requests or buffer.requests[-1] is not request:
                buffer.requests.append(request)
                request.unsealed += 1
            if buffer.events >= self.max_events:
                self._seal(namespace, full=True)
                buffer = None
        await request.future

    def _open(self, namespace: str) -> _Buffer:
        buffer = self._buffers[namespace] = _Buffer()
        loop = asyncio.get_running_loop()
        if self._in_flight.get(namespace, 0):
            buffer.timer = loop.call_later(self.linger, self._seal_if_current, namespace, buffer)
        else:
            buffer.timer = loop.call_soon(self._seal_if_current, namespace, buffer)
        return buffer

    def _seal_if_current(self, namespace: str, buffer: _Buffer) -> None:
        if self._buffers.get(namespace) is buffer:
            self._seal(namespace)

    def _seal(self, namespace: str, *, full: bool = False) -> None:
        buffer = self._buffers.pop(namespace)
        if buffer.timer is not None:
            buffer.timer.cancel()
        for request in buffer.requests:
            request.unsealed -= 1
            request.in_flight += 1
        # Only messages sealed by time pace the next batch; a full one says nothing
        # about whether the broker is busy (and a large request's messages all go at once).
        buffer.paced = not full
        if buffer.paced:
            self._in_flight[namespace] = self._in_flight.get(namespace, 0) + 1
        task = asyncio.ensure_future(self._send(namespace, buffer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, namespace: str, buffer: _Buffer) -> None:
        error: BaseException | None = None
        key = id(buffer)
        try:
            async with self._slots:
                payload = build_message(now_micros(), buffer.fragments)
                self._sending[key] = time.monotonic()
                await self.js.publish(stream.subject_for(self.settings.nats, namespace), payload,
                                      timeout=PUBLISH_TIMEOUT)
            metrics.PUBLISH_MESSAGES.inc()
            self.budget = self._budget()
            self._timeouts_since = None
            self.state.recovered()
        except NoStreamResponseError:
            # Nobody listens on the subject: the stream is gone (a broker without its store).
            error = PublishUnavailable("the event stream is missing; it is being recreated")
            self.state.failed("the event stream is missing")
            self._resync()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # The reason names the kind only: a client error's text may carry the broker's address.
            reason = describe(exc) if isinstance(exc, TimeoutError | OSError) else type(exc).__name__
            error = PublishUnavailable(f"the event broker did not acknowledge ({reason})")
            self.state.failed(f"publishes fail ({reason})")
            if isinstance(exc, TimeoutError):
                self._note_timeout()
        except asyncio.CancelledError:
            error = PublishUnavailable("the api is shutting down")
            raise
        except Exception as exc:  # a bug, not an outage; still never report unstored events as stored
            log.exception("publishing a batch failed")
            error = PublishUnavailable(f"publishing failed: {type(exc).__name__}")
        finally:
            self._sending.pop(key, None)
            for request in buffer.requests:
                request.in_flight -= 1
                if error is not None:
                    request.fail(error)
                else:
                    request.settle()
            if buffer.paced:
                self._in_flight[namespace] -= 1
            waiting = self._buffers.get(namespace)
            if waiting is not None and not self._in_flight.get(namespace) and not self._closed:
                # The broker is free again: what gathered meanwhile leaves now.
                self._seal(namespace)

    def stalled_for(self) -> float:
        """How long the oldest publish in flight has waited for its ack (0 when none waits)."""
        if not self._sending:
            return 0.0
        return time.monotonic() - min(self._sending.values())

    def _note_timeout(self) -> None:
        now = time.monotonic()
        if self._timeouts_since is None:
            self._timeouts_since = now
        elif now - self._timeouts_since >= STALE_AFTER and self.nc.is_connected:
            self._timeouts_since = None
            log.warning("nats: no acks for %.0f s on a connection that looks up; reconnecting", STALE_AFTER)
            task = asyncio.ensure_future(self.nc.force_reconnect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resync(self) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.ensure_future(self._recreate_stream())

    async def _recreate_stream(self) -> None:
        try:
            await stream.ensure(self.js, self.settings.nats, self.settings.sink)
            log.warning("recreated the JetStream stream", extra={"stream": self.settings.nats.stream})
        except Exception as exc:
            log.warning("could not recreate the JetStream stream", extra={"error": repr(exc)})

    async def close(self) -> None:
        """Publish what is buffered and wait for the acks (graceful shutdown)."""
        self._closed = True
        for namespace in list(self._buffers):
            self._seal(namespace)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=PUBLISH_TIMEOUT + 1)


async def start(runtime: Runtime) -> None:
    publisher = Publisher(runtime.nats, runtime.js, runtime.settings, runtime.dependency("nats"))
    runtime.publisher = publisher
    runtime.spawn("ingest-publisher", _close_on_shutdown(publisher))


async def _close_on_shutdown(publisher: Publisher) -> None:
    # The runtime cancels its tasks on shutdown; that is our cue to flush.
    try:
        await asyncio.Event().wait()
    finally:
        await publisher.close()


def of(runtime: Runtime) -> Publisher:
    assert runtime.publisher is not None, "the api role starts the publisher"
    return runtime.publisher
