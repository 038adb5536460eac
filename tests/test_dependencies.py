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
