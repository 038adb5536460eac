"""The console's page and files: served without a token, complete, nothing else exposed."""

from __future__ import annotations

import re
from importlib import resources

from pgmeter.config import Settings
from tests.support.app import AppServer


def test_console_loads_without_a_token_and_only_its_files(settings: Settings) -> None:
    settings.auth_tokens = {"console-test-token-01": "default"}
    with AppServer(settings, {"api"}) as server, server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # Every file the page and its modules name is served (no token: they hold no data).
        static = resources.files("pgmeter.console").joinpath("static")
        names = set(re.findall(r'"/console/([\w./-]+)"', page.text))
        names |= {f"views/{n}" for n in re.findall(r'"\./views/([\w-]+\.js)"', static.joinpath("app.js").read_text())}
        assert {"app.js", "style.css", "vendor/chart.umd.min.js", "views/query.js"} <= names
        for name in names:
            response = client.get(f"/console/{name}")
            assert response.status_code == 200, name
            assert response.content == static.joinpath(name).read_bytes()
        assert client.get("/api/v1/openapi.json").status_code == 200
        # The data still needs the token, and the static mount serves nothing outside its folder.
        assert client.get("/api/v1/meters").status_code == 401
        assert client.get("/console/../routes.py").status_code == 404
        assert client.get("/console/%2e%2e/routes.py").status_code == 404
