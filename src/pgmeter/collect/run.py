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
    commands = parser.add_subparsers(dest="collect_command", metavar="{dead-letters}")
    dead = commands.add_parser("dead-letters", help="list a pipeline's dead letters, or replay them after a fix")
    actions = dead.add_subparsers(dest="dead_letters_command", required=True, metavar="{list,replay}")
    for name, text in (("list", "print the dead letters, one JSON object a line"),
                       ("replay", "queue dead letters again (mapped again with the current mapping, same ids)")):
        action = actions.add_parser(name, help=text, description=text)
        # SUPPRESS: the value given before the subcommand (pgmeter collect --config F dead-letters ...)
        # is not overwritten by a default here.
        action.add_argument("--config", dest="collector_config", metavar="FILE", default=argparse.SUPPRESS,
                            help="the collector's collector.yaml")
        action.add_argument("--buffer", metavar="DIR", type=Path, default=argparse.SUPPRESS,
                            help="the buffer of a collector run with --listen/--to/--buffer")
        action.add_argument("--pipeline", metavar="NAME", help="only this pipeline")
        action.add_argument("--id", dest="ids", metavar="SEQ", type=int, action="append",
                            help="only this dead letter (its seq; repeat for several)")
        if name == "replay":
            action.add_argument("--all", action="store_true", help="every dead letter")


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


def run_dead_letters(args: argparse.Namespace) -> int:
    from pgmeter.collect import dead_letters
    from pgmeter.collect.app import event_limits
    from pgmeter.collect.buffer import Buffer
    from pgmeter.collect.mapping import Mapping, MappingError
    from pgmeter.collect.pipeline import event_source

    if args.collector_config:
        config = load_collector_config(args.collector_config)
    elif args.buffer:  # the flags' one pipeline: "http", no mapping
        config = CollectorConfig.model_validate({"buffer": args.buffer, "pipelines": [
            {"name": "http", "source": {"type": "http"}, "to": {"url": "http://unused"}}]})
    else:
        raise ConfigError("collect dead-letters: --config FILE or --buffer DIR required")
    pipelines = [p for p in config.pipelines if args.pipeline in (None, p.name)]
    if not pipelines:
        raise ConfigError(f"collect dead-letters: no pipeline {args.pipeline!r} in the config")
    replaying = args.dead_letters_command == "replay"
    if replaying and not args.all and not args.ids:
        raise ConfigError("collect dead-letters replay: --id SEQ or --all required")
    if args.ids and len(pipelines) > 1:
        raise ConfigError("collect dead-letters: --id needs --pipeline NAME (each pipeline numbers its own)")
    limits = event_limits(config.limits)
    for pipeline in pipelines:
        path = Path(config.buffer) / f"{pipeline.name}.sqlite"
        if not path.exists():
            raise ConfigError(f"collect dead-letters: no buffer file {path}")
        try:
            mapping = Mapping(pipeline.mapping, event_source(pipeline), limits)
        except MappingError as exc:
            raise ConfigError(f"pipeline {pipeline.name}: {exc}") from None
        buffer = Buffer(path, pipeline.buffer_max_bytes)
        try:
            if not replaying:
                for line in dead_letters.listing(buffer, pipeline.name, args.ids):
                    print(line)
                continue
            done = dead_letters.replay(buffer, mapping, args.ids)
        finally:
            buffer.close()
        print(f"{pipeline.name}: {done.letters} dead letters replayed, {done.events} events queued, "
              f"{len(done.still_dead)} dead again")
        for seq, reason in done.still_dead:
            print(f"  letter {seq} still fails: {reason}")
        for seq, why in done.kept:
            print(f"  letter {seq} kept: {why}")
        if done.missing:
            print(f"pgmeter: no dead letter {', '.join(map(str, done.missing))} in {pipeline.name}", file=sys.stderr)
            return 1
    return 0


def run_collect(args: argparse.Namespace) -> int:
    if getattr(args, "collect_command", None) == "dead-letters":
        return run_dead_letters(args)
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
