"""`make_gateway_app(state) -> web.Application`: the gateway alone — its routes, its shared
state, the optional static index, and a shutdown that closes every socket with 1001.

Where events come from (the in-process CDC pipeline, or a feed from the Redis bus) is not the
gateway's business: `walcast.app` builds the `GatewayState` around an event source and adds
that source's background tasks as cleanup contexts.

Shutdown (SIGTERM via aiohttp's runner): the site stops accepting, `on_shutdown` marks the
node not ready, writes what is queued, and closes every socket with 1001 "going away"; then
the cleanup contexts stop the event source and close the pools.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway import http, openapi, redact, websocket
from gateway.accesslog import AccessLogger
from gateway.config import RealtimeConfig
from gateway.masking import resolve_custom
from gateway.protocol import CloseCode
from gateway.readiness import Condition
from gateway.state import STATE, GatewayState

__all__ = ["check_custom_masks", "make_gateway_app"]


def check_custom_masks(config: RealtimeConfig) -> None:
    """Import every custom mask now, so one that cannot be imported fails at start-up."""
    for table in config.tables.values():
        for rule in table.masking.values():
            if rule.type == "custom":
                resolve_custom(rule)


def make_gateway_app(state: GatewayState, *, static_dir: Path | None = None) -> web.Application:
    """The gateway's HTTP and WebSocket app over `state`; `static_dir` serves ``/`` and
    ``/static/`` (the demo page)."""
    check_custom_masks(state.config)
    settings = state.settings
    app = web.Application(
        client_max_size=max(settings.max_broadcast_bytes, 64 * 1024),
        # Whatever runner serves the app: the default access log would print ws_ticket.
        handler_args={"access_log_class": AccessLogger},
    )
    app[STATE] = state
    app[websocket.LIMITS] = websocket.UpgradeLimits(settings)
    http.install(app)  # its routes, their rate limits, and dependency errors as 503
    app.add_routes(websocket.routes)
    app.add_routes(openapi.routes)
    redact.install()  # aiohttp's parse-error log quotes request lines: ?ws_ticket=...
    if static_dir is not None:
        app.router.add_get("/", _index(static_dir / "index.html"))
        app.router.add_static("/static/", static_dir)
    app.on_shutdown.append(_close_sockets)
    return app


def _index(path: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    return index


async def _close_sockets(app: web.Application) -> None:
    state = app[STATE]
    state.readiness.fail(Condition.SHUTDOWN, "shutting down")
    state.registry.writes.flush_now()  # what is queued goes out before the close frames
    sockets = [conn.ws for conn in state.registry.connections()]
    await asyncio.gather(
        *(ws.close(code=CloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )
