"""`make_app(settings, config) -> web.Application`: the gateway (`gateway.app`) assembled with
its event source — the in-process CDC pipeline, or a feed from the Redis bus (`walcast.bus`).

The source decides the history behind resumes (`gateway.history.MemoryHistory`, or the
Redis streams through `walcast.bus.feed.RedisFeed`), the ticket store (in memory, or in
Redis, shared by every node) and the readiness conditions; the `GatewayState` is built with
them, complete. Background work runs in `cleanup_ctx`, aiohttp's background-task idiom: one
`web.AppKey` per resource, one context per task, cancelled and awaited on the way out, in
reverse order (the pipeline stops, sending a last status update, before the pools close).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import asyncpg
import psycopg
from aiohttp import web

from cdc.setup import SlotRecreated
from gateway.app import make_gateway_app
from gateway.config import RealtimeConfig, Settings
from gateway.events import AccessRevoked, RoutedEvent
from gateway.fanout import WriteScheduler
from gateway.history import History, MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.protocol import CloseCode
from gateway.readiness import Condition, Readiness
from gateway.sessions import BetterAuthSessionStore, JwtSessionStore, SessionStore
from gateway.state import STATE, GatewayState
from gateway.tickets import JtiStore, MemoryJtiStore, RedisJtiStore
from walcast.aio import cancel_and_wait
from walcast.bus.app import bus_keys, install_node, make_feed
from walcast.bus.client import redis_client
from walcast.dsn import to_url
from walcast.pipeline import TICK_SECONDS, Pipeline

__all__ = ["PIPELINE", "LocalSink", "make_app"]

log = logging.getLogger(__name__)

SLOT_METRICS_EVERY = 5  #: ticks between slot queries (retained WAL gauge)

PIPELINE = web.AppKey("walcast_pipeline", Pipeline)


class LocalSink:
    """The in-process bus: events go straight to this node's hubs and history."""

    publish: Callable[[Sequence[RoutedEvent | AccessRevoked]], None]

    def __init__(self, registry: HubRegistry, history: MemoryHistory) -> None:
        self._history = history
        self.publish = registry.publish_all  # the events of one item, without a frame of ours

    async def wait_for_room(self) -> None:
        """Never full: delivery is queued per socket, each bounded on its own."""

    def mark_position(self, commit_lsn: int) -> None:
        self._history.advance((commit_lsn, 0))


def make_app(
    settings: Settings,
    config: RealtimeConfig,
    *,
    run_pipeline: bool = True,
    sessions: SessionStore | None = None,
    static_dir: Path | None = None,
    redis_prefix: str | None = None,
) -> web.Application:
    """The gateway app; with `settings.redis_url`, a node on the Redis bus, which also runs a
    reader candidate if `run_pipeline`. `redis_prefix` (default: env ``WALCAST_REDIS_PREFIX``
    or ``walcast:``) prefixes every Redis key."""
    metrics = Metrics()
    writes = WriteScheduler(settings.write_coalesce_ms / 1000, metrics.write_passes.observe)
    readiness = Readiness()
    history: History
    jti_store: JtiStore
    if settings.redis_url:
        keys = bus_keys(redis_prefix)
        history = feed = make_feed(settings, config, keys, readiness)
        tickets_redis = redis_client(settings)
        jti_store = RedisJtiStore(tickets_redis, prefix=keys.jti, started_key=keys.started)
    else:
        history = memory = MemoryHistory(
            seconds=config.historySeconds,
            max_events=config.historyMaxEvents,
            max_total_events=config.historyMaxTotalEvents,
            max_total_bytes=config.historyMaxBytes,
        )
        jti_store = MemoryJtiStore()
    registry = HubRegistry(
        metrics,
        history,
        writes=writes,
        max_replays=settings.max_replays,
        replay_stall_seconds=settings.replay_stall_seconds,
    )
    state = GatewayState(
        settings=settings,
        config=config,
        metrics=metrics,
        registry=registry,
        jti_store=jti_store,
        readiness=readiness,
        sessions=sessions,
    )
    app = make_gateway_app(state, static_dir=static_dir)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_gc_pauses)
    if settings.redis_url:
        install_node(app, keys=keys, feed=feed, redis=tickets_redis, with_reader=run_pipeline)
    elif run_pipeline:
        readiness.fail(Condition.REPLICATION, "starting")

        def on_ready(start_lsn: int) -> None:
            memory.epoch = pipeline.epoch
            memory.complete_from = (start_lsn, 0)
            readiness.clear(Condition.REPLICATION)

        sink = LocalSink(registry, memory)
        app[PIPELINE] = pipeline = Pipeline(settings, config, sink, metrics, on_ready=on_ready)
        app.cleanup_ctx.append(_pipeline)
        app.cleanup_ctx.append(_ticker)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    """The gateway's asyncpg pool (broadcasts, Better Auth sessions), and the session store."""
    state = app[STATE]
    settings = state.settings
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


async def _gc_pauses(app: web.Application) -> AsyncIterator[None]:
    """`walcast_gc_pause_seconds` while the app runs."""
    stop = app[STATE].metrics.watch_gc()
    try:
        yield
    finally:
        stop()


def _session_store(settings: Settings, pool: asyncpg.Pool | None) -> SessionStore | None:
    if settings.jwt_session_secret or settings.jwt_session_jwks:
        return JwtSessionStore.from_config(
            secret=settings.jwt_session_secret, jwks=settings.jwt_session_jwks
        )
    if pool is not None:
        return BetterAuthSessionStore(pool)
    return None


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_supervise(app[PIPELINE], app[STATE]), name="walcast-pipeline")
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def _supervise(pipeline: Pipeline, state: GatewayState) -> None:
    readiness, registry = state.readiness, state.registry
    while True:
        try:
            await pipeline.run()
            return
        except asyncio.CancelledError:
            raise
        except SlotRecreated as exc:
            # The history has a gap it cannot vouch for: forget it, and close every socket
            # (1013) so that each client resumes from its cursor and gets resync_required.
            log.warning("%s; starting the history anew: clients will resync", exc)
            readiness.fail(Condition.REPLICATION, "starting the history anew")
            assert isinstance(registry.history, MemoryHistory)
            registry.history.restart()
            for conn in list(registry.connections()):
                conn.close(CloseCode.TRY_AGAIN_LATER, "history restarted: resume to resync")
        except Exception as exc:
            readiness.fail(Condition.REPLICATION, f"replication stopped: {exc}")
            log.exception("the CDC pipeline stopped")
            raise


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_tick(app[PIPELINE], app[STATE].registry), name="walcast-tick")
    try:
        yield
    finally:
        await cancel_and_wait(task)


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
