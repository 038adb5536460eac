"""Dependency outages: Postgres stopped or frozen gives 503 + Retry-After within the
configured bounds (ingest keeps answering 204), a frozen NATS cannot be wedged by
readiness probes, and an outage logs a bounded number of lines.

Every test runs private servers in its own directory, so it may stop, freeze
(SIGSTOP) and restart them without touching the session's.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from pgmeter.config import Settings
from pgmeter.devstack import services
from pgmeter.devstack.process import ManagedProcess, free_port
from tests.support.app import AppServer
from tests.support.ingest import PrivateNats, make_event, post_events

# Small bounds so the test is quick; the assertions allow many times these.
STATEMENT_TIMEOUT = timedelta(seconds=1)
CONNECT_TIMEOUT = timedelta(seconds=1)
ACQUIRE_TIMEOUT = timedelta(seconds=1)
ANSWER_BOUND = 15.0  # generous: statement + rollback + release at 1 s each, on a loaded machine

METER = {"slug": "calls", "eventType": "api.call", "aggregation": "COUNT", "groupBy": {"endpoint": "$.endpoint"}}


def endpoints_needing_postgres() -> list[tuple[str, str, dict[str, object] | None]]:
    """(method, path, JSON body) of every route that reads or writes Postgres."""
    return [
        ("GET", "/api/v1/meters", None),
        ("POST", "/api/v1/meters", {**METER, "slug": "calls_two"}),
        ("GET", "/api/v1/meters/calls", None),
        ("PUT", "/api/v1/meters/calls", {"name": "Calls", "groupBy": {"endpoint": "$.endpoint"}}),
        ("GET", "/api/v1/meters/calls/query", None),
        ("POST", "/api/v1/meters/calls/query", {}),
        ("GET", "/api/v1/meters/calls/subjects", None),
        ("GET", "/api/v1/meters/calls/group-by/endpoint/values", None),
        ("GET", "/api/v1/events", None),
        ("DELETE", "/api/v1/meters/calls", None),
    ]


def call(base_url: str, method: str, path: str, body: dict[str, object] | None) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(base_url=base_url, timeout=60) as client:
        response = client.request(method, path, json=body)
    return response, time.monotonic() - started


def call_all(base_url: str) -> list[tuple[str, str, httpx.Response, float]]:
    """Every Postgres endpoint at once (as clients would), with how long each took."""
    cases = endpoints_needing_postgres()
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [(method, path, pool.submit(call, base_url, method, path, body)) for method, path, body in cases]
        return [(method, path, *future.result()) for method, path, future in futures]


def assert_all_unavailable(base_url: str, port: int) -> None:
    for method, path, response, took in call_all(base_url):
        where = f"{method} {path}"
        assert response.status_code == 503, f"{where}: {response.status_code} {response.text}"
        assert response.headers["content-type"] == "application/problem+json", where
        assert int(response.headers["retry-after"]) >= 1, where
        body = response.json()
        assert body["status"] == 503 and body["detail"] and body["instance"].startswith("urn:request:"), where
        assert str(port) not in response.text and "127.0.0.1" not in response.text, where
        assert took < ANSWER_BOUND, f"{where} took {took:.1f} s"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def postgres_answers(client: httpx.Client) -> bool:
    return client.get("/api/v1/meters").status_code == 200


def assert_all_work_again(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_until(lambda: postgres_answers(client), 60, "Postgres to answer again")
        if client.get("/api/v1/meters/calls").status_code == 404:
            assert client.post("/api/v1/meters", json=METER).status_code == 201
        if client.get("/api/v1/meters/calls_two").status_code == 200:
            assert client.delete("/api/v1/meters/calls_two").status_code == 204
    # One at a time: a PUT rebuilds the meter's rollup, and a concurrent read of it is
    # another matter than the one tested here.
    for method, path, body in endpoints_needing_postgres():
        response, _ = call(base_url, method, path, body)
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text}"


def ingest_works(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        response = post_events(client, [make_event(data={"endpoint": "/a"}) for _ in range(3)])
        assert response.status_code == 204, response.text


@contextmanager
def private_postgres(workdir: Path) -> Iterator[tuple[ManagedProcess, str, int, Callable[[], ManagedProcess]]]:
    from pgmeter.db.migrate import migrate

    port = free_port()
    holder: list[ManagedProcess] = []

    def start() -> ManagedProcess:
        process, _ = services.start_postgres(workdir / "pg", port, log_path=workdir / "pg.log")
        holder.append(process)
        return process

    process = start()
    url = f"postgresql://postgres@127.0.0.1:{port}/pgmeter"
    migrate(url)
    try:
        yield process, url, port, start
    finally:
        for proc in holder:
            _signal_group(proc, signal.SIGCONT)
            proc.stop()


def _signal_group(process: ManagedProcess, sig: int) -> None:
    """The server and all its children: backends call setsid(), so no process group has them all."""
    import psutil

    if process.pid is None or not process.running():
        return
    server = psutil.Process(process.pid)
    for proc in [server, *server.children(recursive=True)]:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def bounded(settings: Settings, postgres_url: str) -> Settings:
    postgres = settings.postgres.model_copy(update={
        "url": postgres_url, "statement_timeout": STATEMENT_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT,
        "acquire_timeout": ACQUIRE_TIMEOUT})
    return settings.model_copy(update={"postgres": postgres})


def test_postgres_stopped_or_frozen_answers_503_and_ingest_goes_on(
        settings: Settings, server_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with private_postgres(server_dir) as (postgres, url, port, restart):
        settings = bounded(settings, url)
        with AppServer(settings, {"api"}) as app, app.client() as client:
            assert client.post("/api/v1/meters", json=METER).status_code == 201
            assert_all_work_again(app.base_url)

            # Stopped: connections refused.
            caplog.clear()
            with caplog.at_level(logging.INFO):
                postgres.stop()
                assert_all_unavailable(app.base_url, port)
                ingest_works(app.base_url)  # NATS is up: events are still taken
            outage_logs = [r for r in caplog.records if r.name.startswith("pgmeter")]
            assert not [r for r in outage_logs if r.levelno >= logging.ERROR or r.exc_info], \
                [r.getMessage() for r in outage_logs]
            warnings = [r for r in outage_logs if r.levelno == logging.WARNING and r.name == "pgmeter.dependencies"]
            assert [r.getMessage().split(":")[0] for r in warnings] == ["postgres"]  # once per outage

            postgres = restart()
            assert_all_work_again(app.base_url)

            # Frozen (SIGSTOP of the server and its backends): connections open, nothing answers.
            # (A second outage this soon is logged at DEBUG: pgmeter.dependencies.FLAP_QUIET.)
            caplog.clear()
            with caplog.at_level(logging.DEBUG):
                _signal_group(postgres, signal.SIGSTOP)
                try:
                    assert_all_unavailable(app.base_url, port)
                    ingest_works(app.base_url)
                finally:
                    _signal_group(postgres, signal.SIGCONT)
                assert_all_work_again(app.base_url)
                wait_until(lambda: any("available again" in r.getMessage() for r in caplog.records), 10,
                           "the recovery to be logged")
            assert not [r for r in caplog.records if r.name.startswith("pgmeter") and
                        (r.levelno >= logging.ERROR or r.exc_info)]
            text = client.get("/metrics").text
            assert 'pgmeter_dependency_errors_total{dependency="postgres"}' in text
            assert 'pgmeter_dependency_up{dependency="postgres"} 1.0' in text


# -- NATS ---------------------------------------------------------------------------------


def _with_nats(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"nats": settings.nats.model_copy(update={"url": url})})


def _ingest_status(client: httpx.Client) -> int:
    try:
        return post_events(client, [make_event(data={"endpoint": "/n"})]).status_code
    except httpx.TransportError:
        return 0


def test_readiness_probes_cannot_wedge_ingest_and_a_broken_client_heals(
        settings: Settings, server_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = PrivateNats(server_dir).start()
    assert broker.process is not None
    try:
        with AppServer(_with_nats(settings, broker.url), {"api"}) as app, app.client() as client:
            assert _ingest_status(client) == 204
            caplog.set_level(logging.INFO)
            os.kill(broker.process.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            try:
                # Probes during the stall answer, and say NATS is not ready.
                for _ in range(3):
                    started = time.monotonic()
                    ready = client.get("/readyz")
                    assert ready.status_code == 503 and ready.json()["checks"]["nats"].startswith("failed: ")
                    assert time.monotonic() - started < 10
                    assert str(broker.port) not in ready.text
                # What used to be the probe: a flush that times out on the shared client.
                # nats-py cancels its PONG future, and the late PONG will kill the read loop.
                with pytest.raises(Exception, match="timeout|Timeout"):
                    app.run(app.runtime.nats.flush(timeout=0.5))
                time.sleep(1)
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)  # type: ignore[arg-type]
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "/readyz to be ok again")
            wait_until(lambda: _ingest_status(client) == 204, 30, "ingest to work again")
            assert [_ingest_status(client) for _ in range(5)] == [204] * 5
            healed = [r for r in caplog.records if "stopped reading" in r.getMessage()]
            assert healed, "the late PONG should have stopped the read loop, and the runtime reconnected"
    finally:
        broker.stop()


def test_a_nats_outage_logs_a_bounded_number_of_lines(
        settings: Settings, server_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = PrivateNats(server_dir).start()
    try:
        with AppServer(_with_nats(settings, broker.url), {"api"}) as app, app.client() as client:
            assert _ingest_status(client) == 204
            statuses: list[int] = []
            stop = threading.Event()

            def produce() -> None:
                with app.client() as producer:
                    while not stop.is_set():
                        statuses.append(_ingest_status(producer))
                        producer.get("/readyz")  # probes fail meanwhile too
                        time.sleep(0.02)

            caplog.clear()
            caplog.set_level(logging.DEBUG)
            thread = threading.Thread(target=produce, daemon=True)
            thread.start()
            try:
                time.sleep(0.5)
                broker.stop()
                # Longer than the publish timeout (5 s): a publish caught by the disconnect
                # waits that long, the ones after it are refused at once.
                time.sleep(7)
                broker.start()
                back = len(statuses)
                wait_until(lambda: statuses[back:][-3:] == [204] * 3, 30, "ingest to recover")
            finally:
                stop.set()
                thread.join(30)
        assert statuses.count(503) >= 3, "the outage should have refused some requests"
        lines = [r for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("httpx")]
        assert len(lines) < 20, [f"{r.name} {r.levelname} {r.getMessage()}" for r in lines]
        assert not [r for r in lines if r.exc_info or r.levelno >= logging.ERROR]
        # One line when the outage starts, one when it ends (none at shutdown).
        messages = [r.getMessage() for r in lines if r.name == "pgmeter.dependencies" and
                    r.getMessage().startswith("nats: ")]
        # Which part notices first (the client's callback or a readiness probe) is a race;
        # either way the outage is one WARNING and its end one INFO.
        assert len(messages) == 2, messages
        starts = [r for r in lines if r.name == "pgmeter.dependencies" and r.getMessage() == messages[0]]
        assert starts[0].levelno == logging.WARNING and "Error" not in messages[0], messages
        assert messages[1].startswith("nats: available again after"), messages
    finally:
        broker.stop()
