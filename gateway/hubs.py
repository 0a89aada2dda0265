"""One hub per organization: its sockets, grouped by role set; and the registry of all hubs.

A socket is attached to exactly one hub and only ever receives that hub's events, so no event
crosses organizations.

Where events come from is not the hubs' business: an event source (the in-process pipeline, or
the Redis bus's feed) calls `HubRegistry.publish`, `revoke` and the `History` it was built
with; resumes read that `History` (`gateway.history`).

Attaching a socket with a cursor (a resume), so that nothing falls into the seam between
replay and live delivery and nothing is delivered twice:

1. synchronously, the socket goes on its hub's *attaching* list, which from then on collects
   every event and revocation the hub handles for it (references, not frames);
2. it waits for one of `max_replays` slots (a semaphore per node: a few replays run at once,
   the rest queue), then the history answers the events after its cursor (it may await);
3. the replay runs in slices: each writes events for its share of `REPLAY_SLICE_SECONDS` of
   work (the replays running share it: /healthz and the other organizations wait for loop
   turns, whatever the number of replays) and for at most half the room left in the socket's
   `max_send_buffer`, hands them to the socket, then lets the loop run. When the socket holds
   more than half its buffer, the replay waits for it to drain rather than queue more (a
   socket that takes nothing for `replay_stall_seconds` is closed with 1013, like any slow
   consumer). After the history, the slices go on with what was collected, skipping what
   the client already has (at or below its cursor or the last replayed event);
4. in the final slice, once nothing is left, without an await: off the attaching list,
   registration, ``ready``. A revocation that applies, collected at any point, closes the
   socket with 4403 at the start of the next slice (or while it waits to drain), and nothing
   more is delivered to it.

A socket without a cursor is registered at once.

Masking and serialization happen in `Hub._deliver`, once per visibility class per event
(`walcast_serializations_total` counts them). Sockets are grouped by roles and subscription
(`gateway.subscriptions`: tables and filters); a change is shaped once per subscription group
(kept, or turned into an INSERT or a DELETE by a filter it enters or leaves) and each distinct
(masking, shape) is serialized once, so filters cost at most one frame per group, never one
per socket.

A socket that asked for a snapshot is *held* from ``ready`` on: it collects what its hub
handles (references) until `Hub.release`, which delivers the collected events its snapshot
does not already reflect, then lets it join its group (`gateway.snapshot`).

A replay is per socket by nature (its own roles, its own cursor): its frames are built for
it alone, and its cost per event is that one serialization; the slot semaphore bounds how many
run at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

from cdc.cursors import CursorKey, format_cursor, parse_cursor
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.fanout import Audience, Connection, WriteScheduler
from gateway.history import History, HistoryUnavailable
from gateway.metrics import Metrics
from gateway.policy import PolicyCache
from gateway.protocol import (
    CloseCode,
    broadcast_message,
    change_message,
    revoked_frame,
    system_frame,
    text_frame,
)
from gateway.subscriptions import ALL, Subscription
from gateway.tickets import StaleTicketError, TicketClaims, TicketError

publish_events: Callable[..., None] | None
try:
    from gateway._speedups import publish_events
except ImportError:  # built without a C compiler: `HubRegistry._publish_all` alone
    publish_events = None

__all__ = ["Hub", "HubRegistry"]

log = logging.getLogger(__name__)

REVOCATION_MEMORY_SECONDS = 120.0  #: longer than a ticket lives (60 s) plus clock skew
REPLAY_SLICE_SECONDS = 0.005  #: replay work per loop turn, shared by the replays running
DRAIN_POLL_SECONDS = 0.002  #: how often a replay that waits for its socket looks again
DEFAULT_MAX_REPLAYS = 4
DEFAULT_REPLAY_STALL_SECONDS = 10.0

Roles = frozenset[str]
#: What sockets share frames by: their roles and their subscription.
Group = tuple[Roles, Subscription]
#: What a revocation applies to: (organization, user, session), None meaning any.
_Scope = tuple[str | None, str | None, str | None]


def _write_all(conns: Iterable[Connection], frame: bytes) -> int:
    """Queue `frame` for `conns`: once for a whole audience, else socket by socket."""
    if isinstance(conns, Audience):
        return conns.write(frame)
    return sum(conn.write(frame) for conn in conns)


class _Attaching:
    """A socket between the start of its attach and `ready`: what the hub handled meanwhile."""

    __slots__ = ("buffer", "conn", "scanned")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.buffer: list[RoutedEvent | AccessRevoked] = []
        self.scanned = 0  #: how much of `buffer` has been looked at for revocations

    def revocation(self) -> AccessRevoked | None:
        """A collected revocation that applies to this socket, if one arrived."""
        buffer, conn = self.buffer, self.conn
        for index in range(self.scanned, len(buffer)):
            item = buffer[index]
            if isinstance(item, AccessRevoked) and _applies(item, conn):
                return item
        self.scanned = len(buffer)
        return None


class _Replay:
    """What a resuming socket still has to get: the history's answer, then what was collected."""

    __slots__ = ("conn", "floor", "missed", "next_collected", "next_missed", "waiting")

    def __init__(
        self, waiting: _Attaching, missed: Sequence[RoutedEvent], after: CursorKey | None
    ) -> None:
        self.waiting = waiting
        self.conn = waiting.conn
        self.missed = missed
        self.next_missed = 0
        self.next_collected = 0
        #: The client has every event up to here: collected ones at or below it are skipped.
        self.floor = after
        if missed:
            last = missed[-1].key
            if after is None or last > after:
                self.floor = last

    @property
    def done(self) -> bool:
        return self.next_missed >= len(self.missed) and self.next_collected >= len(
            self.waiting.buffer
        )

    def slice(self, seconds: float) -> Iterator[RoutedEvent]:
        """The next events, for `seconds` of work and half the room left in the socket's
        buffer (at least a quarter of it: a slice starts once it is half empty)."""
        conn, missed, collected = self.conn, self.missed, self.waiting.buffer
        budget = (conn.max_send_buffer - conn.buffered) // 2
        deadline = time.perf_counter() + seconds
        floor = self.floor
        while conn.queued < budget and time.perf_counter() < deadline:
            if self.next_missed < len(missed):
                self.next_missed += 1
                yield missed[self.next_missed - 1]
            elif self.next_collected < len(collected):
                item = collected[self.next_collected]
                self.next_collected += 1
                if isinstance(item, AccessRevoked):
                    continue  # looked at before the slice began
                if floor is not None and item.key <= floor:
                    continue  # the client has it (replayed, or from another node)
                yield item
            else:
                return


def _applies(notice: AccessRevoked, conn: Connection) -> bool:
    """Whether `notice` closes `conn`: each of its organization, user and session that is set
    must match (none set: every socket, as after ``TRUNCATE member``)."""
    return (
        notice.user_id in (None, conn.user_id)
        and notice.organization_id in (None, conn.organization_id)
        and notice.session_id in (None, conn.session_id)
    )


class Hub:
    """The sockets of one organization."""

    def __init__(self, organization_id: str, registry: HubRegistry) -> None:
        self.organization_id = organization_id
        self._registry = registry
        self.audiences: dict[Group, Audience] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.attaching: list[_Attaching] = []
        #: Sockets to hold at `register` (they asked for a snapshot), and those held: what
        #: the hub handled for each since its ``ready``.
        self.hold_at_ready: set[Connection] = set()
        self.held: dict[Connection, list[RoutedEvent]] = {}

    @property
    def size(self) -> int:
        return sum(len(conns) for conns in self.audiences.values()) + len(self.held)

    @property
    def idle(self) -> bool:
        """No socket, and none attaching: the registry may forget this hub."""
        return not self.audiences and not self.attaching and not self.held

    def register(self, conn: Connection) -> None:
        """Add `conn` to its audience and send `ready`: from now on it gets live events (or,
        held for a snapshot, collects them until `release`)."""
        registry = self._registry
        if conn in self.hold_at_ready:
            self.hold_at_ready.discard(conn)
            self.held[conn] = []
        else:
            self._join(conn)
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        registry.metrics.connections.inc()
        conn.write(
            system_frame(
                "ready",
                {
                    "organizationId": self.organization_id,
                    "userId": conn.user_id,
                    "roles": sorted(conn.roles),
                    "cursor": registry.position_cursor(),
                },
            )
        )

    def _join(self, conn: Connection) -> None:
        group = (conn.roles, conn.subscription)
        audience = self.audiences.get(group)
        if audience is None:
            audience = self.audiences[group] = Audience(self._registry.writes)
        audience.add(conn)

    def release(self, conn: Connection, reflected: Callable[[RoutedEvent], bool]) -> None:
        """End a hold: deliver what `conn` collected, except what its snapshot already
        `reflected`, then make it a member of its group. No await: nothing falls between."""
        collected = self.held.pop(conn, None)
        if collected is None or conn.closed:
            return
        self.replay(conn, [event for event in collected if not reflected(event)])
        self._join(conn)

    def detach(self, conn: Connection) -> None:
        self.hold_at_ready.discard(conn)
        if self.held.pop(conn, None) is None:
            group = (conn.roles, conn.subscription)
            audience = self.audiences.get(group)
            if audience is None or conn not in audience.members:
                return
            audience.discard(conn)
            if not audience:
                del self.audiences[group]
        user_conns = self.by_user.get(conn.user_id)
        if user_conns is not None:
            user_conns.discard(conn)
            if not user_conns:
                del self.by_user[conn.user_id]
        self._registry.metrics.connections.dec()

    def connections(self) -> Iterable[Connection]:
        for conns in self.audiences.values():
            yield from conns
        yield from self.held

    def deliver_live(self, event: RoutedEvent) -> None:
        """Deliver to the registered sockets; sockets still attaching get it afterwards."""
        self._deliver(event, self._audience(event.target_user), replay=False)
        for waiting in self.attaching:
            waiting.buffer.append(event)
        for collected in self.held.values():
            collected.append(event)

    def replay(self, conn: Connection, events: Iterable[RoutedEvent]) -> None:
        """Deliver past events to one socket, with its roles and masks as if live."""
        audience = (((conn.roles, conn.subscription), (conn,)),)
        for event in events:
            self._deliver(event, audience, replay=True)

    def _audience(self, user: str | None) -> Iterable[tuple[Group, Iterable[Connection]]]:
        if user is None:
            return list(self.audiences.items())
        grouped: dict[Group, list[Connection]] = {}
        held = self.held
        for conn in self.by_user.get(user, ()):
            if conn not in held:
                grouped.setdefault((conn.roles, conn.subscription), []).append(conn)
        return grouped.items()

    def _deliver(
        self,
        event: RoutedEvent,
        audience: Iterable[tuple[Group, Iterable[Connection]]],
        *,
        replay: bool,
    ) -> None:
        if replay and event.target_user is not None:
            audience = [
                (group, [c for c in conns if c.user_id == event.target_user])
                for group, conns in audience
            ]
        metrics = self._registry.metrics
        delivered = 0
        if isinstance(event, BroadcastEvent):
            frame: bytes | None = None
            for (roles, _), conns in audience:
                if event.target_roles and not event.target_roles & roles:
                    continue
                if not conns:
                    continue
                if frame is None:
                    frame = text_frame(broadcast_message(event))
                    metrics.serializations.value += 1
                delivered += _write_all(conns, frame)
        else:
            policy = self._registry.policies.get(event.table)
            #: Per (masked columns seen raw, event type as the subscription shapes it).
            frames: dict[tuple[frozenset[str], str], bytes] = {}
            views: dict[Subscription, ChangeEvent | None] = {}
            owner = event.owner_id if policy.has_owner_rule else None
            for (roles, subscription), conns in audience:
                if not policy.allows(roles):
                    continue
                if subscription is ALL:  # most sockets: no dict look-up, no hashing
                    view: ChangeEvent | None = event
                elif subscription in views:
                    view = views[subscription]
                else:
                    view = views[subscription] = subscription.view(event)
                if view is None:
                    continue
                raw = policy.raw_columns(roles)
                if owner is None:  # the whole class sees the same frame: no per-socket choice
                    if not conns:
                        continue
                    key = (raw, view.event_type)
                    frame = frames.get(key)
                    if frame is None:
                        frame = frames[key] = text_frame(change_message(view, policy, raw))
                        metrics.serializations.value += 1
                    delivered += _write_all(conns, frame)
                    continue
                owner_raw = policy.raw_columns(roles, True)
                for conn in conns:
                    key = (owner_raw if conn.user_id == owner else raw, view.event_type)
                    frame = frames.get(key)
                    if frame is None:
                        frame = frames[key] = text_frame(change_message(view, policy, key[0]))
                        metrics.serializations.value += 1
                    delivered += conn.write(frame)
        if delivered:
            metrics.deliveries.value += delivered

    def revoke(self, notice: AccessRevoked) -> int:
        """Close the sockets a revocation applies to; returns how many."""
        for waiting in self.attaching:
            waiting.buffer.append(notice)
        if notice.user_id is None:
            candidates: Iterable[Connection] = list(self.connections())
        else:
            candidates = self.by_user.get(notice.user_id, ())
        targets = [conn for conn in candidates if _applies(notice, conn)]
        frame = revoked_frame(notice.reason)
        for conn in targets:
            conn.write(frame)
            conn.close(CloseCode.ACCESS_REVOKED, notice.reason)
            self.detach(conn)
        return len(targets)


class HubRegistry:
    """All hubs of this node, plus what they share: the history, policies, metrics."""

    def __init__(
        self,
        metrics: Metrics,
        history: History,
        *,
        writes: WriteScheduler | None = None,
        revocations_since: float | None = None,
        max_replays: int = DEFAULT_MAX_REPLAYS,
        replay_stall_seconds: float = DEFAULT_REPLAY_STALL_SECONDS,
    ) -> None:
        self.metrics = metrics
        self.history = history
        #: Resumes replaying at once on this node; the others wait for a slot.
        self._replays = asyncio.Semaphore(max_replays)
        self._replaying = 0
        #: A replaying socket that takes nothing for this long is a slow consumer.
        self.replay_stall_seconds = replay_stall_seconds
        #: Runs the write passes of every socket of this node's hubs.
        self.writes = WriteScheduler() if writes is None else writes
        self.policies = PolicyCache()
        self.hubs: dict[str, Hub] = {}
        #: Every access change committed from this time on reaches this registry (once the
        #: node is ready); a ticket issued earlier cannot be checked (`check_ticket`). The
        #: event source moves it when its view of revocations starts later than the registry.
        self.revocations_since = time.time() if revocations_since is None else revocations_since
        #: Recent access changes, by what they apply to (organization, user, session; None:
        #: any): the latest one's commit time and reason.
        self._revoked: dict[_Scope, tuple[float, str]] = {}
        #: The events of a reader item (one call per item): each routed event kept in history
        #: and delivered to its organization's sockets (every organization's for a TRUNCATE),
        #: each access change revoked. `_publish_all`, or its C twin bound to this registry.
        self.publish_all: Callable[[Iterable[RoutedEvent | AccessRevoked]], None] = (
            self._publish_all
            if publish_events is None
            else partial(
                publish_events,
                (self, metrics.events, history.append, self.hubs, ChangeEvent, AccessRevoked),
            )
        )

    def hub(self, organization_id: str) -> Hub:
        hub = self.hubs.get(organization_id)
        if hub is None:
            hub = self.hubs[organization_id] = Hub(organization_id, self)
        return hub

    def followed(self) -> list[str]:
        """The organizations this node has sockets (or attaching sockets) for."""
        return list(self.hubs)

    def position_cursor(self) -> str:
        return format_cursor(*self.history.position, self.history.epoch)

    async def attach(self, conn: Connection, since: str | None) -> None:
        """Replay what `conn` missed after `since`, register it, then send `ready` (see the
        module docstring for the steps). A cursor the history cannot vouch for gets
        ``resync_required``; a history that cannot be read closes the socket with 1013."""
        hub = self.hub(conn.organization_id)
        self.history.follow(hub.organization_id)
        if since is None:
            hub.register(conn)
            return
        waiting = _Attaching(conn)
        hub.attaching.append(waiting)
        try:
            async with self._replays:
                self._replaying += 1
                try:
                    await self._resume(hub, waiting, since)
                finally:
                    self._replaying -= 1
        finally:
            if waiting in hub.attaching:  # not registered: closed, revoked, failed
                hub.attaching.remove(waiting)

    async def _resume(self, hub: Hub, waiting: _Attaching, since: str) -> None:
        conn = waiting.conn
        if conn.closed:
            return  # gone while it waited for a slot
        after = parse_cursor(since, self.history.epoch)  # None: another epoch, or garbage
        try:
            missed = None if after is None else await self.history.since(hub.organization_id, after)
        except HistoryUnavailable as exc:
            log.warning("could not read the resume history", extra={"error": str(exc)})
            conn.close(CloseCode.TRY_AGAIN_LATER, "history unavailable, try again")
            return
        if missed is None:
            if conn.closed:
                return
            self.metrics.resyncs.inc()
            conn.write(system_frame("resync_required", {"cursor": since}))
            replay = _Replay(waiting, (), None)
        else:
            replay = _Replay(waiting, missed, after)
        while await self._drained(waiting):
            # From here to the end of the slice, no await.
            notice = waiting.revocation()
            if notice is not None:
                conn.write(revoked_frame(notice.reason))
                conn.close(CloseCode.ACCESS_REVOKED, notice.reason)
                self.metrics.revocations.labels(notice.reason).inc()
                return
            hub.replay(conn, replay.slice(REPLAY_SLICE_SECONDS / self._replaying))
            if replay.done:  # the final slice: nothing left, so registered in the same step
                hub.attaching.remove(waiting)
                hub.register(conn)
                return
            conn.write_now()  # this slice's frames go out now, within the socket's bound

    async def _drained(self, waiting: _Attaching) -> bool:
        """Let the loop run, and wait while the socket holds more than half its buffer; False
        if it closed, or took nothing for `replay_stall_seconds` (closed with 1013 then)."""
        conn = waiting.conn
        await asyncio.sleep(0)
        low = conn.max_send_buffer // 2
        held = conn.buffered
        if conn.closed or held <= low:
            return not conn.closed
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        while held > low:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
            if conn.closed:
                return False
            if waiting.scanned < len(waiting.buffer) and waiting.revocation() is not None:
                return True  # closed at once, not once the socket drains
            now, before, held = loop.time(), held, conn.buffered
            if held < before:
                progress_at = now
            elif now - progress_at > self.replay_stall_seconds:
                conn.close_slow()
                return False
        return True

    def detach(self, conn: Connection) -> None:
        hub = self.hubs.get(conn.organization_id)
        if hub is not None:
            hub.detach(conn)

    def publish(self, event: RoutedEvent) -> None:
        """Keep `event` in history and deliver it (see `publish_all`)."""
        self.publish_all((event,))

    def _publish_all(self, events: Iterable[RoutedEvent | AccessRevoked]) -> None:
        """`publish_all`, the definition: `gateway._speedups.publish_events` is its C twin."""
        tally, append, hubs = self.metrics.events, self.history.append, self.hubs
        for event in events:
            if isinstance(event, AccessRevoked):
                self.revoke(event)
                continue
            tally.value += 1
            append(event)
            org = event.organization_id
            if org is None:
                for hub in list(hubs.values()):
                    hub.deliver_live(event)
                continue
            one = hubs.get(org)
            if one is not None:
                one.deliver_live(event)

    def check_ticket(self, claims: TicketClaims) -> None:
        """Refuse a ticket whose access this node cannot vouch for.

        Raises:
            StaleTicketError: issued before the node's view of revocations began.
            TicketError: an access change that applies to it was committed after it was issued.
        """
        if claims.issued_at < self.revocations_since:
            raise StaleTicketError()
        if self.revocation(claims) is not None:
            raise TicketError("ticket predates an access change: fetch a new ticket")

    def is_revoked(self, claims: TicketClaims) -> bool:
        """Whether an access change committed after this ticket was issued: its roles are stale."""
        return self.revocation(claims) is not None

    def revocation(self, claims: TicketClaims) -> str | None:
        """The reason of a remembered access change that makes this ticket stale, if any: one
        committed after the ticket was issued, or any revocation of the session it names.

        A ticket lives 60 s, so a revocation is remembered that long (and a little more).
        """
        revoked = self._revoked
        session = claims.session_id
        for org in (claims.organization_id, None):
            for user in (claims.user_id, None):
                found = revoked.get((org, user, None))
                if found is not None and claims.issued_at < found[0]:
                    return found[1]
                if session is not None and (found := revoked.get((org, user, session))):
                    return found[1]
        return None

    def revoke(self, notice: AccessRevoked) -> None:
        """Remember `notice` for `revocation` and close the sockets it applies to."""
        scope = (notice.organization_id, notice.user_id, notice.session_id)
        known = self._revoked.get(scope)
        if known is None or notice.committed_at >= known[0]:
            self._revoked[scope] = (notice.committed_at, notice.reason)
        hubs = (
            list(self.hubs.values())
            if notice.organization_id is None
            else [self.hubs[notice.organization_id]]
            if notice.organization_id in self.hubs
            else []
        )
        closed = sum(hub.revoke(notice) for hub in hubs)
        if closed:
            self.metrics.revocations.labels(notice.reason).inc(closed)

    def trim(self) -> None:
        """Expire old history and revocations; forget hubs without sockets."""
        forget_before = time.time() - REVOCATION_MEMORY_SECONDS
        self._revoked = {
            scope: known for scope, known in self._revoked.items() if known[0] >= forget_before
        }
        self.history.trim()
        for org, hub in list(self.hubs.items()):
            if hub.idle:
                del self.hubs[org]
        self.metrics.history_events.set(len(self.history))

    def connections(self) -> Iterable[Connection]:
        for hub in self.hubs.values():
            yield from hub.connections()
