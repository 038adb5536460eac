"""Group commit and the wire format, without servers: a fake JetStream that acks on command."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import nats.errors
import pytest
from nats.js.errors import NoStreamResponseError

from pgmeter.config import Settings
from pgmeter.ingest import wire
from pgmeter.ingest.cloudevents import EventTuple
from pgmeter.ingest.publisher import Publisher, PublishUnavailable


class FakeNC:
    def __init__(self, max_payload: int = 1024 * 1024) -> None:
        self.max_payload = max_payload
        self.is_connected = True


class FakeJS:
    """Records each publish and holds it until the test acks (or fails) it."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.pending: list[asyncio.Future[None]] = []
        self.auto_ack = False

    async def publish(self, subject: str, payload: bytes, timeout: float | None = None) -> None:
        self.published.append((subject, payload))
        if self.auto_ack:
            return
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(ack)
        await ack

    def ack(self, index: int, error: BaseException | None = None) -> None:
        if error is None:
            self.pending[index].set_result(None)
        else:
            self.pending[index].set_exception(error)

    def events(self, index: int) -> list[list[Any]]:
        return json.loads(self.published[index][1])["events"]  # type: ignore[no-any-return]


def settings(**ingest: Any) -> Settings:
    return Settings(nats={"subject_prefix": "p.events"}, ingest={"linger": timedelta(milliseconds=50), **ingest})


def events(prefix: str, count: int, data_size: int = 0) -> list[EventTuple]:
    data = json.dumps({"pad": "x" * data_size}) if data_size else None
    return [(f"{prefix}-{n}", "src", "t", "subj", 1_700_000_000_000_000 + n, data) for n in range(count)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make(js: FakeJS, nc: FakeNC | None = None, **ingest: Any) -> Publisher:
    return Publisher(nc or FakeNC(), js, settings(**ingest))  # type: ignore[arg-type]


def test_concurrent_requests_share_one_message_and_wait_for_its_ack() -> None:
    async def run() -> None:
        js = FakeJS()
        publisher = make(js)
        requests = [asyncio.ensure_future(publisher.publish("default", publisher.encode(events(f"r{n}", 2))))
                    for n in range(10)]
        await settle()
        assert len(js.published) == 1
        assert js.published[0][0] == "p.events.default"
        assert [e[0] for e in js.events(0)] == [f"r{n}-{i}" for n in range(10) for i in range(2)]
        assert not any(r.done() for r in requests)  # nothing is answered before the ack
        js.ack(0)
        await asyncio.gather(*requests)

    asyncio.run(run())


def test_while_a_message_is_in_flight_the_next_batch_gathers_until_its_ack() -> None:
    async def run() -> None:
        js = FakeJS()
        publisher = make(js)
        first = asyncio.ensure_future(publisher.publish("default", publisher.encode(events("a", 1))))
        await settle()
        later = [asyncio.ensure_future(publisher.publish("default", publisher.encode(events(f"b{n}", 1))))
                 for n in range(5)]
        await settle()
        assert len(js.published) == 1  # the others wait for the broker
        js.ack(0)
        await first
        await settle()
        assert len(js.published) == 2 and len(js.events(1)) == 5
        js.ack(1)
        await asyncio.gather(*later)

    asyncio.run(run())


def test_linger_bounds_the_wait_behind_a_slow_ack() -> None:
    async def run() -> None:
        js = FakeJS()
        publisher = make(js)
        first = asyncio.ensure_future(publisher.publish("default", publisher.encode(events("slow", 1))))
        await settle()
        second = asyncio.ensure_future(publisher.publish("default", publisher.encode(events("next", 1))))
        await asyncio.sleep(0.2)  # linger is 50 ms; the first ack never came
        assert len(js.published) == 2
        js.ack(1)
        await second
        assert not first.done()
        js.ack(0)
        await first

    asyncio.run(run())


def test_max_batch_events_splits_and_a_request_waits_for_all_its_messages() -> None:
    async def run() -> None:
        js = FakeJS()
        publisher = make(js, maxBatchEvents=4)
        request = asyncio.ensure_future(publisher.publish("default", publisher.encode(events("big", 10))))
        await settle()
        assert [len(js.events(i)) for i in range(len(js.published))] == [4, 4, 2]
        js.ack(0)
        js.ack(2)
        await settle()
        assert not request.done()
        js.ack(1)
        await request

    asyncio.run(run())


def test_messages_respect_the_servers_max_payload() -> None:
    async def run() -> None:
        js = FakeJS()
        js.auto_ack = True
        nc = FakeNC(max_payload=4096)
        publisher = make(js, nc)
        requests = [publisher.publish("default", publisher.encode(events(f"p{n}", 3, data_size=500)))
                    for n in range(6)]
        await asyncio.gather(*requests)
        assert len(js.published) > 1
        assert all(len(payload) <= 4096 for _, payload in js.published)
        stored = [e[0] for i in range(len(js.published)) for e in js.events(i)]
        assert sorted(stored) == sorted(f"p{n}-{i}" for n in range(6) for i in range(3))
        with pytest.raises(wire.EventTooLarge):
            publisher.encode(events("huge", 1, data_size=5000))

    asyncio.run(run())


@pytest.mark.parametrize("error", [nats.errors.TimeoutError(), TimeoutError(), NoStreamResponseError(),
                                   nats.errors.ConnectionClosedError()])
def test_a_failed_message_fails_every_request_in_it(error: BaseException) -> None:
    """Requests group-committed into shared messages; the last message fails.

    Both requests with events in it fail - the one spanning an acknowledged message
    and the failed one, and the one wholly in the failed message - and only those.
    """
    async def run() -> None:
        js = FakeJS()
        publisher = make(js, maxBatchEvents=3)
        publisher._resync = lambda: None  # type: ignore[method-assign]

        def request(name: str, count: int) -> asyncio.Future[None]:
            return asyncio.ensure_future(publisher.publish("default", publisher.encode(events(name, count))))

        lead = request("lead", 1)  # published at once; the rest gathers behind it
        await settle()
        rest = [request("ok", 2), request("span", 4), request("after", 1)]
        await settle()
        js.ack(0)
        await settle()
        assert [[e[0] for e in js.events(i)] for i in range(len(js.published))] == [
            ["lead-0"], ["ok-0", "ok-1"], ["span-0", "span-1", "span-2"], ["span-3", "after-0"]]
        js.ack(1)
        js.ack(2)
        js.ack(3, error)
        await lead
        ok, span, after = await asyncio.gather(*rest, return_exceptions=True)
        assert ok is None
        assert isinstance(span, PublishUnavailable) and isinstance(after, PublishUnavailable)

    asyncio.run(run())


def test_not_connected_is_unavailable_at_once() -> None:
    async def run() -> None:
        nc = FakeNC()
        nc.is_connected = False
        js = FakeJS()
        with pytest.raises(PublishUnavailable):
            await make(js, nc).publish("default", [(b"[]", 1)])
        assert js.published == []

    asyncio.run(run())


def test_namespaces_never_share_a_message() -> None:
    async def run() -> None:
        js = FakeJS()
        js.auto_ack = True
        publisher = make(js)
        await asyncio.gather(publisher.publish("a", publisher.encode(events("x", 1))),
                             publisher.publish("b", publisher.encode(events("y", 1))))
        assert sorted(subject for subject, _ in js.published) == ["p.events.a", "p.events.b"]

    asyncio.run(run())


def test_wire_round_trip() -> None:
    sent = events("w", 3, data_size=10) + [("ünï", "s", "t", "subj", -5, '{"a":"\\"quoted\\""}')]
    payload = wire.build_message(123, [fragment for fragment, _ in wire.encode_chunks(sent, 10_000, 100)])
    decoded = wire.decode(payload)
    assert decoded.ingested_at == 123 and decoded.bad == []
    assert [event for _, event in decoded.events] == sent


@pytest.mark.parametrize("payload,reason", [
    (b"\x00\x01", "not valid JSON"), (b"[]", "v1"), (b'{"v":1,"at":0,"events":[]}', "integer"),
    (b'{"v":1,"at":1,"events":{}}', "events"),
])
def test_wire_rejects_whole_messages(payload: bytes, reason: str) -> None:
    decoded = wire.decode(payload)
    assert decoded.events == [] and decoded.bad[0].item == -1 and reason in decoded.bad[0].reason


@pytest.mark.parametrize("event", [
    ["id", "s", "t", "subj", 1], ["", "s", "t", "subj", 1, None], ["id", 5, "t", "subj", 1, None],
    ["id", "s", "t", "subj", "1", None], ["id", "s", "t", "subj", 1.5, None], ["id", "s", "t", "subj", True, None],
    ["id", "s", "t", "subj", 1, {"a": 1}], ["id", "s", "t", "subj", 1, "[1]"], ["i\u0000d", "s", "t", "subj", 1, None],
])
def test_wire_quick_check_rejects(event: list[Any]) -> None:
    assert wire.quick_check(event) is not None
