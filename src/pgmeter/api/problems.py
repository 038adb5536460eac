"""RFC 7807 problem+json, the only error shape the API answers with.

Two kinds of unexpected exception reach the bottom of a request:

- the database is unreachable, refuses connections or did not answer in time
  (:func:`unavailable_dependency`): an expected condition during an outage, answered
  503 with ``Retry-After`` and counted on the ``postgres`` dependency, which logs one
  WARNING when the outage starts (pgmeter.dependencies), never a traceback;
- anything else is a bug: 500 with OpenMeter's ``detail`` and ``instance`` (the
  request id, also in the ``x-request-id`` header), and one ERROR line with the
  traceback.

:mod:`pgmeter.api.middleware` catches both around the whole app, inside the request
context, so the answer carries the request id and nothing re-raises to the server
(Starlette's ``Exception`` handler re-raises, which made uvicorn log a second
traceback).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import psycopg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from pgmeter.logs import request_id

log = logging.getLogger("pgmeter.http")

PROBLEM_JSON = "application/problem+json"
# Seconds a client should wait before retrying a request refused for an outage.
UNAVAILABLE_RETRY_AFTER = "2"
INTERNAL_ERROR_DETAIL = "an internal error occurred; quote the instance when reporting it"

# asyncpg's classes for SQLSTATE 08 (connection exception), 53 (insufficient
# resources: too many connections, out of memory or disk, out of shared memory) and
# 57 (operator intervention: shutdown, crash recovery, "the database system is
# starting up", statement cancelled).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    psycopg.OperationalError,
    ConnectionError,  # refused, reset, aborted, broken pipe
    TimeoutError,  # connect, acquire or statement timeout (asyncio.TimeoutError is the same class)
)


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


def unavailable_dependency(exc: BaseException) -> str | None:
    """What made the database unavailable, if ``exc`` (or its cause) says so; else ``None``.

    The answer names the condition only, never a host, port or server message.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(current, _UNAVAILABLE_TYPES) or (
                isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES):
            if isinstance(current, TimeoutError | asyncpg.QueryCanceledError):
                return "the database did not answer in time"
            return "the database is unavailable"
        if isinstance(current, OSError) and current.errno is not None and current.errno in _NETWORK_ERRNOS:
            return "the database is unreachable"
        if isinstance(current, asyncpg.InterfaceError) and "closed" in str(current):
            return "the database connection was lost"  # "connection is closed", "pool is closing"
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _network_errnos() -> frozenset[int]:
    import errno

    names = ("ENETUNREACH", "EHOSTUNREACH", "ENETDOWN", "EHOSTDOWN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET")
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


_NETWORK_ERRNOS = _network_errnos()


def response_for(exc: Exception, scope: Scope) -> Response:
    """The answer to an exception nothing else handled: 503 for an outage, else 500."""
    reason = unavailable_dependency(exc)
    if reason is not None:
        runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
        if runtime is not None:
            runtime.dependency("postgres").failed(reason)
        return problem_response(503, f"{reason}; retry the request later",
                                headers={"Retry-After": UNAVAILABLE_RETRY_AFTER})
    log.error("unhandled error", exc_info=exc, extra={"method": scope.get("method"), "path": scope.get("path")})
    return problem_response(500, INTERNAL_ERROR_DETAIL)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Last resort only: the request middleware answers unexpected exceptions itself.
    return response_for(exc, request.scope)


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
