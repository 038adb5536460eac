"""A real Prometheus server for the collector's Prometheus source (Debian's `prometheus`).

The binary is taken from ``PGMETER_TEST_PROMETHEUS`` or the PATH (.ci/run installs
Debian's package when it is missing). It scrapes itself every second.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from pgmeter.devstack.process import ManagedProcess, free_port, wait_until


def binary() -> str:
    found = os.environ.get("PGMETER_TEST_PROMETHEUS") or shutil.which("prometheus")
    if not found:
        raise RuntimeError("the Prometheus source tests need a prometheus binary: apt-get install prometheus "
                           "(or set PGMETER_TEST_PROMETHEUS)")
    return found


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
