"""Where a hub's past events come from when a client resumes with ``since=<cursor>``.

The hubs (`gateway.hubs`) fan events out; a `History` answers the one question a resume asks:
*which events of this organization came after this cursor — or is that cursor too old (or
from another database) to answer without a gap?* Two implementations:

* `MemoryHistory` (here): the node keeps its own events, for the in-process pipeline.
* the Redis bus's feed (`walcast.bus.feed`): the history is the organization's Redis stream,
  shared by every node, so a client may resume on any of them.

Rules a `History` keeps:

* `since` answers every event above the cursor that the node handled before the call, in
  cursor order, or None when it cannot vouch for all of them (the client gets
  ``resync_required``). Its synchronous part — everything before its first await — fixes
  what "handled before the call" means; the hub collects whatever arrives after that itself.
* `position` is the cursor a client told in ``ready`` has missed nothing up to; a resume
  cursor above it comes from somewhere else.
* `epoch` names the database the history belongs to (`cdc.identity`); every cursor carries
  it, and a cursor of another epoch is never looked up: the client gets ``resync_required``.
* `append` is called for every event the node delivers, in cursor order.

`MemoryHistory` keeps each event for `seconds` (give or take the second between two `trim`
calls), and at most `max_events` per organization, and at most `max_total_events` and
`max_total_bytes` on the node, oldest first across organizations (a chunk of up to `CHUNK` of
one organization's events at a time, see `_evict_node_wide`). It knows per organization up
to which key it has evicted, so a cursor below that gets a resync instead of a silent gap. Each
entry is one `bytes` object (see `MemoryHistory`): a few hundred bytes for a 200-byte row.
Entries are kept in chunks the garbage collector stops tracking (`_Kept`), so a full collection
costs about the same with an empty history as with a full one.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from typing import Protocol, overload

from cdc.cursors import NO_EPOCH, CursorKey
from gateway.config import TableConfig
from gateway.entries import (
    CODEC,
    broadcast_entry,
    change_entry,
    entry_key,
    event_of,
    kept_at,
    micros_of,
)
from gateway.events import BroadcastEvent, ChangeEvent, RoutedEvent

__all__ = ["History", "HistoryUnavailable", "MemoryHistory"]


class HistoryUnavailable(Exception):
    """The history cannot be read right now (its store is unreachable): try again later."""


class History(Protocol):
    """What a hub needs to resume a client (see the module docstring for the rules)."""

    @property
    def epoch(self) -> str:
        """The epoch of this history's cursors: a client's cursor of another gets a resync."""
        ...

    @property
    def position(self) -> CursorKey:
        """Every event up to this key has been handled: the cursor ``ready`` reports."""
        ...

    @property
    def complete_from(self) -> CursorKey | None:
        """Every event at or above this key is in history (None: not known yet)."""
        ...

    def __len__(self) -> int:
        """Events this node holds in memory (the ``walcast_history_events`` gauge)."""
        ...

    def follow(self, organization_id: str) -> None:
        """A socket of `organization_id` is attaching: its events must reach this node."""
        ...

    def append(self, event: RoutedEvent) -> None:
        """Keep an event the node is delivering (in cursor order)."""
        ...

    async def since(self, organization_id: str, key: CursorKey) -> Sequence[RoutedEvent] | None:
        """The events for `organization_id` (its own and those for every organization) after
        `key`, in cursor order; None when some of them are no longer known.

        Raises:
            HistoryUnavailable: the history cannot be read now.
        """
        ...

    def trim(self) -> None:
        """Forget what has expired (called about once a second)."""
        ...


CHUNK = 64
"""Entries per chunk of a history (`_Kept`)."""

ENTRY_OVERHEAD = sys.getsizeof(b"") + 8
"""Bytes an entry costs besides its length: the bytes object's header and its slot in a chunk."""

append_change: Callable[..., None] | None
try:
    from gateway._speedups import append_change
except ImportError:  # built without a C compiler: `MemoryHistory._append` alone
    append_change = None


def _last_key(chunk: tuple[bytes, ...]) -> CursorKey:
    return entry_key(chunk[-1])


class _Kept:
    """The history of one organization (or of the events for every organization): its
    entries, oldest first, in chunks of `CHUNK`.

    Why chunks and not a deque of entries: a full collection visits every item of a deque,
    and with a full history (500,000 events by default) that visit alone took 18 ms warm and
    several times that cold, a pause of the event loop. A full chunk is a tuple of bytes,
    which the collector stops tracking the first time it looks at it, so a collection visits
    one object per `CHUNK` entries. The entries removed from the front of the oldest chunk
    stay in memory until the rest of it goes (at most `CHUNK - 1`); `popleft` says what memory
    it released, and `popleft_chunk` removes the rest of a chunk in one step. `MemoryHistory`
    adds entries itself, inline: to `newest`, then `seal()`.
    """

    __slots__ = (
        "chunks",
        "evicted_up_to",
        "head",
        "index",
        "length",
        "newest",
        "organization_id",
    )

    def __init__(self, organization_id: str | None, index: int) -> None:
        self.organization_id = organization_id
        self.index = index  #: its place in `MemoryHistory._kept`, which the node-wide order names
        self.chunks: deque[tuple[bytes, ...]] = deque()
        self.newest: list[bytes] = []  #: the entries not yet in a chunk
        self.head = 0  #: entries of the oldest chunk already removed
        self.length = 0  #: entries held
        self.evicted_up_to: CursorKey | None = None  #: complete above this key

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self.chunks)
        oldest = itertools.islice(next(chunks, ()), self.head, None)
        return itertools.chain(oldest, itertools.chain.from_iterable(chunks), self.newest)

    def seal(self) -> None:
        """`newest` is full: make it a chunk."""
        self.chunks.append(tuple(self.newest))
        self.newest.clear()

    def first(self) -> bytes:
        """The oldest entry (IndexError when empty)."""
        return self.chunks[0][self.head] if self.chunks else self.newest[0]

    def popleft(self) -> tuple[bytes, int]:
        """Remove the oldest entry; returns it and the bytes of entries this let go of (their
        lengths and `ENTRY_OVERHEAD` each): none until the last entry of a chunk goes."""
        self.length -= 1
        chunks = self.chunks
        if not chunks:
            entry = self.newest.pop(0)
            return entry, len(entry) + ENTRY_OVERHEAD
        oldest = chunks[0]
        entry = oldest[self.head]
        self.head += 1
        if self.head < CHUNK:
            return entry, 0
        chunks.popleft()
        self.head = 0
        return entry, sum(map(len, oldest)) + CHUNK * ENTRY_OVERHEAD

    def popleft_chunk(self) -> tuple[bytes, int, int]:
        """Remove what is left of the oldest chunk, or the oldest entry when no chunk is full
        yet; returns the newest entry removed, the bytes released (as `popleft`) and how many
        entries went."""
        chunks = self.chunks
        if not chunks:
            entry, released = self.popleft()
            return entry, released, 1
        oldest = chunks.popleft()
        count = CHUNK - self.head
        self.head = 0
        self.length -= count
        return oldest[-1], sum(map(len, oldest)) + CHUNK * ENTRY_OVERHEAD, count

    def after(self, key: CursorKey) -> list[bytes]:
        """The entries above `key`: found by bisection (first the chunk, then the entry), not
        by a scan of the whole history, so a resume costs what it returns."""
        chunks, newest = self.chunks, self.newest
        at = bisect.bisect_right(chunks, key, key=_last_key)  # the first chunk ending above
        if at == len(chunks):
            return newest[bisect.bisect_right(newest, key, key=entry_key) :]
        chunk = chunks[at]
        start = bisect.bisect_right(chunk, key, lo=self.head if at == 0 else 0, key=entry_key)
        found = list(chunk[start:])
        found += itertools.chain.from_iterable(itertools.islice(chunks, at + 1, None))
        found += newest
        return found


class MemoryHistory:
    """This node's own history, in memory, bounded by time, by count (per org, per node) and
    by bytes (per node).

    Each event is kept as one `bytes` entry (`gateway.entries`): a fixed header (key, time
    kept, commit time, transaction id, table and epoch, where the rows' `RawJson` values are)
    and the rest as JSON, values exactly as the reader typed them. Bytes hold no references,
    so the cyclic garbage collector neither tracks nor walks them, and they are held in chunks
    it stops tracking (`_Kept`): a full history costs a full collection about one visit per
    `CHUNK` events. A replay turns entries back into events, masked per visibility class like
    live ones.
    """

    def __init__(
        self,
        *,
        seconds: float = 120.0,
        max_events: int = 100_000,
        max_total_events: int = 500_000,
        max_total_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_events = max_events
        self.max_total_events = max_total_events
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._orgs: dict[str, _Kept] = {}
        #: Events for every organization (TRUNCATE), kept once rather than per organization.
        self._shared = _Kept(None, 0)
        #: Every history, by its index: the shared one, then one per organization seen.
        self._kept: list[_Kept] = [self._shared]
        #: The node-wide order, a heap of (key, history index): every history that holds
        #: entries has an item there whose key is at or before its oldest entry's. The
        #: node-wide bounds evict the top's oldest entry, after making the top current
        #: (`_oldest_held`); a history's own trims leave its item behind, older than its
        #: first entry, until it comes to the top. One item per history, not per entry.
        self._oldest: list[tuple[CursorKey, int]] = []
        self._size = 0
        self._bytes = 0
        #: (table or None for a broadcast, epoch) of the entries, by the id their header names.
        self._contexts: list[tuple[TableConfig | None, str]] = []
        self._context_ids: dict[tuple[int, str], int] = {}
        #: (commit time, table, epoch, µs, context) of the last change kept.
        self._last_change: tuple[object, object, str, int, int] = (None, None, "", 0, 0)
        self.complete_from: CursorKey | None = None
        self.position: CursorKey = (0, 0)
        #: Set by the pipeline once it has identified the database.
        self.epoch = NO_EPOCH
        #: Keep an event the node is delivering, in cursor order: `_append`, or its C twin
        #: bound to this history (one call per change, with no Python frame).
        self.append: Callable[[RoutedEvent], None] = (
            self._append
            if append_change is None
            else partial(append_change, (self, ChangeEvent, CODEC, CHUNK, ENTRY_OVERHEAD))
        )

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """What the entries take in memory (the node-wide byte bound counts this)."""
        return self._bytes

    def follow(self, organization_id: str) -> None:
        """Nothing to do: every event of the node passes through `append`."""

    def restart(self) -> None:
        """Forget everything kept: the slot the history came from was re-created, so nothing
        before it can be vouched for (`complete_from` is set again once streaming is back)."""
        self._orgs.clear()
        self._shared = _Kept(None, 0)
        self._kept = [self._shared]
        self._oldest = []
        self._size = 0
        self._bytes = 0
        self.complete_from = None

    def advance(self, key: CursorKey) -> None:
        """The stream reached `key` without an event (an idle database's commits)."""
        if key > self.position:
            self.position = key

    def _new_kept(self, organization_id: str | None) -> _Kept:
        assert organization_id is not None, "the shared history always exists"
        kept = self._orgs[organization_id] = _Kept(organization_id, len(self._kept))
        self._kept.append(kept)
        return kept

    def _context(self, table: TableConfig | None, epoch: str) -> int:
        found = self._context_ids.get((id(table), epoch))
        if found is None:
            found = self._context_ids[(id(table), epoch)] = len(self._contexts)
            self._contexts.append((table, epoch))
        return found

    def _decode(self, entry: bytes, organization_id: str | None) -> RoutedEvent:
        return event_of(entry, organization_id, self._contexts)

    def _append(self, event: RoutedEvent) -> None:
        """`append`, the definition: `gateway._speedups.append_change` is its C twin, which
        calls the same helpers for what happens once per transaction, history or chunk."""
        key = event.key
        org = event.organization_id
        kept = self._shared if org is None else self._orgs.get(org)
        if kept is None:
            kept = self._new_kept(org)
        now = self._clock()
        if type(event) is ChangeEvent:  # the hot path, inline: a transaction's events share
            commit_time, table, epoch = event.commit_time, event.table, event.epoch
            last = self._last_change  # their commit time, table and epoch, worked out once
            if last[0] is commit_time and last[1] is table and last[2] == epoch:
                micros, context = last[3], last[4]
            else:
                micros, context = self._change_context(commit_time, table, epoch)
            entry = change_entry(event, now, micros, context, CODEC)
        else:
            assert isinstance(event, BroadcastEvent)
            entry = broadcast_entry(event, now, self._context(None, event.epoch))
        if not kept.length:
            self._join_order(key, kept)
        newest = kept.newest  # `_Kept`'s append, inline
        newest.append(entry)
        if len(newest) == CHUNK:
            kept.seal()
        kept.length += 1
        self._size += 1
        self._bytes += len(entry) + ENTRY_OVERHEAD
        if kept.length > self.max_events:  # time is `trim`'s, once a second for every history
            self._expire(kept, now)
        if self._size > self.max_total_events or self._bytes > self.max_total_bytes:
            self._evict_node_wide()
        if key > self.position:
            self.position = key

    def _change_context(
        self, commit_time: datetime, table: TableConfig, epoch: str
    ) -> tuple[int, int]:
        """The commit time in µs and the context id of a change unlike the last one kept (a
        new transaction or table), remembered for the changes that follow it."""
        micros, context = micros_of(commit_time), self._context(table, epoch)
        self._last_change = (commit_time, table, epoch, micros, context)
        return micros, context

    def _join_order(self, key: CursorKey, kept: _Kept) -> None:
        """`kept` was empty and takes an entry at `key`: it joins the node-wide order."""
        heapq.heappush(self._oldest, (key, kept.index))

    def _evict_node_wide(self) -> None:
        """The oldest events of any organization go first, until both node bounds hold: what
        is left of the chunk that holds the oldest event of all (up to `CHUNK` events of its
        organization), or that event alone when its history has no full chunk yet.

        A chunk at a time, so a full history evicts once per `CHUNK` events it takes rather
        than once per event, and each eviction releases its chunk's memory. The price: an
        organization may lose up to `CHUNK - 1` events a little before their turn (a cursor
        below them gets a resync, never a gap).
        """
        while self._size and (
            self._size > self.max_total_events or self._bytes > self.max_total_bytes
        ):
            oldest = self._oldest_held()
            assert oldest is not None, "a history holds what the node holds"
            self._evict(oldest, *oldest.popleft_chunk())
            if not oldest:  # its item, the top, would name an empty history
                heapq.heappop(self._oldest)

    def _oldest_held(self) -> _Kept | None:
        """The history whose first entry is the oldest of all: the top of the node-wide order,
        once items left behind by a history's own trims are brought up to date or dropped."""
        heap, kept_by_index = self._oldest, self._kept
        while heap:
            key, index = heap[0]
            kept = kept_by_index[index]
            if not kept.length:
                heapq.heappop(heap)
                continue
            first = entry_key(kept.first())
            if first == key:
                return kept
            heapq.heapreplace(heap, (first, index))
        return None

    def events_after(self, organization_id: str, key: CursorKey) -> Sequence[RoutedEvent] | None:
        """`since`, synchronously."""
        if self.complete_from is None or key > self.position:
            return None  # not streaming yet, or a cursor from the future: another database
        kept = self._orgs.get(organization_id)
        for history in (kept, self._shared):
            if history is not None:
                evicted = history.evicted_up_to
                if evicted is not None and key < evicted:
                    return None
        if key < self.complete_from:
            return None
        own: list[tuple[bytes, str | None]] = (
            [(entry, organization_id) for entry in kept.after(key)] if kept else []
        )
        shared: list[tuple[bytes, str | None]] = [
            (entry, None) for entry in self._shared.after(key)
        ]
        if shared:
            own = list(heapq.merge(own, shared, key=lambda pair: entry_key(pair[0])))
        return _Replayed(self._decode, own)

    async def since(self, organization_id: str, key: CursorKey) -> Sequence[RoutedEvent] | None:
        return self.events_after(organization_id, key)

    def trim(self) -> None:
        now = self._clock()
        self._expire(self._shared, now)
        for kept in self._orgs.values():
            self._expire(kept, now)
        self._oldest_held()  # drops the items of histories the expiry emptied, from the top
        if len(self._oldest) > 2 * len(self._kept) + 64:  # histories emptied and refilled
            self._oldest = [(entry_key(kept.first()), kept.index) for kept in self._kept if kept]
            heapq.heapify(self._oldest)

    def _expire(self, kept: _Kept, now: float) -> None:
        """Evict `kept`'s events older than `seconds` and those over `max_events`, oldest
        first: a whole chunk at once when every event left in it has to go (its last one has
        expired, or the bound still holds without it), else one event at a time."""
        oldest = now - self.seconds
        while kept:
            chunks = kept.chunks
            if chunks and (
                kept_at(chunks[0][-1]) < oldest
                or len(kept) - (CHUNK - kept.head) >= self.max_events
            ):
                self._evict(kept, *kept.popleft_chunk())
            elif kept_at(kept.first()) < oldest or len(kept) > self.max_events:
                self._evict(kept, *kept.popleft())
            else:
                return

    def _evict(self, kept: _Kept, last: bytes, released: int, count: int = 1) -> None:
        """`count` events left `kept`, `last` the newest of them, releasing `released` bytes."""
        kept.evicted_up_to = entry_key(last)
        self._size -= count
        self._bytes -= released

    def held(self, organization_id: str | None) -> list[RoutedEvent]:
        """The events kept for `organization_id` (None: for every organization), oldest first."""
        kept = self._shared if organization_id is None else self._orgs.get(organization_id)
        if kept is None:
            return []
        return [self._decode(entry, kept.organization_id) for entry in kept]

    @property
    def order_length(self) -> int:
        """Items in the node-wide order (those left behind included): at most about two per
        history, whatever the number of events."""
        return len(self._oldest)


class _Replayed(Sequence[RoutedEvent]):
    """A resume's answer: the entries it found, turned into events only as the replay reaches
    them (a replay runs in slices; decoding all at once would hold the loop)."""

    __slots__ = ("_decode", "_found")

    def __init__(
        self,
        decode: Callable[[bytes, str | None], RoutedEvent],
        found: list[tuple[bytes, str | None]],
    ) -> None:
        self._decode = decode
        self._found = found

    def __len__(self) -> int:
        return len(self._found)

    @overload
    def __getitem__(self, index: int) -> RoutedEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[RoutedEvent]: ...

    def __getitem__(self, index: int | slice) -> RoutedEvent | list[RoutedEvent]:
        if isinstance(index, slice):
            return [self._decode(entry, org) for entry, org in self._found[index]]
        entry, org = self._found[index]
        return self._decode(entry, org)
