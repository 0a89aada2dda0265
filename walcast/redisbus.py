"""The Redis bus, reader side: one reader publishes routed events to Redis Streams, from
which any number of gateway nodes (`walcast.redisfeed`) fan out and serve `since=` resumes.

Why Redis Streams: an append-only log with explicit, ordered ids is exactly walcast's cursor
space, and users already know how to run Redis. There is no walcast-to-walcast protocol.

Keys (`prefix` defaults to ``walcast:``, env ``WALCAST_REDIS_PREFIX``)::

    {prefix}org:{organizationId}   stream: that organization's events
    {prefix}all                    stream: events for every organization (TRUNCATE)
    {prefix}control                stream: access revocations (spec §6), read by every node
    {prefix}floor                  cursor: where the history in Redis begins
    {prefix}position               cursor: everything below it has been published
    {prefix}wake:{node}            stream: wakes a node's blocking read (see redisfeed)
    {prefix}jti:{jti}              single-use ticket ids (`gateway.tickets.RedisJtiStore`)

Rules the reader keeps:

* **Exactly once in the stream.** An entry's id is its cursor, ``{commit_lsn}-{position}``;
  an XADD whose id is not above the stream's top is refused by Redis and counted as a
  duplicate. A batch of reader items goes in one Lua call together with the ``position``
  update, so a transaction re-read after a crash or a failover is never stored twice.
  Access revocations (no position of their own) are numbered within their transaction, which
  is deterministic. An entry holds the events of one item for one stream (an UPDATE that moves
  a row between users of one organization is a DELETE and an INSERT with the same cursor).
* **Batching.** `publish` queues; `RedisSink.run` stores the queue one batch per round trip
  (one Lua call for the whole batch), so everything queued while a batch is on its way goes
  in the next one. A lone event still costs one round trip; a burst costs one per batch, not one
  per row. The queue is bounded (`max_queued` entries): past that, `publish` waits.
* **Acknowledgement.** A commit handed to `mark_position` counts only once every entry queued
  before it is stored; the pipeline then lets the slot confirm up to the position it reached
  `historySeconds` ago (the same `RetentionWindow` as the in-process bus). So the WAL of the
  history window is kept: if Redis loses its data (a restart without persistence), the reader
  notices (``floor`` is gone), restarts streaming from the slot and rebuilds the streams, and
  clients still resume without a gap. A reader that starts with Redis intact skips, without a
  round trip, every transaction committed below the stored ``position``, so a failover
  re-reads the window quickly.
* **Redis unavailable**: the batch is retried with capped, jittered back-off (entries that
  did land are refused as duplicates); the queue fills and the reader waits; the slot position
  does not move (the WAL is retained, nothing is lost); `/readyz` says 503 meanwhile.
* **Trimming**: XADD caps each stream (``MAXLEN ~ historyMaxEvents``); every few seconds the
  reader trims the streams it wrote to by time (``XTRIM MINID``, the position it reached
  `historySeconds` ago). Nodes detect a trim past a client's cursor from the stream's metadata
  (Redis 7.0+), so a quiet organization's stream never forces a resync. Streams are never
  deleted: the top id is what refuses duplicates; an emptied stream is a small key.
* **One reader at a time**: `ReaderService` takes a PostgreSQL advisory lock keyed from the
  slot name before streaming. Standbys retry every second; the lock dies with its holder's
  connection, so a standby takes over within seconds of a crash (kill -9 included).

The streams carry rows unmasked (masking stays on the nodes, once per visibility class), so
Redis must be as private as the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson
import psycopg
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cdc.backoff import full_jitter
from cdc.cursors import CursorKey, format_cursor, parse_cursor
from cdc.render import RawJson
from gateway.config import RealtimeConfig, Settings
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from walcast.aio import cancel_and_wait
from walcast.pipeline import Pipeline, RetentionWindow

__all__ = [
    "BusKeys",
    "HistoryLost",
    "ReaderService",
    "RedisSink",
    "decode_events",
    "encode_events",
    "make_reader_app",
    "parse_stream_id",
    "prefix_from_env",
    "reader_context",
    "reader_lock_key",
    "redis_client",
    "stream_id",
]

log = logging.getLogger(__name__)

Event = RoutedEvent | AccessRevoked

BLOCK_MS = 10_000  #: one XREAD waits at most this long (a dead connection shows up in time)
HISTORY_WAIT_SECONDS = 10.0  #: how long an attach waits for Redis or the node to catch up
LOCK_RETRY_SECONDS = 1.0
LOCK_CHECK_SECONDS = 2.0
TICK_SECONDS = 1.0
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


def prefix_from_env(env: Mapping[str, str] | None = None) -> str:
    """The key prefix: ``WALCAST_REDIS_PREFIX`` or ``walcast:``."""
    env = os.environ if env is None else env
    return env.get("WALCAST_REDIS_PREFIX") or "walcast:"


@dataclass(frozen=True)
class BusKeys:
    prefix: str = "walcast:"

    def org(self, organization_id: str) -> str:
        return f"{self.prefix}org:{organization_id}"

    def wake(self, node: str) -> str:
        return f"{self.prefix}wake:{node}"

    @property
    def shared(self) -> str:
        return f"{self.prefix}all"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    @property
    def floor(self) -> str:
        return f"{self.prefix}floor"

    @property
    def position(self) -> str:
        return f"{self.prefix}position"

    @property
    def jti(self) -> str:
        return f"{self.prefix}jti:"


def stream_id(key: CursorKey) -> str:
    return f"{key[0]}-{key[1]}"


def parse_stream_id(text: bytes | str) -> CursorKey:
    raw = text.decode() if isinstance(text, bytes) else text
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def reader_lock_key(slot: str) -> int:
    """The advisory lock (a signed 64-bit key) readers of `slot` take before streaming."""
    digest = hashlib.blake2b(f"walcast-reader:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# -- the wire format of stream entries ---------------------------------------------------------
#
# An entry holds field ``e``: a JSON array of events, each an array (kind first). Rows travel
# unmasked with their values as `cdc.changes` loaded them; a `RawJson` cell (numbers, json) is
# written as a string starting with NUL, which no PostgreSQL text value can contain.

_NUL = "\x00"


def _tag(value: Any) -> Any:
    if type(value) is RawJson:
        return _NUL + value
    raise TypeError(f"cannot put {type(value).__name__} on the bus")


def _untag(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return RawJson(value[1:]) if value.startswith(_NUL) else value
    if kind is list:
        return [_untag(item) for item in value]
    if kind is dict:
        return {name: _untag(item) for name, item in value.items()}
    return value


def _encode_one(event: Event) -> list[Any]:
    if isinstance(event, ChangeEvent):
        table = event.table
        return [
            "c",
            event.organization_id,
            event.cursor,
            event.commit_lsn,
            event.commit_time.isoformat(),
            table.schema_name,
            table.table_name,
            event.event_type,
            event.new,
            event.old,
            list(event.unchanged),
            event.target_user,
            event.owner_id,
        ]
    if isinstance(event, BroadcastEvent):
        return [
            "b",
            event.organization_id,
            event.cursor,
            event.commit_lsn,
            event.event,
            event.payload,
            sorted(event.target_roles),
            event.target_user,
        ]
    return [
        "r",
        event.reason,
        event.organization_id,
        event.user_id,
        event.session_id,
        event.commit_lsn,
        event.committed_at,
    ]


def encode_events(events: Iterable[Event]) -> bytes:
    return orjson.dumps(
        [_encode_one(event) for event in events],
        default=_tag,
        option=orjson.OPT_PASSTHROUGH_SUBCLASS,
    )


def decode_events(data: bytes, config: RealtimeConfig) -> list[Event]:
    """Events from one entry; a change of a table this node's config lacks is dropped."""
    tagged = b"\\u0000" in data
    events: list[Event] = []
    for item in orjson.loads(data):
        kind = item[0]
        if kind == "c":
            org, cursor, lsn, when, schema, name, event_type, new, old = item[1:10]
            unchanged, user, owner = item[10:13]
            table = config.table(schema, name)
            if table is None:
                log.warning("dropped an event of %s.%s: not in this node's config", schema, name)
                continue
            if tagged:
                new, old = _untag(new), _untag(old)
            events.append(
                ChangeEvent(
                    organization_id=org,
                    cursor=cursor,
                    commit_lsn=lsn,
                    commit_time=datetime.fromisoformat(when),
                    table=table,
                    event_type=event_type,
                    new=new,
                    old=old,
                    unchanged=tuple(unchanged),
                    target_user=user,
                    owner_id=owner,
                )
            )
        elif kind == "b":
            _, org, cursor, lsn, name, payload, roles, user = item
            events.append(
                BroadcastEvent(
                    organization_id=org,
                    cursor=cursor,
                    commit_lsn=lsn,
                    event=name,
                    payload=orjson.Fragment(orjson.dumps(payload)),
                    target_roles=frozenset(roles),
                    target_user=user,
                )
            )
        elif kind == "r":
            _, reason, org, user, session, lsn, committed_at = item
            events.append(AccessRevoked(reason, org, user, session, lsn, committed_at))
    return events


# -- the reader side -----------------------------------------------------------------------------

# One batch of entries in one call. KEYS: floor, position, then the streams of the batch.
# ARGV: maxlen, the new position ('' = leave it), then per reader item: its entry id, how many
# streams it goes to (n), and n pairs (index of the stream in KEYS, entry payload).
# Returns -1 when the floor is gone (Redis lost its data), else the number of duplicates.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local duplicates = 0
local i = 3
while i <= #ARGV do
  local id, streams = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, streams do
    local added = redis.pcall(
      'XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', ARGV[1], id, 'e', ARGV[i + 1])
    if type(added) == 'table' and added.err then
      if string.find(added.err, 'equal or smaller', 1, true) then
        duplicates = duplicates + 1
      else
        return added
      end
    end
    i = i + 2
  end
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
return duplicates
"""

# KEYS: floor, position, stream...; ARGV: MINID ('' = no trim), new position ('' = none),
# the position this reader last wrote ('' = none). The position moves only if nobody else
# moved it meanwhile (a publish racing this call). Returns -1 when the floor is gone, 1 when
# the position moved, else 0.
_UPKEEP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local moved = 0
if ARGV[2] ~= '' then
  local current = redis.call('GET', KEYS[2])
  if (current == false and ARGV[3] == '') or current == ARGV[3] then
    redis.call('SET', KEYS[2], ARGV[2])
    moved = 1
  end
end
if ARGV[1] ~= '' then
  for i = 3, #KEYS do redis.call('XTRIM', KEYS[i], 'MINID', ARGV[1]) end
end
return moved
"""


class _Entry(NamedTuple):
    """The stream entries of one reader item: one per stream, all with the same id."""

    key: CursorKey  #: the entry id
    moves_position: bool  #: a change or broadcast (id = cursor), not a revocation
    streams: tuple[str, ...]
    payloads: tuple[bytes, ...]  #: `encode_events` of each stream's events
    events: int


class HistoryLost(Exception):
    """Redis no longer has the history (restarted without persistence): rebuild it."""


StatusCallback = Callable[[bool, str], None]


class RedisSink:
    """The reader's `EventSink` on the Redis bus (see the module docstring for its rules)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: BusKeys,
        *,
        history_seconds: float,
        max_len: int = 100_000,
        on_redis: StatusCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        max_queued: int = 1000,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.history_seconds = history_seconds
        self._max_len = str(max_len)
        self._on_redis = on_redis or (lambda ok, reason: None)
        self._clock = clock
        self._backoff = (backoff_base, backoff_cap)
        self._publish = redis.register_script(_PUBLISH)
        self._upkeep = redis.register_script(_UPKEEP)
        self._window: RetentionWindow | None = None
        self._skip_below = 0  #: transactions committed below this LSN are already in Redis
        self._position: CursorKey = (0, 0)  #: the position this sink last wrote
        self._written = ""  #: ... as stored ('' = none yet)
        self._handled = 0  #: every transaction that commits below this LSN is published
        self._control: tuple[int, int] = (-1, 0)  #: (commit LSN, revocations numbered so far)
        self._streams: dict[str, float] = {}  #: streams to trim → when last written
        self._trimmed_at = 0.0
        self._max_queued = max_queued
        self._queue: list[_Entry | int] = []  #: entries to store, and marks (commit LSNs)
        self._queued_entries = 0
        self._storing = False  #: a batch is on its way to Redis
        self._work = asyncio.Event()  #: the queue has something for `run`
        self._room = asyncio.Event()  #: the queue is below `max_queued`
        self._room.set()
        self._idle = asyncio.Event()  #: nothing queued, nothing on its way
        self._idle.set()
        self.duplicates = 0
        self.published = 0

    async def start(self, start_lsn: int) -> None:
        """Read where Redis stands; call before the pipeline streams from `start_lsn`."""
        keys = self._keys
        floor, position = await self._retrying(lambda: self._redis.mget(keys.floor, keys.position))
        self._control = (-1, 0)
        if floor is None:
            # A fresh Redis, or one that lost its data: the history begins where PostgreSQL
            # resends from; everything from there is published (again).
            await self._retrying(lambda: self._redis.set(keys.floor, format_cursor(start_lsn, 0)))
            self._skip_below, self._position, self._written = 0, (0, 0), ""
            if position is not None:
                await self._retrying(lambda: self._redis.delete(keys.position))
            log.info("Redis history begins at %X", start_lsn)
        else:
            stored = parse_cursor(position.decode()) if position else None
            self._position = stored or (0, 0)
            self._written = position.decode() if stored else ""
            self._skip_below = self._position[0]
        self._window = RetentionWindow(self.history_seconds, start_lsn, self._clock)
        now = self._clock()
        async for key in self._redis.scan_iter(match=f"{keys.prefix}org:*", count=1000):
            self._streams.setdefault(key.decode(), now)
        self._streams.setdefault(keys.shared, now)

    async def publish(self, events: Sequence[Event]) -> None:
        """Queue the events of one reader item for `run` to store.

        Returns at once unless `max_queued` entries are waiting (then once `run` has taken
        them): the round trip to Redis is not the reader's, so while one batch is on its way
        the next one gathers.
        """
        if not events:
            return
        first = events[0]
        lsn = first.commit_lsn
        if lsn < self._skip_below:
            return
        groups: dict[str, list[Event]] = {}
        if isinstance(first, AccessRevoked):
            seen_lsn, count = self._control
            count = count + 1 if seen_lsn == lsn else 1
            self._control = (lsn, count)
            key: CursorKey = (lsn, count)
            groups[self._keys.control] = list(events)
        else:
            parsed = parse_cursor(first.cursor)
            assert parsed is not None
            key = parsed
            for event in events:
                org = event.organization_id
                stream = self._keys.org(org) if org is not None else self._keys.shared
                groups.setdefault(stream, []).append(event)
        streams = tuple(groups)
        payloads = tuple(encode_events(groups[stream]) for stream in streams)
        moves = not isinstance(first, AccessRevoked)
        self._enqueue(_Entry(key, moves, streams, payloads, len(events)))
        self._queued_entries += 1
        if self._queued_entries >= self._max_queued:
            self._room.clear()
            await self._room.wait()

    def mark_position(self, commit_lsn: int) -> None:
        """Every event up to this commit has been queued; it counts once they are stored."""
        if self._queue or self._storing:
            self._enqueue(commit_lsn)
        else:
            self._stored_up_to(commit_lsn)

    async def flush(self) -> None:
        """Wait until everything queued so far is stored (`run` must be running)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Store what `publish` queues until cancelled: everything queued while a batch was on
        its way goes in the next one, in one round trip (one Lua call).

        Raises:
            HistoryLost: Redis no longer has the history (the floor key is gone).
        """
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                self._queued_entries = 0
                self._room.set()
                self._storing = True
                try:
                    await self._store(batch)
                finally:
                    self._storing = False
            self._idle.set()

    def _enqueue(self, item: _Entry | int) -> None:
        self._queue.append(item)
        self._idle.clear()
        self._work.set()

    async def _store(self, batch: list[_Entry | int]) -> None:
        entries = [item for item in batch if isinstance(item, _Entry)]
        if entries:
            moved = [entry.key for entry in entries if entry.moves_position]
            top = max(moved) if moved else self._position
            position = format_cursor(*top) if top > self._position else ""
            result = await self._retrying(lambda: self._send(entries, position))
            if result == -1:
                raise HistoryLost("the Redis history is gone (floor key missing)")
            self.duplicates += result
            if position:
                self._position, self._written = top, position
            now = self._clock()
            for entry in entries:
                self.published += entry.events
                for stream in entry.streams:
                    self._streams[stream] = now
        for item in batch:
            if isinstance(item, int):
                self._stored_up_to(item)

    async def _send(self, entries: list[_Entry], position: str) -> int:
        """Store a batch in one `_PUBLISH` call (atomic, one round trip), moving `position` to
        `position` unless it is ''; returns how many entries Redis refused as duplicates, or
        -1 when the floor is gone.

        `EVALSHA` first; when Redis does not know the script (restarted, flushed), it is
        loaded and the call made again. Sent again after a transient failure too: entries
        that did land are refused as duplicates, so a retry never stores an event twice.
        """
        indexes: dict[str, int] = {}
        args: list[str | bytes | int] = [self._max_len, position]
        for entry in entries:
            args += (stream_id(entry.key), len(entry.streams))
            for stream, payload in zip(entry.streams, entry.payloads, strict=True):
                args += (indexes.setdefault(stream, len(indexes) + 3), payload)
        keys = [self._keys.floor, self._keys.position, *indexes]
        script = self._publish
        try:
            return int(await self._redis.evalsha(script.sha, len(keys), *keys, *args))
        except NoScriptError:
            script.sha = await self._redis.script_load(script.script)
            return int(await self._redis.evalsha(script.sha, len(keys), *keys, *args))

    def _stored_up_to(self, commit_lsn: int) -> None:
        self._handled = max(self._handled, commit_lsn)
        if self._window is not None:
            self._window.record(commit_lsn)

    async def upkeep(self) -> None:
        """Check Redis still has the history; let ``position`` follow an idle database;
        now and then trim the streams by time.

        Raises:
            HistoryLost: the floor key is gone.
        """
        window = self._window
        if window is None:
            return
        now = self._clock()
        idle = (self._handled, 0)
        position = format_cursor(*idle) if idle > self._position else ""
        minid, streams = "", []
        retained = window.retained()
        if now - self._trimmed_at >= max(TICK_SECONDS, self.history_seconds / 20):
            horizon = now - 2 * self.history_seconds
            self._streams = {s: t for s, t in self._streams.items() if t >= horizon}
            minid, streams = f"{retained}-0", list(self._streams)
        try:
            result = await self._upkeep(
                keys=[self._keys.floor, self._keys.position, *streams],
                args=[minid, position, self._written],
            )
        except _TRANSIENT:
            return  # publish() notices and reports it
        if result == -1:
            raise HistoryLost("the Redis history is gone (floor key missing)")
        if result == 1:
            self._position, self._written = idle, position
        if minid:
            self._trimmed_at = now

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        failures = 0
        base, cap = self._backoff
        while True:
            try:
                result = await call()
            except _TRANSIENT as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "Redis unavailable; holding the slot position and retrying",
                        extra={"error": f"{type(exc).__name__}: {exc}"},
                    )
                self._on_redis(False, f"Redis unavailable: {type(exc).__name__}")
                await asyncio.sleep(full_jitter(failures, base, cap))
                continue
            if failures:
                log.info("Redis is reachable again")
                self._on_redis(True, "")
            return result


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
            await sink.start(start_lsn)
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


# -- aiohttp wiring ------------------------------------------------------------------------------


BUS_KEYS = web.AppKey("walcast_bus_keys", BusKeys)


def redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """A client for `settings.redis_url` that reconnects a connection Redis dropped (a restart)
    and retries the command a few times before reporting the error."""
    assert settings.redis_url is not None
    options.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    options.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
    options.setdefault("health_check_interval", 5)
    return aioredis.Redis.from_url(settings.redis_url, **options)


def reader_context(*, drives_readiness: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running a `ReaderService` (the app needs `STATE` and `BUS_KEYS`)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        from gateway.state import STATE

        state = app[STATE]
        redis = redis_client(state.settings)

        def status(ok: bool, reason: str) -> None:
            if not drives_readiness:
                return
            if ok:
                state.ready.set()
            else:
                state.not_ready_reason = reason
                state.ready.clear()

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
    from gateway import http
    from gateway.state import STATE, GatewayState
    from gateway.tickets import MemoryJtiStore

    app = web.Application()
    metrics = Metrics()
    app[STATE] = GatewayState(
        settings=settings,
        config=config,
        metrics=metrics,
        registry=HubRegistry(metrics),
        jti_store=MemoryJtiStore(),
    )
    app[STATE].not_ready_reason = "standby: waiting for the reader lock"
    app[BUS_KEYS] = BusKeys(prefix if prefix is not None else prefix_from_env())
    app.router.add_get("/healthz", http.healthz)
    app.router.add_get("/readyz", http.readyz)
    app.router.add_get("/metrics", http.metrics)
    app.cleanup_ctx.append(reader_context(drives_readiness=True))
    return app
