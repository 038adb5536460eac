"""Structured logs: one JSON object per line, request ids, no payloads or secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pgmeter import logs
from pgmeter.config import Settings
from tests.support.app import AppServer
from tests.support.ingest import make_event, post_events

SECRET_TOKEN = "tok-very-secret-0123456789abcdef"
PAYLOAD_MARK = "payload-must-not-be-logged"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    logs.configure("info")
    # The test's own HTTP client logs its URLs; only the server's lines are under test.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stream = io.StringIO()
    root.handlers[0].stream = stream  # type: ignore[attr-defined]
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_logs_are_json_with_request_ids_and_no_payloads(settings: Settings, captured: io.StringIO) -> None:
    settings.auth_tokens = {SECRET_TOKEN: "default"}
    with AppServer(settings, {"api", "sink"}) as app, app.client() as client:
        headers = {"Authorization": f"Bearer {SECRET_TOKEN}", "x-request-id": "req-logs-1"}
        good = make_event(data={"note": PAYLOAD_MARK})
        bad = make_event(data={"note": PAYLOAD_MARK}, specversion="9.9")
        assert post_events(client, good, content_type=None).status_code == 401  # no token
        client.headers.update(headers)
        assert post_events(client, good).status_code == 204
        refused = post_events(client, [good, bad])
        assert refused.status_code == 400
        assert client.get(f"/api/v1/nowhere?secret={PAYLOAD_MARK}").status_code == 404
    lines = [line for line in captured.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    refusals = [e for e in entries if e["message"] == "request refused"]
    assert {(e["route"], e["status"]) for e in refusals} >= {("/api/v1/events", 400), ("unmatched", 404)}
    assert all(e.get("request_id") for e in refusals)
    assert any(e.get("request_id") == "req-logs-1" and e["status"] == 400 for e in refusals)
    text = captured.getvalue()
    assert PAYLOAD_MARK not in text
    assert SECRET_TOKEN not in text
