"""``pgmeter collect``: the command line.

Two ways to say what to run:

- ``pgmeter collect --listen HOST:PORT --to URL --buffer DIR [--token TOKEN]``: one
  pipeline, OpenMeter's ingest API on HOST:PORT -> a disk buffer in DIR -> URL. The
  token may come from ``PGMETER_COLLECT_TOKEN`` instead (kept out of ``ps``); the
  tokens producers must present, from ``PGMETER_COLLECT_AUTH_TOKENS``.
- ``pgmeter collect --config collector.yaml``: any number of pipelines (docs/collect.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pgmeter.config import CollectorConfig, ConfigError, load_collector_config

TOKEN_ENV = "PGMETER_COLLECT_TOKEN"
AUTH_TOKENS_ENV = "PGMETER_COLLECT_AUTH_TOKENS"  # JSON: {"<token>": "<namespace>"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="collector_config", metavar="FILE",
                        help="collector.yaml with one or more pipelines")
    parser.add_argument("--listen", metavar="HOST:PORT", help="serve OpenMeter's ingest API here")
    parser.add_argument("--to", metavar="URL", help="deliver to this OpenMeter-compatible endpoint")
    parser.add_argument("--buffer", metavar="DIR", type=Path, help="the disk buffer's directory")
    parser.add_argument("--token", metavar="TOKEN", help=f"bearer token for URL (or set {TOKEN_ENV})")
    parser.add_argument("--buffer-max-bytes", type=int, metavar="N", help="bound of the disk buffer (default 1 GiB)")


def config_of(args: argparse.Namespace) -> CollectorConfig:
    if args.collector_config:
        if args.listen or args.to or args.buffer:
            raise ConfigError("collect: give either --config or --listen/--to/--buffer, not both")
        return with_env_tokens(load_collector_config(args.collector_config))
    missing = [flag for flag, value in (("--listen", args.listen), ("--to", args.to), ("--buffer", args.buffer))
               if not value]
    if missing:
        raise ConfigError(f"collect: {', '.join(missing)} required (or --config FILE)")
    pipeline: dict[str, Any] = {
        "name": "http", "source": {"type": "http"},
        "to": {"url": args.to, "token": args.token or os.environ.get(TOKEN_ENV) or None},
    }
    if args.buffer_max_bytes:
        pipeline["bufferMaxBytes"] = args.buffer_max_bytes
    try:
        return with_env_tokens(CollectorConfig.model_validate(
            {"listen": args.listen, "buffer": args.buffer, "pipelines": [pipeline]}))
    except ValidationError as exc:
        raise ConfigError(f"collect: {problems(exc)}") from None


def problems(exc: ValidationError) -> str:
    """Field and message only: never the input (it may hold a token)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def with_env_tokens(config: CollectorConfig) -> CollectorConfig:
    """``authTokens`` from PGMETER_COLLECT_AUTH_TOKENS when the file sets none (the chart
    passes its Secret that way; the flags have no other way to take them)."""
    raw = os.environ.get(AUTH_TOKENS_ENV)
    if config.auth_tokens or not raw:
        return config
    try:
        tokens = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{AUTH_TOKENS_ENV}: not JSON: {exc}") from None
    try:
        return CollectorConfig.model_validate({**config.model_dump(by_alias=True), "authTokens": tokens})
    except ValidationError as exc:
        raise ConfigError(f"{AUTH_TOKENS_ENV}: {problems(exc)}") from None


def run_collect(args: argparse.Namespace) -> int:
    import uvicorn

    from pgmeter import logs
    from pgmeter.collect.app import create_app

    config = config_of(args)
    logs.configure(config.log_level)
    host, _, port = config.listen.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "0.0.0.0", int(port)))
    except OSError as exc:
        sock.close()
        print(f"pgmeter: cannot listen on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(config)  # ConfigError for a mapping that does not compile: exit 2
    except ConfigError:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0 if server.started else 1
