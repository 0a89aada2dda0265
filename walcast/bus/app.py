"""aiohttp wiring of the Redis bus: what `walcast.app` adds to a gateway app to make it a node
on the bus, and the reader-only app of ``walcast serve --no-gateway``.

One `web.AppKey` per resource (the keys, the ticket store's client, the feed) and one
`cleanup_ctx` per background task (the feed's read loop, the hub trim, the reader candidate),
each cancelled and awaited on the way out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from aiohttp import web

from gateway import http
from gateway.config import RealtimeConfig, Settings
from gateway.history import MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.readiness import Condition, Readiness
from gateway.state import STATE, GatewayState
from gateway.tickets import MemoryJtiStore
from walcast.aio import cancel_and_wait
from walcast.bus.client import redis_client
from walcast.bus.feed import BLOCK_MS, RedisFeed
from walcast.bus.keys import BusKeys, prefix_from_env
from walcast.bus.leader import ReaderService
from walcast.bus.sink import TICK_SECONDS

__all__ = [
    "BUS_KEYS",
    "FEED",
    "REDIS",
    "bus_keys",
    "install_node",
    "make_feed",
    "make_reader_app",
    "reader_context",
]

BUS_KEYS = web.AppKey("walcast_bus_keys", BusKeys)
REDIS = web.AppKey("walcast_redis", aioredis.Redis)  #: the client of the ticket store
FEED = web.AppKey("walcast_redis_feed", RedisFeed)

STANDBY = "standby: waiting for the reader lock"


def bus_keys(prefix: str | None = None) -> BusKeys:
    """The keys under `prefix` (default: env ``WALCAST_REDIS_PREFIX`` or ``walcast:``)."""
    return BusKeys(prefix if prefix is not None else prefix_from_env())


def make_feed(
    settings: Settings, config: RealtimeConfig, keys: BusKeys, readiness: Readiness
) -> RedisFeed:
    """A node's feed with clients of its own (it closes them); it reports Redis's state to
    `readiness`, whose `Condition.REDIS` fails until the feed has read where Redis stands."""
    readiness.fail(Condition.REDIS, "connecting to Redis")

    def status(ok: bool, reason: str) -> None:
        readiness.report(Condition.REDIS, ok, reason)

    blocking = redis_client(settings, socket_timeout=BLOCK_MS / 1000 + 10)
    return RedisFeed(redis_client(settings), blocking, keys, config, on_status=status)


def install_node(
    app: web.Application,
    *,
    keys: BusKeys,
    feed: RedisFeed,
    redis: aioredis.Redis,
    with_reader: bool,
) -> None:
    """Run `app` (its `STATE` built on `feed`) as a gateway node on the bus, and, if
    `with_reader`, as a reader candidate too (readiness is then the node's, not the reader's).
    `redis` is the ticket store's client: closed last."""
    app[BUS_KEYS], app[FEED], app[REDIS] = keys, feed, redis
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_feed)
    app.cleanup_ctx.append(_hub_trim)
    if with_reader:
        app.cleanup_ctx.append(reader_context(drives_readiness=False))


async def _redis(app: web.Application) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await app[REDIS].aclose()


async def _feed(app: web.Application) -> AsyncIterator[None]:
    feed = app[FEED]
    task = asyncio.create_task(feed.run(app[STATE].registry), name="walcast-redis-feed")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        await feed.aclose()


async def _hub_trim(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_trim_every_tick(app[STATE].registry), name="walcast-redis-trim")
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def _trim_every_tick(registry: HubRegistry) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        registry.trim()


def reader_context(*, drives_readiness: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running a `ReaderService` (the app needs `STATE` and `BUS_KEYS`);
    with `drives_readiness`, its status is the app's `Condition.REPLICATION`."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        redis = redis_client(state.settings)

        def status(ok: bool, reason: str) -> None:
            if drives_readiness:
                state.readiness.report(Condition.REPLICATION, ok, reason)

        service = ReaderService(
            state.settings, state.config, state.metrics, redis, app[BUS_KEYS], on_status=status
        )
        task = asyncio.create_task(service.run(), name="walcast-reader-ha")
        try:
            yield
        finally:
            await cancel_and_wait(task)
            await redis.aclose()

    return context


def make_reader_app(
    settings: Settings, config: RealtimeConfig, *, prefix: str | None = None
) -> web.Application:
    """`walcast serve --no-gateway`: the reader, with /healthz, /readyz and /metrics only."""
    app = web.Application()
    metrics = Metrics()
    app[STATE] = GatewayState(
        settings=settings,
        config=config,
        metrics=metrics,
        registry=HubRegistry(metrics, MemoryHistory()),
        jti_store=MemoryJtiStore(),
        readiness=Readiness({Condition.REPLICATION: STANDBY}),
    )
    app[BUS_KEYS] = bus_keys(prefix)
    app.router.add_get("/healthz", http.healthz)
    app.router.add_get("/readyz", http.readyz)
    app.router.add_get("/metrics", http.metrics)
    app.cleanup_ctx.append(reader_context(drives_readiness=True))
    return app
