"""Running an app until it is told to stop: bind the port, wait for a signal, shut down gracefully.

`walcast serve` and `walcast demo` both end in `run_until_stopped`: the runner is set up, the
site is bound by `start_site` (the one place a listening socket is opened), start-up objects are
frozen out of the cyclic collector's sight, and the process waits for SIGTERM or SIGINT. Then
the runner's clean-up runs the app's `on_shutdown` (sockets closed with 1001 "going away") and
`cleanup_ctx` (pipeline and pools stopped).

`UsageError` lives here because both commands raise it: a mistake the user can fix, printed by
the CLI without a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from cdc.errors import WalcastError
from gateway.server import ConnectionGuard

__all__ = [
    "UsageError",
    "add_index",
    "endpoints",
    "freeze_startup_objects",
    "run_until_stopped",
    "start_site",
]

log = logging.getLogger(__name__)

#: How long the runner's clean-up waits for open requests once the sockets are closed.
SHUTDOWN_TIMEOUT = 5.0


class UsageError(WalcastError):
    """A mistake the user can fix; printed without a traceback, exit status 2."""


async def start_site(
    runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard
) -> web.BaseSite:
    """Bind `host:port` and start accepting connections on it.

    Raises:
        UsageError: the port is already in use.
    """
    site = guard.site(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is in use: pass --port or set WALCAST_PORT"
            ) from None
        raise
    return site


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
    guard = ConnectionGuard.for_app(app)  # timeouts, per-address cap, fd exhaustion
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, **guard.handler_args
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    # Before the app starts (its pipeline streams from then on): the collection that comes
    # with the freeze walks only start-up objects, not a catch-up's first events.
    freeze_startup_objects()
    await runner.setup()
    try:
        await start_site(runner, host, port, guard)
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
    a pause of tens of ms in the middle of fan-out. Frozen, they are still freed by reference
    counting; only cycles among them would stay.
    """
    gc.collect()
    gc.freeze()


def endpoints(app: web.Application) -> list[str]:
    """`METHOD /path` of every route `app` serves, in the order they were added."""
    found: dict[str, None] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "*") or path in ("", "/"):
            continue
        found[f"{route.method} {path}"] = None
    return list(found)


def add_index(app: web.Application) -> None:
    """`GET /`: what this walcast serves, so a browser pointed at it finds something to read."""

    async def index(request: web.Request) -> web.Response:
        return web.json_response({"service": "walcast", "endpoints": endpoints(request.app)})

    app.router.add_get("/", index)
