"""A real Prometheus server for the collector's Prometheus source (Debian's `prometheus`).

The binary is taken from ``PGMETER_TEST_PROMETHEUS`` or the PATH, and Debian's package
is installed when it is missing. It scrapes itself every second.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from pgmeter.devstack.process import ManagedProcess, free_port, wait_until
from tests.support.debian import installed


def binary() -> str:
    """``PGMETER_TEST_PROMETHEUS``, or Debian's prometheus (installed when missing)."""
    return os.environ.get("PGMETER_TEST_PROMETHEUS") or installed("prometheus", packages=("prometheus",))[0]


def start_prometheus(workdir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:{port}"]
""")
    process = ManagedProcess("prometheus", [
        binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log_path=workdir / "prometheus.log")
    process.start()
    url = f"http://127.0.0.1:{port}"

    def scraped() -> bool:
        try:
            body = httpx.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=1).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(body.get("data", {}).get("result"))

    wait_until(scraped, timeout=60, what="prometheus scraping itself")
    return process, url
