"""The `walcast` command: serve, demo, migrate, check, ticket, broadcast (spec §9).

Each subcommand reads the environment of spec §9 (`DATABASE_URL`, `ACCESS_TOKEN`,
`WALCAST_CONFIG`, ...) and takes flags that override it. Common mistakes end with a one-line
explanation of how to fix them and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import psycopg
from aiohttp import web
from psycopg.conninfo import conninfo_to_dict

from cdc import setup
from cdc.errors import ReplicationError
from gateway.config import ConfigError, RealtimeConfig, Settings, load_realtime_config
from walcast.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("walcast")


class UsageError(Exception):
    """A mistake the user can fix; printed without a traceback."""


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
    static_dir: Any = None,
    banner: str | None = None,
) -> None:
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
        app = make_app(settings, config, run_pipeline=cdc, static_dir=static_dir)
    else:
        from walcast.redisbus import make_reader_app

        app = make_reader_app(settings, config)

    async def started(url: str, stop: asyncio.Event) -> None:
        log.info(
            "walcast listening on %s (slot=%s publication=%s)",
            url,
            settings.slot,
            settings.publication,
        )
        if banner:
            print(banner.format(url=url), flush=True)

    await run_until_stopped(app, settings.host, settings.port, started)


async def run_until_stopped(
    app: web.Application,
    host: str,
    port: int,
    started: Callable[[str, asyncio.Event], Awaitable[None]],
    *,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve `app` until one of `signals`, then shut down gracefully (sockets closed with 1001).

    `started(url, stop)` runs once the port is bound (`url` has the real port when `port` is 0).
    """
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is in use: pass --port or set WALCAST_PORT"
                ) from None
            raise
        freeze_startup_objects()
        bound = runner.addresses[0][1] if port == 0 else port
        url_host = f"[{host}]" if ":" in host else host
        await started(f"http://{url_host}:{bound}", stop)
        if not stop.is_set():
            await stop.wait()
        log.info("shutting down: closing sockets with 1001")
    finally:
        await runner.cleanup()


def freeze_startup_objects() -> None:
    """Take what start-up made (modules, config, the app) out of the cyclic collector's sight.

    Those objects live as long as the process, yet each full collection would walk them all:
    a pause of tens of ms in the middle of fan-out (docs/benchmarks.md §3). Frozen, they are
    still freed by reference counting; only cycles among them would stay.
    """
    gc.collect()
    gc.freeze()


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


def apply_migrations(dsn: str, *, demo: bool = False) -> list[str]:
    import migrations

    names = migrations.schema_scripts() + ([migrations.DEMO_SCRIPT] if demo else [])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(migrations.read_script(name).encode())
    return names


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
    import aiohttp

    body: dict[str, Any] = {"organizationId": org, "event": event, "payload": payload}
    if roles:
        body["targetRoles"] = roles
    if user:
        body["targetUserId"] = user
    secret = settings.signing_secret
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(
                f"{url.rstrip('/')}/realtime/v1/broadcast",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            ) as response:
                try:
                    answer: dict[str, Any] = await response.json(content_type=None)
                except ValueError:
                    answer = {"error": (await response.text())[:200]}
                if response.status != 202:
                    raise UsageError(f"broadcast refused ({response.status}): {answer}")
                return answer
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise UsageError(
            f"cannot reach walcast at {url} ({type(exc).__name__}):"
            " is `walcast serve` running there? pass --url or set WALCAST_HOST/WALCAST_PORT"
        ) from None


# -- argument parsing --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walcast", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="PostgreSQL (env DATABASE_URL)")
        p.add_argument("--config", help="realtime config TOML (env WALCAST_CONFIG)")
        p.add_argument("--slot", help="replication slot (env WALCAST_SLOT, default walcast)")
        p.add_argument("--publication", help="publication (env WALCAST_PUBLICATION)")

    p = sub.add_parser(
        "serve",
        help="run the CDC reader and the gateway",
        description="Run the CDC reader and the gateway. Exit status 2 when it cannot start:"
        " the database is not ready (wal_level, privileges, tables, columns, replica identity,"
        " a slot another process streams from) or a setting is wrong; stderr names the fix.",
    )
    common(p)
    p.add_argument("--host", help="listen address (env WALCAST_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env WALCAST_PORT, default 4000)")
    p.add_argument("--redis-url", help="Redis for the multi-node bus (env REDIS_URL)")
    p.add_argument("--no-cdc", action="store_true", help="gateway node only (Redis bus)")
    p.add_argument("--no-gateway", action="store_true", help="reader only (Redis bus)")

    p = sub.add_parser("demo", help="one-command demo on an embedded PostgreSQL")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 4000)")
    p.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between demo writes")

    p = sub.add_parser("migrate", help="create the session store tables if missing")
    p.add_argument("--database-url")
    p.add_argument("--demo", action="store_true", help="also create the demo schema")

    p = sub.add_parser(
        "check",
        help="check the config against the database",
        description="Check the config against the database, changing nothing: the same steps"
        " serve runs at start-up. Exit status 0: ready; 1: problems found (each listed with"
        " the statement that fixes it); 2: cannot check (connection, config file).",
    )
    common(p)

    p = sub.add_parser("ticket", help="mint a WebSocket ticket (debugging)")
    p.add_argument("--user", required=True)
    p.add_argument("--org", required=True)
    p.add_argument("--roles", default="")

    p = sub.add_parser("broadcast", help="send a custom event through a running walcast")
    p.add_argument("--org", required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--payload", default="{}", help="JSON")
    p.add_argument("--roles", default="", help="comma-separated targetRoles")
    p.add_argument("--user", help="targetUserId")
    p.add_argument("--url", help="walcast base URL (default from WALCAST_HOST/WALCAST_PORT)")
    return parser


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
