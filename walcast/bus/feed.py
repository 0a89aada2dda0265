"""The Redis bus, gateway side: the node's feed. One blocking reader per node feeds the local
hubs from the streams `walcast.bus.sink` writes, and the same streams are the node's `History`
(`gateway.history`), so ``since=`` resumes are served from Redis and a client may reconnect to
any node. The hubs need nothing Redis-specific: this is an event source, not a kind of hub.

* **One XREAD per node** (blocking, no COUNT) on the streams of the organizations it has
  sockets for, plus ``all``, ``control`` and the node's wake stream (an XADD there restarts the
  blocking read when a new organization is followed; unlike cancelling, it cannot be lost). A
  reply's entries are handled in cursor order, revocations first within a transaction.
  The reader stores one item at a time, so once the node has handled an entry with key *G*,
  it has handled every entry below *G* of every stream it follows: *G* is the node's position
  and the cursor ``ready`` reports. When the streams are quiet for a whole blocking period, one
  MULTI reads ``position`` and whatever arrived, so *G* follows an idle database too.
* **Resume** (`since`; the hub's attach collects live events meanwhile). Synchronously, each
  stream the socket needs (its organization's and ``all``) gets an end id, the last one the
  node has handled (a stream not followed yet starts at *G*). Then one MULTI reads the entries
  after the client's cursor up to those end ids, the streams' metadata, ``floor`` and
  ``position``; if the cursor is ahead of this node (it came from a faster one), wait until
  the node has caught up.
* **resync_required** when the cursor is from the future (above ``position``), below
  ``floor`` (before the history began, or Redis lost it), or when a stream was trimmed past it
  (``entries-added`` > ``length`` with the first entry above the cursor; Redis 7.0+). While the
  reader rebuilds a lost history (``floor`` missing, or ``position`` below *G*), a resume
  waits up to `HISTORY_WAIT_SECONDS`.
* **Epochs** (`walcast.bus.epoch`): the node serves the epoch of the last entry of the
  ``epoch`` stream, which its XREAD follows too; until a reader has started one, the node is
  not ready. When the reader starts a new epoch (another database, a re-created slot), the
  node closes every socket (1013; the clients resume and get ``resync_required``) and starts
  over on the new history. An epoch entry is handled before anything else in a reply: the
  reader records it before it stores any entry of the new history.
* **Redis unavailable**: sockets stay open; `/readyz` says 503; the XREAD resumes from the last
  ids handled, so the node catches up without a gap. A resume that cannot read the history
  raises `HistoryUnavailable` (the hub closes the socket with 1013, try again), never silence.
* **Revocations**: the node reads ``control`` from its last entry when it starts, so it knows
  the access changes committed from then on, none before: the registry refuses tickets issued
  earlier (`HubRegistry.revocations_since`). Each time it (re)connects it also sets
  ``started`` where missing (Redis lost its data): the single-use store refuses tickets issued
  before that, which it cannot know to be unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cdc.backoff import full_jitter
from cdc.cursors import NO_EPOCH, CursorKey, parse_cursor
from gateway.config import RealtimeConfig
from gateway.events import AccessRevoked, RoutedEvent
from gateway.history import HistoryUnavailable
from gateway.hubs import HubRegistry
from gateway.protocol import CloseCode
from walcast.bus.client import TRANSIENT, StatusCallback
from walcast.bus.codec import decode_events
from walcast.bus.epoch import parse_record
from walcast.bus.keys import BusKeys, parse_stream_id, stream_id

__all__ = ["RedisFeed", "complete_after"]

log = logging.getLogger(__name__)

BLOCK_MS = 10_000  #: one XREAD waits at most this long (a dead connection shows up in time)
BACKOFF_CAP = 2.0  #: seconds, at most, between attempts to reach Redis (full jitter)
HISTORY_WAIT_SECONDS = 10.0  #: how long a resume waits for Redis or the node to catch up
DECODE_SLICE_SECONDS = 0.005  #: a resume decodes its history this long, then lets the loop run


def _sort_key(stream: str, key: CursorKey, control: str) -> tuple[int, int, int]:
    # Within one transaction, revocations go first: nothing of it reaches a revoked socket.
    return (key[0], 0 if stream == control else 1, key[1])


class RedisFeed:
    """One per gateway node: the live feed (a blocking XREAD loop into the node's hubs) and
    the node's `History` (the streams in Redis, shared by every node)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        blocking: aioredis.Redis,
        keys: BusKeys,
        config: RealtimeConfig,
        *,
        on_status: StatusCallback,
        node_id: str | None = None,
    ) -> None:
        self._redis = redis
        self._blocking = blocking
        self._keys = keys
        self._config = config
        self._on_status = on_status
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self._wake_key = keys.wake(self.node_id)
        self._last: dict[str, str] = {}  #: stream → the last id handled
        self._orgs: dict[str, str] = {}  #: followed organization → its stream key
        self.position: CursorKey = (0, 0)  #: G: every entry below it has been handled
        self.complete_from: CursorKey | None = None  #: the floor, when last read
        self.epoch = NO_EPOCH  #: the epoch of the history this node serves
        self._epoch_changed = False  #: a reply showed a new epoch: `_switch` before going on
        self._waiters: list[tuple[CursorKey, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the read loop -------------------------------------------------------------------------

    async def run(self, registry: HubRegistry) -> None:
        """Feed `registry`'s hubs from the streams until cancelled."""
        await self._start(registry)
        failures = 0
        while True:
            try:
                if failures:  # back as soon as Redis answers, not when the next event comes
                    await self._blocking.ping()
                    await self._mark_started()
                    log.info("Redis is reachable again: catching up from the streams")
                    failures = 0
                    self._on_status(True, "")
                reply = await self._blocking.xread(self._streams(registry), block=BLOCK_MS)
            except TRANSIENT as exc:
                failures += 1
                if failures == 1:
                    log.warning("lost Redis; retrying", extra={"error": type(exc).__name__})
                self._on_status(False, f"Redis unavailable: {type(exc).__name__}")
                await asyncio.sleep(full_jitter(failures, 0.05, BACKOFF_CAP))
                continue
            if reply:
                self._handle(registry, reply)
            else:
                await self._sync_idle(registry)
            if self._epoch_changed:
                await self._switch(registry)

    async def _sync_idle(self, registry: HubRegistry) -> None:
        """Quiet streams: move G to ``position`` (read with whatever arrived, atomically)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._keys.position)
                pipe.xread(self._streams(registry))
                position, reply = await pipe.execute()
        except TRANSIENT:
            return  # the next XREAD notices
        self._handle(registry, reply or [], parse_cursor(position.decode()) if position else None)

    async def _mark_started(self) -> None:
        """Set ``started`` to now if Redis has none (it is new, or lost its data)."""
        await self._redis.set(self._keys.started, repr(time.time()), nx=True)

    async def _start(self, registry: HubRegistry) -> None:
        """Read where the current epoch's history stands; wait for a reader to start one."""
        keys = self._keys
        failures = 0
        floor: Any
        position: Any
        control: Any
        while True:
            try:
                await self._mark_started()
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xrevrange(keys.epoch, count=1)
                    pipe.get(keys.floor)
                    pipe.get(keys.position)
                    pipe.xrevrange(keys.control, count=1)
                    epoch, floor, position, control = await pipe.execute()
                # An access change the node will not read (at or before that entry) was
                # stored, so committed, before now: older tickets are refused.
                since = time.time()
                record = parse_record(epoch)
                if record is not None and record.epoch:
                    break
                self._on_status(False, "waiting for a reader to start the history")
                await self._blocking.xread({keys.epoch: "0-0"}, count=1, block=BLOCK_MS)
            except TRANSIENT as exc:
                failures += 1
                self._on_status(False, f"Redis unavailable: {type(exc).__name__}")
                await asyncio.sleep(full_jitter(failures, 0.05, BACKOFF_CAP))
        self.epoch = record.epoch
        # Nothing below the floor can be resumed from, so the node may start above it.
        self.complete_from = parse_cursor(floor.decode()) if floor else None
        known = [parse_cursor(raw.decode()) for raw in (floor, position) if raw]
        self.position = max((key for key in known if key is not None), default=(0, 0))
        self._last = {
            keys.shared: stream_id(self.position),
            keys.control: control[0][0].decode() if control else "0-0",
            keys.epoch: record.entry_id,
            self._wake_key: "0-0",
        }
        registry.revocations_since = max(registry.revocations_since, since)
        self._on_status(True, "")

    async def _switch(self, registry: HubRegistry) -> None:
        """A new epoch: close every socket (their clients resume and resync), start over."""
        self._epoch_changed = False
        old = self.epoch
        conns = list(registry.connections())
        for conn in conns:
            conn.close(CloseCode.TRY_AGAIN_LATER, "history restarted: resume to resync")
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(TimeoutError("the history started a new epoch"))
        self._orgs.clear()
        await self._start(registry)
        for org in registry.followed():
            self._follow(org)
        log.warning(
            "the Redis history started a new epoch %s (was %s): closed %d sockets; their"
            " clients resume and get resync_required",
            self.epoch,
            old,
            len(conns),
        )

    def _streams(self, registry: HubRegistry) -> dict[Any, Any]:
        """What the next XREAD reads: followed organizations (start at G when new), and the rest."""
        keep = set(registry.followed())
        for org in [org for org in self._orgs if org not in keep]:
            self._last.pop(self._orgs.pop(org), None)
        return dict(self._last)

    def _follow(self, organization_id: str) -> str:
        """Follow an organization's stream; returns the last id the node has handled of it."""
        stream = self._orgs.get(organization_id)
        if stream is None:
            stream = self._orgs[organization_id] = self._keys.org(organization_id)
            self._last[stream] = stream_id(self.position)
            self._spawn(self._wake())
        return self._last[stream]

    async def _wake(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=8, approximate=False)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()

    def _handle(self, registry: HubRegistry, reply: Any, position: CursorKey | None = None) -> None:
        """Dispatch one XREAD reply in cursor order (synchronous: no attach interleaves)."""
        control, wake, epoch = self._keys.control, self._wake_key, self._keys.epoch
        for raw_stream, items in reply:
            if raw_stream.decode() == epoch and items:
                self._last[epoch] = items[-1][0].decode()
                record = parse_record(items[-1:])
                if record is not None and record.epoch != self.epoch:
                    self._epoch_changed = True
                    return  # nothing else of this reply: it may hold the new epoch's entries
        entries: list[tuple[tuple[int, int, int], str, CursorKey, bytes]] = []
        for raw_stream, items in reply:
            stream = raw_stream.decode()
            last = self._last.get(stream)
            if not items or last is None:
                continue  # unfollowed while the read was in flight
            handled = parse_stream_id(last)
            self._last[stream] = max(last, items[-1][0].decode(), key=parse_stream_id)
            if stream in (wake, epoch):
                continue
            for raw_id, fields in items:
                key = parse_stream_id(raw_id)
                if key <= handled:
                    continue  # followed anew (from G) while the read was in flight
                entries.append(
                    (_sort_key(stream, key, control), stream, key, fields.get(b"e", b"[]"))
                )
        entries.sort(key=lambda entry: entry[0])
        config = self._config
        top = self.position
        for _, stream, key, data in entries:
            try:
                events = decode_events(data, config)
            except (ValueError, TypeError, KeyError):
                log.exception("skipped a malformed stream entry", extra={"stream": stream})
                continue
            registry.publish_all(events)
            if stream != control and key > top:
                top = key
        if position is not None and position > top:
            top = position
        if top > self.position:
            self.position = top
            self._release_waiters()

    # -- the History seam ------------------------------------------------------------------------

    def __len__(self) -> int:
        return 0  # the history is in Redis, not in this process

    def follow(self, organization_id: str) -> None:
        self._follow(organization_id)

    def append(self, event: RoutedEvent) -> None:
        """Nothing to keep: the reader already stored the event in its stream."""

    def trim(self) -> None:
        """Nothing to trim here: the reader trims the streams."""

    async def since(self, organization_id: str, key: CursorKey) -> list[RoutedEvent] | None:
        # Synchronously, before any await: each stream's end is the last id the node has
        # handled (a stream not followed yet starts at G); the hub collects what comes after.
        ends = {
            self._keys.org(organization_id): self._follow(organization_id),
            self._keys.shared: self._last[self._keys.shared],
        }
        try:
            return await self._history(key, ends)
        except (RedisError, OSError, TimeoutError) as exc:
            raise HistoryUnavailable(type(exc).__name__) from exc

    async def _history(self, after: CursorKey, ends: dict[str, str]) -> list[RoutedEvent] | None:
        """The events after `after` up to `ends`, from Redis; None: the client must resync."""
        deadline = time.monotonic() + HISTORY_WAIT_SECONDS
        streams = list(ends)
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                for stream in streams:
                    pipe.xrange(stream, f"({stream_id(after)}", ends[stream])
                for stream in streams:
                    pipe.xinfo_stream(stream)
                pipe.mget(self._keys.floor, self._keys.position)
                pipe.xrevrange(self._keys.epoch, count=1)
                results = await pipe.execute(raise_on_error=False)
            record = parse_record(results[-1]) if not isinstance(results[-1], Exception) else None
            results = results[:-1]
            floor_raw, position_raw = results[-1]
            floor = parse_cursor(floor_raw.decode()) if floor_raw else None
            position = parse_cursor(position_raw.decode()) if position_raw else None
            self.complete_from = floor
            # Published up to here (nothing below the floor is ever replayed).
            known = max(floor or (0, 0), position or (0, 0))
            # No floor, or Redis behind this node: the reader is (re)building the history.
            if floor is not None and known >= self.position:
                break
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)
        if record is None or record.epoch != self.epoch:
            return None  # a new epoch began: this node is about to start over
        if after < floor or after > known:
            return None  # expired, or a cursor from the future (another database)
        for info in results[len(streams) : 2 * len(streams)]:
            if isinstance(info, Exception):
                continue  # no such stream: nothing was ever trimmed from it
            if not complete_after(info, after):
                return None
        await self._caught_up(after, deadline)
        entries: list[tuple[CursorKey, bytes]] = []
        for items in results[: len(streams)]:
            if isinstance(items, Exception):
                raise items
            for raw_id, fields in items:
                entries.append((parse_stream_id(raw_id), fields.get(b"e", b"[]")))
        entries.sort(key=lambda entry: entry[0])
        events: list[RoutedEvent] = []
        pause_at = time.perf_counter() + DECODE_SLICE_SECONDS
        for _, data in entries:
            events.extend(
                e for e in decode_events(data, self._config) if not isinstance(e, AccessRevoked)
            )
            if time.perf_counter() > pause_at:  # a long history: let the loop run meanwhile
                await asyncio.sleep(0)
                pause_at = time.perf_counter() + DECODE_SLICE_SECONDS
        return events

    async def _caught_up(self, key: CursorKey, deadline: float) -> None:
        """Wait until this node has handled everything up to `key` (a cursor from a faster
        node), so that nothing it delivers live afterwards is something the client has."""
        if self.position >= key:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((key, future))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await future
        finally:
            if not future.done():
                future.cancel()
            self._waiters = [w for w in self._waiters if w[1] is not future]

    def _release_waiters(self) -> None:
        for key, future in self._waiters:
            if key <= self.position and not future.done():
                future.set_result(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop the background wakes, delete the wake stream, close both clients."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._wake_key)
        await self._blocking.aclose()
        await self._redis.aclose()


def _field(info: Mapping[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def complete_after(info: Mapping[Any, Any], after: CursorKey) -> bool:
    """Whether a stream still holds every entry it ever had above `after`."""
    added, length = _field(info, "entries-added"), _field(info, "length")
    if added is None or length is None:
        return False  # Redis before 7.0: cannot tell
    if int(added) <= int(length):
        return True  # nothing was ever trimmed
    first = _field(info, "first-entry")
    if first:
        first_id = first[0] if isinstance(first, list | tuple) else first
        lsn, position = parse_stream_id(first_id)
        return (lsn, position) <= (after[0], after[1] + 1)  # trimmed entries are all ≤ after
    last = _field(info, "last-generated-id")
    return last is not None and parse_stream_id(last) <= after
