"""Debian packages the tests need (a browser, Prometheus), installed when missing.

The README's `make test` must pass on a fresh machine of this kind, where we are root
and Debian's package registry is reachable; nothing is downloaded from anywhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def installed(*binaries: str, packages: tuple[str, ...]) -> list[str]:
    """The paths of ``binaries``, installing Debian's ``packages`` first if any is missing."""
    found = [shutil.which(name) for name in binaries]
    if all(found):
        return [path for path in found if path]
    assert os.geteuid() == 0, f"these tests need {', '.join(binaries)}: apt-get install {' '.join(packages)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL, timeout=600, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], check=True,
                   stdout=subprocess.DEVNULL, timeout=900, env=env)
    found = [shutil.which(name) for name in binaries]
    assert all(found), f"apt-get installed {' '.join(packages)} but {', '.join(binaries)} is not on PATH"
    return [path for path in found if path]
