"""``/`` and ``/console/*``: the console's page and static files.

They hold no data, so the auth middleware lets them through without a token; the
data comes from ``/api/v1`` with the user's token.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = resources.files("pgmeter.console").joinpath("static")


@cache
def _index() -> str:
    return STATIC.joinpath("index.html").read_text()


async def index(request: Request) -> Response:
    # no-cache: a new release's page must not be paired with an old script.
    return HTMLResponse(_index(), headers={"Cache-Control": "no-cache"})


routes: list[BaseRoute] = [
    Route("/", index, methods=["GET"]),
    Mount("/console", StaticFiles(packages=[("pgmeter.console", "static")]), name="console"),
]
