"""What every API handler needs from a request: the runtime, a JSON body, a parameter.

Handlers of every resource (meters, queries, customers, entitlements, portal) share
these, so they live here rather than in any one resource's module.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from starlette.requests import Request

from pgmeter.api.problems import bad_request
from pgmeter.query.params import QueryError, parse_time
from pgmeter.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def json_body(request: Request, *, empty: Any = None) -> Any:
    raw = await request.body()
    if not raw.strip():
        if empty is not None:
            return empty
        raise bad_request("request body must be a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("request body is not valid JSON") from None
    except RecursionError:  # thousands of nested arrays: the parser gives up (was a 500)
        raise bad_request("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def single_param(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise bad_request(f"{name} may be given once", parameter=name)
    return values[0] if values else None


def time_param(name: str, value: Any) -> datetime | None:
    """An optional RFC 3339 parameter (query string or JSON body); 400 naming it if bad."""
    if value is None:
        return None
    try:
        return parse_time(name, value)
    except QueryError as exc:
        raise bad_request(str(exc), parameter=name) from None
