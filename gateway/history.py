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

`MemoryHistory` keeps each event for `seconds` (and at most `max_events` per organization, and
at most `max_total_events` on the node, oldest first across organizations). It knows per
organization up to which key it has evicted, so a cursor below that gets a resync instead of a
silent gap. Entries are plain ``(key, kept_at, event)`` tuples: nothing per event but the
tuple and its deque slot.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Protocol

from cdc.cursors import NO_EPOCH, CursorKey, cursor_key
from gateway.events import RoutedEvent

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


Entry = tuple[CursorKey, float, RoutedEvent]
"""(cursor key, when it was kept, the event): one history entry."""

#: Entries (key, time, event) and the node-wide order (key, kept) both sort by their key.
_by_key = itemgetter(0)
_event = itemgetter(2)


def _after(entries: deque[Entry], key: CursorKey) -> list[Entry]:
    """The entries above `key` (entries are in key order): found by bisection, not by a scan
    of the whole history, so a resume costs what it returns."""
    start = bisect.bisect_right(entries, key, key=_by_key)
    return list(itertools.islice(entries, start, None))


class _Kept:
    """The history of one organization (or of the events for every organization)."""

    __slots__ = ("entries", "evicted_up_to")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.evicted_up_to: CursorKey | None = None  #: complete above this key


class MemoryHistory:
    """This node's own history, in memory, bounded by time and by count (per org, per node)."""

    def __init__(
        self,
        *,
        seconds: float = 120.0,
        max_events: int = 100_000,
        max_total_events: int = 500_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_events = max_events
        self.max_total_events = max_total_events
        self._clock = clock
        self._orgs: dict[str, _Kept] = {}
        #: Events for every organization (TRUNCATE), kept once rather than per organization.
        self._shared = _Kept()
        #: (key, history) in the order kept: the node-wide bound evicts from the front
        #: (entries a per-organization trim already evicted are skipped).
        self._order: deque[tuple[CursorKey, _Kept]] = deque()
        self._size = 0
        self.complete_from: CursorKey | None = None
        self.position: CursorKey = (0, 0)
        #: Set by the pipeline once it has identified the database.
        self.epoch = NO_EPOCH

    def __len__(self) -> int:
        return self._size

    def follow(self, organization_id: str) -> None:
        """Nothing to do: every event of the node passes through `append`."""

    def restart(self) -> None:
        """Forget everything kept: the slot the history came from was re-created, so nothing
        before it can be vouched for (`complete_from` is set again once streaming is back)."""
        self._orgs.clear()
        self._shared = _Kept()
        self._order.clear()
        self._size = 0
        self.complete_from = None

    def advance(self, key: CursorKey) -> None:
        """The stream reached `key` without an event (an idle database's commits)."""
        if key > self.position:
            self.position = key

    def append(self, event: RoutedEvent) -> None:
        key = cursor_key(event.cursor)
        assert key is not None, "events carry a cursor the reader formatted"
        org = event.organization_id
        if org is None:
            kept = self._shared
        else:
            kept = self._orgs.get(org) or self._orgs.setdefault(org, _Kept())
        now = self._clock()
        kept.entries.append((key, now, event))
        order = self._order
        order.append((key, kept))
        self._size += 1
        self._expire(kept, now)
        while self._size > self.max_total_events:
            oldest_key, oldest = order.popleft()
            entries = oldest.entries
            if entries and entries[0][0] == oldest_key:
                self._evict_oldest(oldest)
        if len(order) > 2 * self._size + 1024:
            self._forget_evicted()
        if key > self.position:
            self.position = key

    def events_after(self, organization_id: str, key: CursorKey) -> list[RoutedEvent] | None:
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
        own = _after(kept.entries, key) if kept is not None else []
        shared = _after(self._shared.entries, key)
        if shared:
            own = list(heapq.merge(own, shared, key=_by_key))
        return list(map(_event, own))

    async def since(self, organization_id: str, key: CursorKey) -> list[RoutedEvent] | None:
        return self.events_after(organization_id, key)

    def trim(self) -> None:
        now = self._clock()
        self._expire(self._shared, now)
        for kept in self._orgs.values():
            self._expire(kept, now)
        order = self._order
        while order:
            key, kept = order[0]
            if kept.entries and kept.entries[0][0] <= key:
                break  # still held (history is in key order: an older head means evicted)
            order.popleft()

    def _expire(self, kept: _Kept, now: float) -> None:
        entries, oldest = kept.entries, now - self.seconds
        while entries and (entries[0][1] < oldest or len(entries) > self.max_events):
            self._evict_oldest(kept)

    def _evict_oldest(self, kept: _Kept) -> None:
        kept.evicted_up_to = kept.entries.popleft()[0]
        self._size -= 1

    def _forget_evicted(self) -> None:
        """Rebuild the node-wide order from what is held (per-org trims leave stale entries)."""
        held = [self._shared, *self._orgs.values()]
        self._order = deque(
            heapq.merge(
                *([(key, kept) for key, _, _ in kept.entries] for kept in held), key=_by_key
            )
        )

    def held(self, organization_id: str | None) -> list[RoutedEvent]:
        """The events kept for `organization_id` (None: for every organization), oldest first."""
        kept = self._shared if organization_id is None else self._orgs.get(organization_id)
        return [event for _, _, event in kept.entries] if kept is not None else []

    @property
    def order_length(self) -> int:
        """Entries in the node-wide eviction order (stale ones included): stays bounded."""
        return len(self._order)
