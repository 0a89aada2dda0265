"""Reader high availability: one reader per slot at a time, the others standing by.

`ReaderService` takes a PostgreSQL advisory lock keyed from the slot name before streaming.
Standbys retry every second; the lock dies with its holder's connection, so a standby takes
over within seconds of a crash (kill -9 included). While it holds the lock it runs the
pipeline into a `RedisSink`, and rebuilds the history whenever Redis loses it (or starts a new
epoch when the slot had to be re-created under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any

import psycopg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from cdc.setup import SlotRecreated
from gateway.config import RealtimeConfig, Settings
from gateway.metrics import Metrics
from walcast.bus.client import StatusCallback
from walcast.bus.keys import BusKeys
from walcast.bus.sink import TICK_SECONDS, HistoryLost, RedisSink
from walcast.pipeline import Pipeline

__all__ = ["ReaderService", "reader_lock_key"]

log = logging.getLogger(__name__)

LOCK_RETRY_SECONDS = 1.0
LOCK_CHECK_SECONDS = 2.0


def reader_lock_key(slot: str) -> int:
    """The advisory lock (a signed 64-bit key) readers of `slot` take before streaming."""
    digest = hashlib.blake2b(f"walcast-reader:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _LockLost(Exception):
    pass


class ReaderService:
    """Reader high availability: wait for the advisory lock, then run the pipeline into Redis.

    `on_status(ready, reason)` says whether this process is the active, caught-up reader.
    """

    def __init__(
        self,
        settings: Settings,
        config: RealtimeConfig,
        metrics: Metrics,
        redis: aioredis.Redis,
        keys: BusKeys,
        *,
        on_status: StatusCallback,
    ) -> None:
        assert settings.database_url is not None
        self._settings = settings
        self._config = config
        self._metrics = metrics
        self._redis = redis
        self._keys = keys
        self._on_status = on_status
        self._caught_up = False
        self._redis_ok = True
        self.active = Gauge(
            "walcast_reader_active",
            "1 while this process holds the reader lock and streams",
            registry=metrics.registry,
        )
        self.duplicates = Counter(
            "walcast_bus_duplicates",
            "Events Redis refused as already stored (re-read after a restart)",
            registry=metrics.registry,
        )
        self.sink: RedisSink | None = None

    async def run(self) -> None:
        dsn = self._settings.database_url
        assert dsn is not None
        lock = reader_lock_key(self._settings.slot)
        self._on_status(False, "standby: waiting for the reader lock")
        waiting_logged = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                self._on_status(False, f"cannot reach PostgreSQL: {type(exc).__name__}")
                await asyncio.sleep(LOCK_RETRY_SECONDS)
                continue
            try:
                while True:
                    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (lock,))
                    row = await cur.fetchone()
                    if row is not None and row[0]:
                        break
                    if not waiting_logged:
                        log.info("another reader is active: standing by", extra={"slot": lock})
                        waiting_logged = True
                    await asyncio.sleep(LOCK_RETRY_SECONDS)
                log.info("took the reader lock: streaming", extra={"slot": self._settings.slot})
                waiting_logged = False
                self.active.set(1)
                await self._lead(conn)
            except (psycopg.OperationalError, _LockLost) as exc:
                log.warning("lost the reader lock", extra={"error": type(exc).__name__})
            except Exception as exc:
                log.exception("the reader stopped; retrying")
                self._on_status(False, f"reader stopped: {exc}")
                await asyncio.sleep(5 * LOCK_RETRY_SECONDS)
            finally:
                self.active.set(0)
                self._caught_up = False
                self._on_status(False, "standby: waiting for the reader lock")
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(LOCK_RETRY_SECONDS)

    def _report(self) -> None:
        if not self._redis_ok:
            self._on_status(False, "Redis unavailable")
        elif not self._caught_up:
            self._on_status(False, "catching up with the WAL")
        else:
            self._on_status(True, "")

    def _redis_status(self, ok: bool, reason: str) -> None:
        self._redis_ok = ok
        self._report()

    def _ready(self, start_lsn: int) -> None:
        self._caught_up = True
        self._report()

    async def _lead(self, lock_conn: psycopg.AsyncConnection[Any]) -> None:
        """Stream while holding the lock; rebuild the history whenever Redis loses it."""
        while True:
            # A new sink reports Redis trouble itself (the last one may have been cancelled
            # mid-retry, when upkeep found the history gone).
            self._caught_up, self._redis_ok = False, True
            self._report()
            sink = self.sink = RedisSink(
                self._redis,
                self._keys,
                history_seconds=self._config.historySeconds,
                max_len=self._config.historyMaxEvents,
                on_redis=self._redis_status,
            )
            pipeline = Pipeline(
                self._settings, self._config, sink, self._metrics, on_ready=self._ready
            )
            start_lsn = await pipeline.prepare()
            assert pipeline.identity is not None
            pipeline.epoch = await sink.start(start_lsn, pipeline.identity, pipeline.wal_end)
            tasks = [
                asyncio.create_task(pipeline.run(start_lsn), name="walcast-reader"),
                asyncio.create_task(sink.run(), name="walcast-reader-sink"),
                asyncio.create_task(self._watch_lock(lock_conn), name="walcast-reader-lock"),
                asyncio.create_task(self._tick(pipeline, sink), name="walcast-reader-tick"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            error = next((t.exception() for t in done if t.exception() is not None), None)
            if isinstance(error, HistoryLost):
                log.warning("Redis lost the history: re-reading the slot's window to rebuild it")
                continue
            if isinstance(error, SlotRecreated):
                log.warning("%s; starting a new history epoch", error)
                continue
            if error is None:
                raise _LockLost("the pipeline stopped")
            raise error

    async def _watch_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            await asyncio.sleep(LOCK_CHECK_SECONDS)
            try:
                async with asyncio.timeout(5):
                    await conn.execute("SELECT 1")
            except (psycopg.Error, TimeoutError) as exc:
                raise _LockLost("the lock's connection failed") from exc

    async def _tick(self, pipeline: Pipeline, sink: RedisSink) -> None:
        reported = 0
        while True:
            await asyncio.sleep(TICK_SECONDS)
            pipeline.tick()
            await sink.upkeep()
            if sink.duplicates > reported:
                self.duplicates.inc(sink.duplicates - reported)
                reported = sink.duplicates
