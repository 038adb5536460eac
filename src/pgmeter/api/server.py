"""The HTTP server: uvicorn, with deadlines for clients that send slowly or not at all.

uvicorn bounds only the idle time between two requests of a kept-alive connection
(``timeout_keep_alive``). A connection that opens and sends nothing, or sends half
its headers, or a body one byte at a time, is kept for as long as the client likes,
and each holds a socket, a parser and (for bodies) up to ``ingest.maxBodyBytes`` of
memory. Neither httptools nor h11 has a read deadline, so the protocol below adds
two, with the timers of the event loop (no task per request):

- headers: the complete request head must arrive within ``server.headerTimeout`` of
  the connection opening, or of the first byte of a kept-alive connection's next
  request;
- body: the whole body must arrive within ``server.bodyTimeout`` of the headers.

Past either, the client gets 408 problem+json (if no answer was started) and the
connection is closed; a handler waiting for the body sees a disconnect. Timers are
armed only when a read leaves a request incomplete, so the common request whose
head and body arrive in one segment costs nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pgmeter.config import Settings

HTTP_TIMEOUTS = Counter(
    "pgmeter_http_client_timeouts", "Connections closed because the client was too slow, by what it was sending",
    ["phase"])


def _timeout_response(detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": "Request Timeout", "status": 408,
                       "detail": detail}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
    return head + body


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read deadlines (see the module)."""

    header_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between the first byte of a request and the end of its headers
        self._in_body = False  # between the end of the headers and the end of the body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is held to the header deadline too.
        self._in_head = True
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and self._header_timer is None:
            self._arm_header_timer()
        if self._in_body and self._body_timer is None and self.cycle is not None:
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_expired, self.cycle)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self._in_body = True

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_expired)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        HTTP_TIMEOUTS.labels("headers").inc()
        # Between requests (a pipelined response still being written) nothing is sent.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_timeout_response(
                f"request headers were not received within {self.header_timeout:g} s"))
        self.transport.close()

    def _body_expired(self, cycle: Any) -> None:
        self._body_timer = None
        if cycle is not self.cycle or not self._in_body or self.transport.is_closing():
            return
        HTTP_TIMEOUTS.labels("body").inc()
        if not cycle.response_started:
            self.transport.write(_timeout_response(
                f"the request body was not received within {self.body_timeout:g} s"))
        # The handler reading the body sees http.disconnect, and its answer goes nowhere.
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()


def protocol_for(settings: Settings) -> type[DeadlineHttpProtocol]:
    """The protocol class with this configuration's deadlines (uvicorn takes a class)."""
    server = settings.server
    return type("ConfiguredDeadlineHttpProtocol", (DeadlineHttpProtocol,), {
        "header_timeout": server.header_timeout.total_seconds(),
        "body_timeout": server.body_timeout.total_seconds(),
    })


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration every pgmeter listener uses (the CLI and the tests)."""
    options: dict[str, Any] = {
        "host": settings.listen_host,
        "port": settings.listen_port,
        "http": protocol_for(settings),
        "timeout_keep_alive": settings.server.keep_alive.total_seconds(),
        "limit_concurrency": settings.server.limit_concurrency,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
