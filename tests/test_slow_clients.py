"""Slow and idle clients are timed out: headers, bodies and idle keep-alive connections.

Raw sockets, because an HTTP client library always sends whole requests.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.ingest import make_event

DEADLINE = timedelta(seconds=1)
BOUND = 10.0  # generous: the deadline is 1 s


@pytest.fixture
def app(settings: Settings) -> Iterator[AppServer]:
    server = settings.server.model_copy(update={"header_timeout": DEADLINE, "body_timeout": DEADLINE,
                                                "keep_alive": DEADLINE})
    with AppServer(settings.model_copy(update={"server": server}), {"api"}) as running:
        yield running


def connect(app: AppServer) -> socket.socket:
    sock = socket.create_connection((app.settings.listen_host, app.settings.listen_port), timeout=BOUND + 5)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def problem_of(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


def test_a_connection_that_sends_nothing_is_closed(app: AppServer) -> None:
    with connect(app) as sock:
        raw, took = read_until_closed(sock)
    status, headers, body = problem_of(raw)
    assert status == 408 and headers["content-type"] == "application/problem+json"
    assert body["status"] == 408 and "headers" in str(body["detail"])
    assert took < BOUND


def test_partial_headers_are_closed_within_the_deadline(app: AppServer) -> None:
    with connect(app) as sock:
        sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: pgmeter\r\nContent-Type: application/json\r\n")
        time.sleep(0.3)
        sock.sendall(b"X-Slow: still-coming\r\n")  # trickling bytes do not extend the deadline
        raw, took = read_until_closed(sock)
    assert problem_of(raw)[0] == 408
    assert took < BOUND


def test_a_slow_body_gets_408(app: AppServer) -> None:
    body = json.dumps(make_event()).encode()
    with connect(app) as sock:
        sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: pgmeter\r\n"
                     b"Content-Type: application/cloudevents+json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        raw, took = read_until_closed(sock)
    status, headers, problem = problem_of(raw)
    assert status == 408 and headers["content-type"] == "application/problem+json"
    assert "body" in str(problem["detail"])
    assert took < BOUND
    with app.client() as client:
        text = client.get("/metrics").text
    assert 'pgmeter_http_client_timeouts_total{phase="body"}' in text


def test_an_idle_keep_alive_connection_is_closed(app: AppServer) -> None:
    with connect(app) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: pgmeter\r\n\r\n")
        raw, took = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b'{"status":"ok"}')  # answered, then closed
    assert took < BOUND


def test_requests_that_arrive_in_pieces_within_the_deadlines_work(app: AppServer) -> None:
    body = json.dumps(make_event()).encode()
    with connect(app) as sock:
        for _ in range(2):  # two requests on one kept-alive connection
            sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: pgmeter\r\n")
            time.sleep(0.1)
            sock.sendall(b"Content-Type: application/cloudevents+json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
            time.sleep(0.1)
            sock.sendall(body[5:])
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 204 "), answer
            body = json.dumps(make_event()).encode()


def test_a_slow_body_on_a_starlette_handler_is_no_error(app: AppServer, caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"slug": "slow", "eventType": "t", "aggregation": "COUNT"}).encode()
    with caplog.at_level(logging.INFO), connect(app) as sock:
        sock.sendall(b"POST /api/v1/meters HTTP/1.1\r\nHost: pgmeter\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        raw, took = read_until_closed(sock)
        time.sleep(0.2)  # the handler sees the disconnect after the connection closed
    assert problem_of(raw)[0] == 408 and took < BOUND
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]
