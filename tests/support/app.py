"""Run pgmeter for a test: in a thread (fast) or as a real subprocess (for kill -9)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn
import yaml

from pgmeter.api.app import create_app
from pgmeter.api.server import uvicorn_config
from pgmeter.config import Settings


class ThreadedServer:
    """Any ASGI app under a real uvicorn server, on its own thread and event loop."""

    def __init__(self, app: object, host: str, port: int, config: uvicorn.Config | None = None) -> None:
        self.config = config or uvicorn.Config(app, host=host, port=port, log_config=None,  # type: ignore[arg-type]
                                               access_log=False, lifespan="on")
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, for tests that reach in

    def start(self) -> None:
        self.server = server = uvicorn.Server(self.config)

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await server.serve()

        self.thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(30)
            self.server = None


class ServedApp:
    """What every test server shares: started by :meth:`start` (the subclass's), stopped
    by :meth:`stop`, and usable as a context manager."""

    _server: ThreadedServer | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AppServer(ServedApp):
    """A real uvicorn server with the given roles, on its own thread and loop."""

    def __init__(self, settings: Settings, roles: frozenset[str] | set[str]) -> None:
        self.settings = settings
        self.roles = frozenset(roles)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.address}"

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's event loop (e.g. on its runtime) and return its result."""
        assert self._server is not None and self._server.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._server.loop).result(timeout)

    @property
    def runtime(self) -> Any:
        assert self._server is not None
        return self._server.config.app.state.runtime  # type: ignore[union-attr]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def start(self) -> AppServer:
        app = create_app(self.settings, self.roles)
        # The production server set-up (deadlines for slow clients included).
        self._server = ThreadedServer(app, self.settings.listen_host, self.settings.listen_port,
                                      uvicorn_config(app, self.settings, timeout_graceful_shutdown=None))
        self._server.start()
        return self


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
    return path


def wait_ready(process: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float) -> None:
    """Until ``/readyz`` answers 200; fails with the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


class PgmeterProcess:
    """``python -m pgmeter ARGS`` as a child process (kill -9 is real), its output in
    ``log``, with none of the test process's PGMETER_* environment."""

    def __init__(self, args: list[str], base_url: str, log: Path) -> None:
        self.args = args
        self.base_url = base_url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGMETER_")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pgmeter", *self.args],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.process is not None
        wait_ready(self.process, self.base_url, self.log, timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode if self.process else None


class RoleProcess(PgmeterProcess):
    """``python -m pgmeter --config ... <role>`` as a child process."""

    def __init__(self, settings: Settings, role: str, workdir: Path) -> None:
        self.settings = settings
        self.role = role
        self.config = write_config(settings, workdir / f"{role}.yaml")
        super().__init__(["--config", str(self.config), role], f"http://{settings.address}", workdir / f"{role}.log")
