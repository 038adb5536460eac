"""RFC 7807 problem+json, the only error shape the API answers with."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from pgmeter.logs import request_id

log = logging.getLogger("pgmeter.http")

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """Raise anywhere in a handler to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, extensions: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extensions = extensions or {}
        self.headers = headers or {}


def bad_request(detail: str, **extensions: Any) -> Problem:
    return Problem(400, detail, extensions=extensions)


def problem_response(status: int, detail: str = "", *, extensions: dict[str, Any] | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    rid = request_id.get()
    if rid:
        body["instance"] = f"urn:request:{rid}"
    if extensions:
        body["extensions"] = extensions
    return Response(json.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.detail, extensions=exc.extensions, headers=exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else ""
    if exc.status_code == 404 and not detail:
        detail = f"no route for {request.method} {request.url.path}"
    if exc.status_code == 405 and not detail:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return problem_response(exc.status_code, detail, headers=getattr(exc, "headers", None))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # The detail of a 500 is blanked, as OpenMeter does; the log has the traceback
    # (and the request id, which the answer's ``instance`` carries too).
    log.error("unhandled error", exc_info=exc)
    return problem_response(500)


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
