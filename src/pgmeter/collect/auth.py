"""Who may post to the collector's push sources (HTTP ingest, OTLP logs).

The api's bearer tokens, by the api's own middleware (:class:`pgmeter.api.auth.AuthMiddleware`):
``authTokens`` maps a token to a namespace, a request without a valid token gets the
api's 401 problem+json. Only the operational endpoints stay open, as they hold no
usage: probes must work without a Secret, and Prometheus scrapes without one.

A token is bound to its namespace here too: a pipeline that names a ``namespace``
takes only that namespace's tokens (403 for another's), so in a collector with one
pipeline per tenant a tenant cannot post into another tenant's pipeline, which
delivers with that tenant's token.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from pgmeter.api.problems import problem_response
from pgmeter.config import PipelineConfig

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def protects(path: str) -> bool:
    return path not in OPEN_PATHS


def refusal(request: Request, pipeline: PipelineConfig) -> Response | None:
    """403 when the request's token belongs to a namespace this pipeline does not take;
    None to go on (auth off, the pipeline takes any token, or the namespace matches)."""
    namespace = request.scope.get("state", {}).get("namespace")  # set by the middleware: auth on
    if namespace is None or pipeline.namespace is None or namespace == pipeline.namespace:
        return None
    return problem_response(403, f"this token is for namespace {namespace!r}; this source collects for "
                                 f"namespace {pipeline.namespace!r}")
