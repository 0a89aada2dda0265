"""How walcast talks to Redis: one client factory (it reconnects a connection Redis dropped),
and which failures count as transient — the reader retries them, the nodes wait them out,
and both report them to readiness rather than crash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import Settings

__all__ = ["TRANSIENT", "StatusCallback", "redis_client"]

TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
"""Failures that pass: Redis restarting, a dropped connection, a timeout."""

StatusCallback = Callable[[bool, str], None]
"""Called with (ok, reason) when a part of the bus becomes usable or stops being so."""


def redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """A client for `settings.redis_url` that reconnects a connection Redis dropped (a restart)
    and retries the command a few times before reporting the error. Connects lazily."""
    assert settings.redis_url is not None
    options.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    options.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
    options.setdefault("health_check_interval", 5)
    return aioredis.Redis.from_url(settings.redis_url, **options)
