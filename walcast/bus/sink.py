"""The Redis bus, reader side: the pipeline's `EventSink` that stores routed events in Redis
Streams, from which any number of gateway nodes (`walcast.bus.feed`) fan out and serve
``since=`` resumes.

Why Redis Streams: an append-only log with explicit, ordered ids is exactly walcast's cursor
space, and users already know how to run Redis. There is no walcast-to-walcast protocol.

Rules the sink keeps:

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
  per row. The queue is bounded (`max_queued` entries, and one reader batch more): past
  that, the pipeline waits in `wait_for_room` before it hands over the next batch.
* **One database per history** (`walcast.bus.epoch`). `start` reads the ``epoch`` record,
  ``floor`` and ``position`` and either goes on with the stored history, or starts a new epoch:
  it logs why (what differed), drops the old streams (their tops would refuse the new entries
  as duplicates) and records the new epoch; nodes close their sockets, whose clients resume
  and get ``resync_required``. Nothing is ever skipped against another database's position.
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from cdc.backoff import full_jitter
from cdc.cursors import NO_EPOCH, CursorKey, format_cursor, parse_cursor
from cdc.identity import Identity
from gateway.events import AccessRevoked
from walcast.bus.client import TRANSIENT, StatusCallback
from walcast.bus.codec import Event, encode_events
from walcast.bus.epoch import decide, parse_record, record_fields
from walcast.bus.keys import BusKeys, stream_id
from walcast.pipeline import RetentionWindow

__all__ = ["PUBLISH_SCRIPT", "TICK_SECONDS", "HistoryLost", "RedisSink"]

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  #: how often the reader's upkeep runs (and the nodes' hub trim)
EPOCH_RECORDS = 16  #: entries kept in the epoch stream (the last one is current)

# One batch of entries in one call. KEYS: floor, position, then the streams of the batch.
# ARGV: maxlen, the new position ('' = leave it), then per reader item: its entry id, how many
# streams it goes to (n), and n pairs (index of the stream in KEYS, entry payload).
# Returns -1 when the floor is gone (Redis lost its data), else the number of duplicates.
PUBLISH_SCRIPT = """
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
        self._publish = redis.register_script(PUBLISH_SCRIPT)
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
        self.epoch = NO_EPOCH  #: decided by `start`

    async def start(self, start_lsn: int, identity: Identity, wal_end: int) -> str:
        """Read where Redis stands and decide the epoch (`walcast.bus.epoch`); call before the
        pipeline streams from `start_lsn`. Returns the epoch the pipeline's cursors carry.

        Args:
            start_lsn: where the slot resends from (its confirmed position).
            identity: the database and slot the pipeline streams from.
            wal_end: the server's WAL position, read with `identity`.
        """
        keys = self._keys
        record_reply, floor_raw, position_raw = await self._retrying(self._read_state)
        floor = parse_cursor(floor_raw.decode()) if floor_raw else None
        position = parse_cursor(position_raw.decode()) if position_raw else None
        record = parse_record(record_reply)
        decision = decide(record, floor, position, identity, start_lsn, wal_end)
        self._control = (-1, 0)
        streams = [key.decode() async for key in self._org_streams()]
        if decision.new:
            if decision.reason:
                log.warning(
                    "Redis holds a history this reader cannot go on with: %s. Starting a new"
                    " history epoch %s (was %s) at %X; its streams are dropped, and clients"
                    " resuming from an older cursor get resync_required",
                    decision.reason,
                    decision.epoch,
                    record.epoch if record and record.epoch else "none",
                    start_lsn,
                )
            else:
                log.info("Redis history begins at %X (epoch %s)", start_lsn, decision.epoch)
            fields = record_fields(decision.epoch, identity, start_lsn)
            await self._retrying(lambda: self._begin(start_lsn, fields, streams))
            self._skip_below, self._position, self._written = 0, (0, 0), ""
            streams = []
        elif floor is None:
            # Redis lost the history but kept the record: rebuild it under the same epoch from
            # where PostgreSQL resends; everything from there is published (again).
            await self._retrying(lambda: self._rebuild(start_lsn))
            self._skip_below, self._position, self._written = 0, (0, 0), ""
            log.info("Redis history begins again at %X (epoch %s)", start_lsn, decision.epoch)
        else:
            self._position = position or (0, 0)
            self._written = position_raw.decode() if position else ""
            self._skip_below = self._position[0]
            log.info("continuing the Redis history (epoch %s)", decision.epoch)
        self.epoch = decision.epoch
        self._window = RetentionWindow(self.history_seconds, start_lsn, self._clock)
        now = self._clock()
        for stream in streams:
            self._streams.setdefault(stream, now)
        self._streams.setdefault(keys.shared, now)
        return decision.epoch

    async def _read_state(self) -> list[Any]:
        keys = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(keys.epoch, count=1)
            pipe.get(keys.floor)
            pipe.get(keys.position)
            return list(await pipe.execute())

    def _org_streams(self) -> AsyncIterator[bytes]:
        return self._redis.scan_iter(match=f"{self._keys.prefix}org:*", count=1000)

    async def _begin(self, start_lsn: int, fields: dict[Any, Any], streams: list[str]) -> None:
        """Start an epoch: drop the old history, set the floor, record the epoch, at once."""
        keys = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.position, keys.shared, keys.control, *streams)
            pipe.set(keys.floor, format_cursor(start_lsn, 0))
            pipe.xadd(keys.epoch, fields, maxlen=EPOCH_RECORDS, approximate=False)
            await pipe.execute()

    async def _rebuild(self, start_lsn: int) -> None:
        keys = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.position)
            pipe.set(keys.floor, format_cursor(start_lsn, 0))
            await pipe.execute()

    def publish(self, events: Sequence[Event]) -> None:
        """Queue the events of one reader item for `run` to store: the round trip to Redis is
        not the reader's, so while one batch is on its way the next one gathers."""
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
            key = first.key
            for event in events:
                org = event.organization_id
                stream = self._keys.org(org) if org is not None else self._keys.shared
                groups.setdefault(stream, []).append(event)
        streams = tuple(groups)
        payloads = tuple(encode_events(groups[stream]) for stream in streams)
        moves = not isinstance(first, AccessRevoked)
        self._enqueue(_Entry(key, moves, streams, payloads, len(events)))
        self._queued_entries += 1

    async def wait_for_room(self) -> None:
        """Return once fewer than `max_queued` entries wait to be stored (the pipeline asks
        between the reader's batches, so the queue holds at most one batch more than that)."""
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
        """Store a batch in one `PUBLISH_SCRIPT` call (atomic, one round trip), moving `position` to
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
        window.record(self._handled)  # the window samples; its last sample may be behind
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
        except TRANSIENT:
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
            except TRANSIENT as exc:
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
