"""``pgmeter``: one command, one subcommand per role.

Exit codes: 0 done, 1 a dependency or the schema is not usable, 2 bad usage or
configuration (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pgmeter import logs
from pgmeter.config import DEFAULT_CONFIG_FILE, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from pgmeter.devstack.stack import DevStack

log = logging.getLogger("pgmeter")

ROLE_HELP = {
    "api": "serve the OpenMeter-compatible HTTP API (ingest, meters, query)",
    "sink": "move events from JetStream into Postgres, exactly once; partitions and retention",
    "refresher": "keep every meter's rollups up to date",
    "lago-sync": "push closed usage windows to Lago",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgmeter",
        description="Usage metering with OpenMeter's API on PostgreSQL, NATS JetStream and Valkey.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"YAML config file (default: {DEFAULT_CONFIG_FILE} if present); "
                             "PGMETER_* environment variables override it")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dev = commands.add_parser("dev", help="run every role with embedded Postgres, NATS and Valkey")
    dev.add_argument("--data-dir", default=".pgmeter", type=Path,
                     help="where the embedded services keep their data (default: .pgmeter)")
    for role, text in ROLE_HELP.items():
        sub = commands.add_parser(role, help=text)
        if role == "lago-sync":
            sub.add_argument("--once", action="store_true", help="run one sync and exit")
            sub.add_argument("--dry-run", action="store_true", help="print what would be sent and exit")
            sub.add_argument("--status", action="store_true", help="show the outbox: pending, sent, failed")
    commands.add_parser("migrate", help="apply pending SQL migrations and exit")
    demo = commands.add_parser("demo", help="send realistic Open Banking traffic to a running api")
    demo.add_argument("--url", default="http://127.0.0.1:8888", help="the api (default: http://127.0.0.1:8888)")
    demo.add_argument("--token", help="bearer token, if the api has auth on")
    demo.add_argument("--events", type=int, default=5000, help="how many events (default: 5000)")
    demo.add_argument("--rate", type=float, default=1000, help="events per second (default: 1000)")
    demo.add_argument("--hours", type=float, default=6, help="spread event times over the last N hours (default: 6)")
    demo.add_argument("--seed", type=int, help="random seed, for the same traffic every time")
    from pgmeter.collect.run import add_arguments

    add_arguments(commands.add_parser(
        "collect", help="collect usage (HTTP, SQL, files, S3, Prometheus, OTLP logs, Kubernetes pods), buffer it on disk "
                        "and deliver it to an OpenMeter-compatible endpoint"))
    return parser


def fail(message: str, code: int) -> int:
    print(f"pgmeter: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (Kubernetes, systemd) gets the same graceful path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.command == "dev":
            return run_dev(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "collect":  # its own config (collector.yaml); no Postgres, NATS or Valkey
            from pgmeter.collect.run import run_collect

            return run_collect(args)
        settings = load(args.config)
        logs.configure(settings.log_level)
        if args.command == "migrate":
            return run_migrate(settings)
        if args.command == "lago-sync" and (args.once or args.dry_run or args.status):
            from pgmeter.lago import cli as lago_cli

            if args.status:
                return lago_cli.show_status(settings)
            return lago_cli.run_once(settings, dry_run=args.dry_run)
        return serve(settings, frozenset({args.command}))
    except ConfigError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 0


def load(path: str | Path | None) -> Settings:
    """The settings, with the config file's meters checked too: a bad meter is a
    configuration error like any other (exit 2), found before any connection."""
    from pgmeter.meters.service import config_meters

    settings = load_settings(path)
    config_meters(settings)
    return settings


def run_migrate(settings: Settings) -> int:
    from pgmeter.db.migrate import SchemaError, migrate

    try:
        applied = migrate(settings.postgres.url)
    except SchemaError as exc:
        return fail(str(exc), 1)
    except OSError as exc:
        return fail(f"cannot reach Postgres: {exc}", 1)
    except Exception as exc:  # psycopg.OperationalError and friends: say what, not where
        return fail(f"migration failed: {type(exc).__name__}: {exc}".strip(), 1)
    for migration in applied:
        log.info("applied migration", extra={"version": migration.version, "migration": migration.name})
    print(f"schema up to date ({len(applied)} migration(s) applied)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import time
    from datetime import timedelta

    import httpx

    from pgmeter import demo

    if args.events < 1 or args.rate <= 0 or args.hours <= 0:
        return fail("--events, --rate and --hours must be positive", 2)
    started = time.monotonic()
    try:
        summary = demo.run(args.url, args.token, args.events, args.rate, timedelta(hours=args.hours), args.seed)
    except demo.DemoError as exc:
        return fail(str(exc), 1)
    except httpx.HTTPError as exc:
        return fail(f"cannot reach {args.url}: {exc} (is `make run` up?)", 1)
    print(demo.report(summary, args.url, time.monotonic() - started))
    return 0


class ListenError(OSError):
    """The listen address cannot be bound."""


def listen(settings: Settings) -> socket.socket:
    """Bind the listen address before anything starts.

    uvicorn binds only after the app's start-up, and a failed bind then left the
    background work running with nothing to stop it (the process ignored Ctrl-C). A
    socket bound first fails in a moment, with one line, and nothing to clean up.
    """
    host, port = settings.listen_host, settings.listen_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {settings.address}: {exc.strerror or exc} "
                          "(another pgmeter, or set PGMETER_ADDRESS)") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, roles: frozenset[str], banner: str | None = None,
          sock: socket.socket | None = None) -> int:
    import psycopg
    import uvicorn

    from pgmeter.api.app import create_app
    from pgmeter.api.server import uvicorn_config
    from pgmeter.db.migrate import SchemaError, check_schema

    try:
        sock = sock or listen(settings)
    except ListenError as exc:
        return fail(str(exc), 1)
    try:
        check_schema(settings.postgres.url)
    except SchemaError as exc:
        return fail(str(exc), 1)
    except psycopg.OperationalError as exc:
        return fail(f"cannot reach Postgres: {str(exc).strip()}", 1)
    server = uvicorn.Server(uvicorn_config(create_app(settings, roles), settings))
    if banner:
        print(banner, flush=True)
    server.run(sockets=[sock])  # with uvloop where installed (uvicorn[standard]); measured +13% on ingest
    return 0 if server.started else 1


def run_dev(args: argparse.Namespace) -> int:
    from pgmeter.devstack.stack import DevStack, StackError

    if args.config or Path(DEFAULT_CONFIG_FILE).exists():
        settings = load(args.config)
    else:
        example = resources.files("pgmeter.devstack").joinpath("example.yaml")
        with resources.as_file(example) as path:
            settings = load(path)
    logs.configure(settings.log_level)
    try:
        sock = listen(settings)
    except ListenError as exc:
        return fail(str(exc), 1)
    stack = DevStack(args.data_dir.resolve())
    try:
        stack.start()
    except (StackError, RuntimeError, OSError) as exc:
        sock.close()
        return fail(str(exc).replace("\n", " | "), 1)
    try:
        settings.postgres.url = stack.postgres_url
        settings.nats.url = stack.nats_url
        settings.valkey.url = stack.valkey_url
        if not settings.portal.token_secret:
            # Portal tokens work out of the box; they end with this run.
            settings.portal.token_secret = secrets.token_urlsafe(32)
        code = run_migrate(settings)
        if code:
            return code
        return serve(settings, frozenset({"api", "sink", "refresher", "lago-sync"}), dev_banner(settings, stack), sock)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def dev_banner(settings: Settings, stack: DevStack) -> str:
    """What a newcomer needs on one screen: where things are and what to try first."""
    base = f"http://{settings.address}"
    slugs = [str(meter["slug"]) for meter in settings.meters]
    meters = ", ".join(slugs) or "none yet (POST /api/v1/meters)"
    auth = "  (auth on: add -H 'Authorization: Bearer <token>')" if settings.auth_tokens else ""
    return "\n".join([
        "",
        "pgmeter dev is up.",
        f"  console   {base}/   (sample traffic to look at: .venv/bin/pgmeter demo --url {base})",
        f"  api       {base}/api/v1{auth}",
        f"  meters    {meters}",
        f"  postgres  {stack.postgres_url}",
        f"  nats      {stack.nats_url}",
        f"  valkey    {stack.valkey_url}",
        f"  data      {stack.data_dir}  (make clean deletes it)",
        "Send an event:",
        f"  curl -X POST {base}/api/v1/events -H 'Content-Type: application/cloudevents+json' \\",
        "    -d '{\"specversion\":\"1.0\",\"id\":\"e1\",\"source\":\"gw\",\"type\":\"api.call\",\"subject\":\"tpp-1\","
        "\"data\":{\"endpoint\":\"/accounts\",\"method\":\"GET\",\"response_time_ms\":42}}'",
        f"  curl '{base}/api/v1/meters/{slugs[0] if slugs else 'SLUG'}/query?groupBy=subject'",
        "Ctrl-C stops everything. JSON logs follow.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
