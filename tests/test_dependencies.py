"""A dependency's state logs one line per outage and one per recovery, and flapping stays quiet."""

from __future__ import annotations

import logging

import pytest

from pgmeter import dependencies
from pgmeter.dependencies import Dependency


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pgmeter.dependencies"]


def test_one_line_per_change_and_counted_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = Dependency("dep_a")
    before = dependencies.DEPENDENCY_ERRORS.labels("dep_a")._value.get()
    for _ in range(50):
        state.failed("disconnected")
    state.recovered()
    state.recovered()
    assert dependencies.DEPENDENCY_ERRORS.labels("dep_a")._value.get() - before == 50
    assert [level for level, _ in lines(caplog)] == [logging.WARNING, logging.INFO]
    assert lines(caplog)[0][1] == "dep_a: disconnected"
    assert lines(caplog)[1][1].startswith("dep_a: available again after ")
    assert dependencies.DEPENDENCY_UP.labels("dep_a")._value.get() == 1


def test_flapping_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = Dependency("dep_b")
    for _ in range(20):
        state.failed("timed out")
        state.recovered()
    levels = [level for level, _ in lines(caplog)]
    assert levels[:2] == [logging.WARNING, logging.INFO]
    assert set(levels[2:]) == {logging.DEBUG} and len(levels) == 40


def test_no_outage_while_closing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = Dependency("dep_c")
    state.close()
    state.failed("disconnected")
    assert lines(caplog) == [] and state.up


def test_server_warnings_a_client_controls_are_throttled() -> None:
    from pgmeter.logs import RepeatFilter

    throttle = RepeatFilter(interval=10)
    records = [logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Exceeded concurrency limit.", None,
                                 None) for _ in range(100)]
    for n, record in enumerate(records):
        record.created = 1000.0 + n * 0.5  # 50 s of one warning every half second
    passed = [record for record in records if throttle.filter(record)]
    assert [r.created for r in passed] == [1000.0, 1010.0, 1020.0, 1030.0, 1040.0]
    assert [getattr(r, "repeated", 0) for r in passed] == [0, 19, 19, 19, 19]
