"""`make_app(settings, config) -> web.Application`: the gateway, and (unless disabled) the CDC
pipeline feeding it, owned by the app's `cleanup_ctx` so they start and stop together.

Shutdown (SIGTERM via aiohttp's runner): the site stops accepting, `on_shutdown` closes every
socket with 1001 "going away" after flushing what was queued, then the pipeline is cancelled
(it sends a last status update) and the pools close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import psycopg
from aiohttp import web

from gateway import http, openapi, redact, websocket
from gateway.accesslog import AccessLogger
from gateway.config import RealtimeConfig, Settings
from gateway.events import AccessRevoked, RoutedEvent
from gateway.fanout import WriteScheduler
from gateway.hubs import HubRegistry
from gateway.masking import resolve_custom
from gateway.metrics import Metrics
from gateway.protocol import CloseCode
from gateway.sessions import BetterAuthSessionStore, JwtSessionStore, SessionStore
from gateway.state import STATE, GatewayState
from gateway.tickets import MemoryJtiStore, RedisJtiStore
from walcast.aio import cancel_and_wait
from walcast.dsn import to_url
from walcast.pipeline import Pipeline
from walcast.redisbus import BUS_KEYS, redis_client
from walcast.redisfeed import RedisHubRegistry, install_gateway

__all__ = ["LocalSink", "make_app"]

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
SLOT_METRICS_EVERY = 5  #: ticks between slot queries (retained WAL gauge)


class LocalSink:
    """The in-process bus: events go straight to this node's hubs."""

    def __init__(self, registry: HubRegistry) -> None:
        self._registry = registry

    async def publish(self, events: Sequence[RoutedEvent | AccessRevoked]) -> None:
        registry = self._registry
        for event in events:
            if isinstance(event, AccessRevoked):
                registry.revoke(event)
            else:
                registry.publish(event)

    def mark_position(self, commit_lsn: int) -> None:
        self._registry.advance((commit_lsn, 0))


def make_app(
    settings: Settings,
    config: RealtimeConfig,
    *,
    run_pipeline: bool = True,
    sessions: SessionStore | None = None,
    static_dir: Path | None = None,
    redis_prefix: str | None = None,
) -> web.Application:
    """The gateway app; with `settings.redis_url`, a node on the Redis bus (`walcast.redisfeed`),
    which also runs a reader candidate if `run_pipeline`. `redis_prefix` (default: env
    ``WALCAST_REDIS_PREFIX`` or ``walcast:``) prefixes every Redis key."""
    for table in config.tables.values():  # a custom mask that cannot be imported fails now
        for rule in table.masking.values():
            if rule.type == "custom":
                resolve_custom(rule)
    app = web.Application(
        client_max_size=max(settings.max_broadcast_bytes, 64 * 1024),
        # Whatever runner serves the app: the default access log would print ws_ticket.
        handler_args={"access_log_class": AccessLogger},
    )
    metrics = Metrics()
    registry = (RedisHubRegistry if settings.redis_url else HubRegistry)(
        metrics,
        history_seconds=config.historySeconds,
        max_events=config.historyMaxEvents,
        max_total_events=config.historyMaxTotalEvents,
        writes=WriteScheduler(settings.write_coalesce_ms / 1000, metrics.write_passes.observe),
    )
    app[STATE] = state = GatewayState(
        settings=settings,
        config=config,
        metrics=metrics,
        registry=registry,
        jti_store=MemoryJtiStore(),
        sessions=sessions,
    )
    http.install(app)  # its routes, their rate limits, and dependency errors as 503
    app.add_routes(websocket.routes)
    app.add_routes(openapi.routes)
    app[websocket.LIMITS] = websocket.UpgradeLimits(settings)
    redact.install()  # aiohttp's parse-error log quotes request lines: ?ws_ticket=...
    if static_dir is not None:
        app.router.add_get("/", _index(static_dir / "index.html"))
        app.router.add_static("/static/", static_dir)
    app.cleanup_ctx.append(_databases)
    if settings.redis_url:
        install_gateway(app, with_reader=run_pipeline, prefix=redis_prefix)
    elif run_pipeline:
        app.cleanup_ctx.append(_pipeline)
    else:
        state.ready.set()
    app.on_shutdown.append(_close_sockets)
    return app


def _index(path: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    return index


async def _databases(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    redis = None
    if settings.redis_url:
        redis = redis_client(settings)
        keys = app.get(BUS_KEYS)
        state.jti_store = RedisJtiStore(redis, prefix=keys.jti) if keys else RedisJtiStore(redis)
    if settings.database_url:
        state.pool = await asyncpg.create_pool(
            to_url(settings.database_url), min_size=1, max_size=10
        )
    if state.sessions is None:
        state.sessions = _session_store(settings, state.pool)
    try:
        yield
    finally:
        if state.pool is not None:
            await state.pool.close()
        if redis is not None:
            await redis.aclose()


def _session_store(settings: Settings, pool: asyncpg.Pool | None) -> SessionStore | None:
    if settings.jwt_session_secret or settings.jwt_session_jwks:
        return JwtSessionStore.from_config(
            secret=settings.jwt_session_secret, jwks=settings.jwt_session_jwks
        )
    if pool is not None:
        return BetterAuthSessionStore(pool)
    return None


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    registry = state.registry

    def on_ready(start_lsn: int) -> None:
        registry.complete_from = (start_lsn, 0)
        state.ready.set()

    pipeline = Pipeline(
        state.settings, state.config, LocalSink(registry), state.metrics, on_ready=on_ready
    )
    task = asyncio.create_task(_supervise(pipeline, state), name="walcast-pipeline")
    ticker = asyncio.create_task(_tick(pipeline, registry), name="walcast-tick")
    try:
        yield
    finally:
        await cancel_and_wait(ticker, task)


async def _supervise(pipeline: Pipeline, state: GatewayState) -> None:
    try:
        await pipeline.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.not_ready_reason = f"replication stopped: {exc}"
        state.ready.clear()
        log.exception("the CDC pipeline stopped")
        raise


async def _tick(pipeline: Pipeline, registry: HubRegistry) -> None:
    ticks = 0
    while True:
        await asyncio.sleep(TICK_SECONDS)
        registry.trim()
        pipeline.tick()
        ticks += 1
        if ticks % SLOT_METRICS_EVERY == 1:
            try:
                await pipeline.refresh_slot_metrics()
            except psycopg.Error as exc:
                log.warning("could not read the slot's retained WAL: %s", exc)


async def _close_sockets(app: web.Application) -> None:
    state = app[STATE]
    state.ready.clear()
    state.not_ready_reason = "shutting down"
    state.registry.writes.flush_now()  # what is queued goes out before the close frames
    sockets = [conn.ws for conn in state.registry.connections()]
    await asyncio.gather(
        *(ws.close(code=CloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )
