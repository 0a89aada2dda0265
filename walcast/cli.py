"""The `walcast` command: serve, demo, migrate, check, ticket, broadcast.

Each subcommand reads its settings from the environment (`DATABASE_URL`, `ACCESS_TOKEN`,
`WALCAST_CONFIG`, ...) and takes flags that override it. Common mistakes end with a one-line
explanation of how to fix them and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc import setup
from cdc.errors import ReplicationError
from gateway.config import ConfigError, RealtimeConfig, Settings, load_realtime_config
from migrations import apply as apply_migrations
from walcast.logs import setup_logging
from walcast.serve import UsageError, add_index, endpoints, run_until_stopped

__all__ = ["build_parser", "main"]

log = logging.getLogger("walcast")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return Settings.from_env(
        database_url=getattr(args, "database_url", None),
        config_path=getattr(args, "config", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        redis_url=getattr(args, "redis_url", None),
        slot=getattr(args, "slot", None),
        publication=getattr(args, "publication", None),
        **extra,
    )


def _need_database(settings: Settings) -> str:
    if not settings.database_url:
        raise UsageError("DATABASE_URL is not set (or pass --database-url)")
    try:
        conninfo_to_dict(settings.database_url)
    except psycopg.ProgrammingError:
        # libpq's message may quote the string, password included: never echo it.
        raise UsageError(
            "DATABASE_URL is not a valid PostgreSQL connection string; expected"
            " postgresql://user:password@host:5432/dbname (or libpq key=value pairs)"
        ) from None
    return settings.database_url


def _connect_error(exc: psycopg.OperationalError, dsn: str) -> UsageError:
    return UsageError(
        f"cannot connect to PostgreSQL: {str(exc).strip().splitlines()[0]}\n"
        "check DATABASE_URL (host, port, user, database name and password)"
    )


# -- serve -----------------------------------------------------------------------------------


async def serve(
    settings: Settings,
    config: RealtimeConfig,
    *,
    cdc: bool,
    gateway: bool,
) -> None:
    """The `walcast serve` command: check the database, then run until SIGTERM or SIGINT."""
    from walcast.app import make_app
    from walcast.pipeline import DropSink, Pipeline

    dsn = _need_database(settings)
    if not settings.access_tokens:
        raise UsageError("ACCESS_TOKEN is not set: it signs tickets and guards the broadcast API")
    if not (cdc or gateway):
        raise UsageError("--no-cdc and --no-gateway together leave nothing to run")
    if not (cdc and gateway) and not settings.redis_url:
        flag = "--no-cdc" if not cdc else "--no-gateway"
        raise UsageError(f"{flag} needs the Redis bus: set REDIS_URL (or pass --redis-url)")
    if settings.redis_url:
        _check_redis_url(settings.redis_url)
    try:
        # Fail fast, with the fix in the message, before opening a port. A single node must
        # not share its slot; on the Redis bus a second reader stands by for the reader lock.
        if cdc:
            pipeline = Pipeline(settings, config, DropSink(), _metrics(), on_ready=lambda _: None)
            await pipeline.prepare(exclusive=not settings.redis_url)
        else:  # a gateway node: the slot is the reader's business, but sessions need the database
            await (await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)).close()
    except psycopg.OperationalError as exc:
        raise _connect_error(exc, dsn) from None
    except ReplicationError as exc:
        raise UsageError(str(exc)) from None

    if gateway:
        app = make_app(settings, config, run_pipeline=cdc)
    else:
        from walcast.bus import make_reader_app

        app = make_reader_app(settings, config)
    add_index(app)

    async def started(url: str, stop: asyncio.Event) -> None:
        log.info(
            "walcast listening on %s (slot=%s publication=%s)",
            url,
            settings.slot,
            settings.publication,
        )
        log.info("endpoints: %s (GET / lists them)", ", ".join(endpoints(app)))

    await run_until_stopped(app, settings.host, settings.port, started)


def _check_redis_url(url: str) -> None:
    import redis.asyncio as aioredis

    try:
        aioredis.Redis.from_url(url)
    except ValueError as exc:
        raise UsageError(f"REDIS_URL is not a Redis URL: {exc}") from None


def _metrics() -> Any:
    from gateway.metrics import Metrics

    return Metrics()


# -- migrate / check -------------------------------------------------------------------------


async def check(settings: Settings, config: RealtimeConfig) -> list[str]:
    """Config vs database, changing nothing: prints what each set-up step found (the same steps
    `serve` runs) and returns the problems."""
    from walcast.pipeline import setup_requirements

    dsn = _need_database(settings)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        report = await setup.check(conn, setup_requirements(settings, config))
    for finding in report.findings:
        print(finding.summary)
    problems = report.problems
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return problems


# -- ticket / broadcast ------------------------------------------------------------------------


def ticket(settings: Settings, user: str, org: str, roles: list[str]) -> str:
    from gateway.tickets import mint_ticket

    return mint_ticket(settings.signing_secret, user_id=user, organization_id=org, roles=roles)


async def broadcast(
    settings: Settings,
    url: str,
    org: str,
    event: str,
    payload: Any,
    roles: list[str] | None,
    user: str | None,
) -> dict[str, Any]:
    """The `walcast broadcast` command: walcast's answer, or a `UsageError` saying what failed."""
    from walcast.client import BroadcastError, Realtime, UnreachableError, broadcast_body

    body = broadcast_body(org, event, payload, roles or None, user)
    try:
        async with Realtime(url, settings.signing_secret) as realtime:
            return await realtime.post(body)
    except BroadcastError as exc:
        raise UsageError(str(exc)) from None
    except UnreachableError as exc:
        raise UsageError(
            f"{exc}: is `walcast serve` running there? pass --url or set WALCAST_HOST/WALCAST_PORT"
        ) from None


# -- argument parsing --------------------------------------------------------------------------


DESCRIPTION = """\
walcast streams PostgreSQL changes to WebSocket clients: each user receives only the rows
their organization and roles allow, with sensitive columns masked, and applications can push
custom events to the same sockets."""

ENVIRONMENT = """\
environment (flags override it):
  DATABASE_URL         PostgreSQL connection string; the server needs wal_level=logical
  ACCESS_TOKEN         secret that signs tickets and guards the broadcast API (several,
                       comma-separated, to rotate: the first signs, any is accepted)
  WALCAST_CONFIG       realtime config (TOML): which tables, who sees them, what is masked
  WALCAST_HOST         listen address (default 127.0.0.1)
  WALCAST_PORT         listen port (default 4000)
  WALCAST_SLOT         replication slot (default walcast)
  WALCAST_PUBLICATION  publication (default walcast)
  REDIS_URL            Redis, to run the reader and several gateway nodes apart

for a first look, run `walcast demo`: it starts a throwaway PostgreSQL of its own."""


def build_parser() -> argparse.ArgumentParser:
    """The command line `main` parses (public so a deployment's command can be checked)."""
    parser = argparse.ArgumentParser(
        prog="walcast",
        description=DESCRIPTION,
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="one JSON object per line (default), or plain text for reading",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="PostgreSQL connection string (env DATABASE_URL)")
        p.add_argument("--config", help="realtime config file, TOML (env WALCAST_CONFIG)")
        p.add_argument("--slot", help="replication slot (env WALCAST_SLOT, default walcast)")
        p.add_argument(
            "--publication", help="publication (env WALCAST_PUBLICATION, default walcast)"
        )

    p = command(
        "serve",
        "run the change reader and the WebSocket gateway",
        "Check the database, create the publication and the replication slot if missing, then"
        " read changes and serve them over WebSocket until SIGTERM or Ctrl-C. GET / lists the"
        " endpoints. Exit status 2 when it cannot start: the database is not ready (wal_level,"
        " privileges, tables, columns, replica identity, a slot another process streams from)"
        " or a setting is wrong; stderr names the fix.",
    )
    common(p)
    p.add_argument("--host", help="listen address (env WALCAST_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env WALCAST_PORT, default 4000)")
    p.add_argument("--redis-url", help="Redis for running several nodes (env REDIS_URL)")
    p.add_argument(
        "--no-cdc", action="store_true", help="gateway only; events come from Redis (REDIS_URL)"
    )
    p.add_argument(
        "--no-gateway",
        action="store_true",
        help="change reader only; events go to Redis (REDIS_URL)",
    )

    p = command(
        "demo",
        "try walcast on a throwaway database, with a live page",
        "Start a temporary PostgreSQL (or use --database-url), fill it with a small recruiting"
        " app whose rows change every --interval seconds, and open a page where you watch the"
        " events as each demo user sees them. Ctrl-C stops it and deletes the temporary data.",
    )
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 4000)")
    p.add_argument("--database-url", help="use this PostgreSQL instead of a temporary one")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between demo writes")
    p.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (off by default)"
    )

    p = command(
        "migrate",
        "create the session tables walcast reads, if missing",
        "Create the Better Auth tables (user, organization, member, session) that tickets are"
        " checked against, where they do not exist yet. Safe to run again.",
    )
    p.add_argument("--database-url", help="PostgreSQL connection string (env DATABASE_URL)")
    p.add_argument("--demo", action="store_true", help="also create the demo app's tables")

    p = command(
        "check",
        "check the realtime config against the database",
        "Check the config against the database, changing nothing: the same steps serve runs at"
        " start-up (wal_level, privileges, tables, columns, replica identity, publication,"
        " slot). Exit status 0: ready; 1: problems found (each listed with the statement that"
        " fixes it); 2: cannot check (connection, config file).",
    )
    common(p)

    p = command(
        "ticket",
        "mint a WebSocket ticket, for debugging",
        "Print a ticket (valid 60 s, usable once) for connecting to"
        " /realtime/v1/websocket as the given user, signed with ACCESS_TOKEN.",
    )
    p.add_argument("--user", required=True, help="the user id the ticket is for")
    p.add_argument("--org", required=True, help="the organization id the ticket is for")
    p.add_argument("--roles", default="", help="comma-separated roles, e.g. owner,recruiter")

    p = command(
        "broadcast",
        "send a custom event through a running walcast",
        "Send a custom event to an organization's sockets through the broadcast API of a"
        " running walcast, authenticated with ACCESS_TOKEN. Prints the answer, with the"
        " event's position in the WAL.",
    )
    p.add_argument("--org", required=True, help="the organization id to send to")
    p.add_argument(
        "--event", required=True, help="event name, e.g. announcement or screening:started"
    )
    p.add_argument("--payload", default="{}", help="the event's payload, JSON (default {})")
    p.add_argument(
        "--roles", default="", help="only members with one of these roles (comma-separated)"
    )
    p.add_argument("--user", help="only this user id")
    p.add_argument("--url", help="walcast's base URL (default http://WALCAST_HOST:WALCAST_PORT)")
    return parser


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    command = args.command
    if command == "serve":
        settings = _settings(args)
        config = load_realtime_config(settings.config_path)
        asyncio.run(serve(settings, config, cdc=not args.no_cdc, gateway=not args.no_gateway))
    elif command == "demo":
        from walcast.demo import run_demo

        run_demo(args)
    elif command == "migrate":
        settings = _settings(args)
        names = apply_migrations(_need_database(settings), demo=args.demo)
        print("applied: " + ", ".join(names))
    elif command == "check":
        settings = _settings(args)
        config = load_realtime_config(settings.config_path)
        return 1 if asyncio.run(check(settings, config)) else 0
    elif command == "ticket":
        print(ticket(Settings.from_env(), args.user, args.org, _split(args.roles)))
    elif command == "broadcast":
        settings = Settings.from_env()
        try:
            payload = orjson.loads(args.payload)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"--payload is not valid JSON: {exc}") from None
        url = args.url or f"http://{settings.host}:{settings.port}"
        answer = asyncio.run(
            broadcast(settings, url, args.org, args.event, payload, _split(args.roles), args.user)
        )
        print(orjson.dumps(answer).decode())
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except (UsageError, ConfigError) as exc:
        print(f"walcast: {exc}", file=sys.stderr)
        code = 2
    except psycopg.OperationalError as exc:
        print(f"walcast: {_connect_error(exc, '')}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
