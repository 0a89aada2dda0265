"""One hub per organization: its sockets, grouped by role set, and its resume history.

The counterpart of the seed system's one Durable Object per organization: a socket is attached
to exactly one hub and only ever receives that hub's events, so no event crosses organizations.

Everything here is synchronous. Attaching a socket replays its missed events, registers it and
sends `ready` without an await in between, so no live event can slip into the seam between
replay and live delivery, and nothing published after `ready` can be missed.

History keeps each event for `history_seconds` (and at most `max_events` per hub, and at most
`max_total_events` on the node, oldest first across hubs) so a client can resume with
`since=<id>`. A hub also knows from which cursor on its history is complete; a resume cursor
below that gets `resync_required` instead of a silent gap.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from operator import itemgetter

from cdc.cursors import CursorKey, format_cursor, parse_cursor
from gateway.events import AccessRevoked, BroadcastEvent, RoutedEvent
from gateway.fanout import Audience, Connection, WriteScheduler
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
from gateway.tickets import TicketClaims

__all__ = ["Hub", "HubRegistry"]

REVOCATION_MEMORY_SECONDS = 120.0  #: longer than a ticket lives (60 s) plus clock skew

Roles = frozenset[str]


#: History entries (key, time, event) and remembered ones (key, hub) both sort by their key.
_by_key = itemgetter(0)


def _write_all(conns: Iterable[Connection], frame: bytes) -> int:
    """Queue `frame` for `conns`: once for a whole audience, else socket by socket."""
    if isinstance(conns, Audience):
        return conns.write(frame)
    return sum(conn.write(frame) for conn in conns)


class Hub:
    """The sockets and the history of one organization."""

    def __init__(self, organization_id: str, registry: HubRegistry) -> None:
        self.organization_id = organization_id
        self._registry = registry
        self.by_roles: dict[Roles, Audience] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.history: deque[tuple[CursorKey, float, RoutedEvent]] = deque()
        self.evicted_up_to: CursorKey | None = None  #: history is complete above this key

    # -- sockets ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return sum(len(conns) for conns in self.by_roles.values())

    def attach(self, conn: Connection, since: str | None) -> None:
        """Replay what `conn` missed after `since`, register it, then send `ready`."""
        registry = self._registry
        if since is not None:
            key = parse_cursor(since)
            if key is None or not registry.can_resume(self, key):
                registry.metrics.resyncs.inc()
                conn.write(system_frame("resync_required", {"cursor": since}))
            else:
                missed = heapq.merge(self.history, registry.global_history.history, key=_by_key)
                for event_key, _, event in missed:
                    if event_key > key:
                        self._deliver(event, ((conn.roles, (conn,)),), replay=True)
        audience = self.by_roles.get(conn.roles)
        if audience is None:
            audience = self.by_roles[conn.roles] = Audience(registry.writes)
        audience.add(conn)
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

    def detach(self, conn: Connection) -> None:
        audience = self.by_roles.get(conn.roles)
        if audience is None or conn not in audience.members:
            return
        audience.discard(conn)
        if not audience:
            del self.by_roles[conn.roles]
        user_conns = self.by_user.get(conn.user_id)
        if user_conns is not None:
            user_conns.discard(conn)
            if not user_conns:
                del self.by_user[conn.user_id]
        self._registry.metrics.connections.dec()

    def connections(self) -> Iterable[Connection]:
        for conns in self.by_roles.values():
            yield from conns

    # -- events ----------------------------------------------------------------------------

    def publish(self, key: CursorKey, event: RoutedEvent, now: float) -> None:
        self._registry.remember(self, key, now, event)
        self.deliver_live(event)

    def deliver_live(self, event: RoutedEvent) -> None:
        self._deliver(event, self._audience(event.target_user), replay=False)

    def trim(self, now: float) -> None:
        history, registry = self.history, self._registry
        oldest = now - registry.history_seconds
        while history and (history[0][1] < oldest or len(history) > registry.max_events):
            self.evict_oldest()

    def evict_oldest(self) -> None:
        self.evicted_up_to = self.history.popleft()[0]
        self._registry.history_size -= 1

    def _audience(self, user: str | None) -> Iterable[tuple[Roles, Iterable[Connection]]]:
        if user is None:
            return list(self.by_roles.items())
        grouped: dict[Roles, list[Connection]] = {}
        for conn in self.by_user.get(user, ()):
            grouped.setdefault(conn.roles, []).append(conn)
        return grouped.items()

    def _deliver(
        self,
        event: RoutedEvent,
        audience: Iterable[tuple[Roles, Iterable[Connection]]],
        *,
        replay: bool,
    ) -> None:
        if replay and event.target_user is not None:
            audience = [
                (roles, [c for c in conns if c.user_id == event.target_user])
                for roles, conns in audience
            ]
        metrics = self._registry.metrics
        delivered = 0
        if isinstance(event, BroadcastEvent):
            frame: bytes | None = None
            for roles, conns in audience:
                if event.target_roles and not event.target_roles & roles:
                    continue
                if not conns:
                    continue
                if frame is None:
                    frame = text_frame(broadcast_message(event))
                    metrics.serializations.inc()
                delivered += _write_all(conns, frame)
        else:
            policy = self._registry.policies.get(event.table)
            frames: dict[frozenset[str], bytes] = {}
            owner = event.owner_id if policy.has_owner_rule else None
            for roles, conns in audience:
                if not policy.allows(roles):
                    continue
                raw = policy.raw_columns(roles)
                if owner is None:  # the whole class sees the same frame: no per-socket choice
                    if not conns:
                        continue
                    frame = frames.get(raw)
                    if frame is None:
                        frame = frames[raw] = text_frame(change_message(event, policy, raw))
                        metrics.serializations.inc()
                    delivered += _write_all(conns, frame)
                    continue
                owner_raw = policy.raw_columns(roles, True)
                for conn in conns:
                    visible = owner_raw if conn.user_id == owner else raw
                    frame = frames.get(visible)
                    if frame is None:
                        frame = frames[visible] = text_frame(change_message(event, policy, visible))
                        metrics.serializations.inc()
                    delivered += conn.write(frame)
        if delivered:
            metrics.deliveries.inc(delivered)

    def revoke(self, notice: AccessRevoked) -> int:
        """Close the sockets a revocation applies to; returns how many."""
        if notice.user_id is None:
            return 0
        targets = [
            conn
            for conn in self.by_user.get(notice.user_id, ())
            if notice.session_id is None or conn.session_id == notice.session_id
        ]
        frame = revoked_frame(notice.reason)
        for conn in targets:
            conn.write(frame)
            conn.close(CloseCode.ACCESS_REVOKED, notice.reason)
            self.detach(conn)
        return len(targets)


def _still_held(key: CursorKey, hub: Hub) -> bool:
    """Whether the oldest entry of `hub`'s history is still the one remembered as `key`
    (history is in key order, so an older key there means it was evicted meanwhile)."""
    return bool(hub.history) and hub.history[0][0] <= key


class HubRegistry:
    """All hubs of this node, plus what they share: policies, metrics, the resume floor."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        history_seconds: float = 120.0,
        max_events: int = 100_000,
        max_total_events: int = 500_000,
        clock: Callable[[], float] = time.monotonic,
        writes: WriteScheduler | None = None,
    ) -> None:
        self.metrics = metrics
        #: Runs the write passes of every socket of this node's hubs.
        self.writes = WriteScheduler() if writes is None else writes
        self.history_seconds = history_seconds
        self.max_events = max_events
        self.max_total_events = max_total_events
        #: Events in every hub's history, and (key, hub) in the order they were remembered:
        #: the node-wide bound evicts from the front (entries a hub already evicted are skipped).
        self.history_size = 0
        self._remembered: deque[tuple[CursorKey, Hub]] = deque()
        self.policies = PolicyCache()
        self._clock = clock
        self.hubs: dict[str, Hub] = {}
        #: Events for every organization (TRUNCATE), kept once rather than in each hub.
        self.global_history = Hub("", self)
        #: Every event with a key at or above this is in history (set when streaming starts).
        self.complete_from: CursorKey | None = None
        #: The stream position reached: a client told this cursor in `ready` has missed nothing.
        self.position: CursorKey = (0, 0)
        #: Recent access changes, by (organization, user) and by session id: commit times.
        self._revoked_members: dict[tuple[str | None, str], float] = {}
        self._revoked_sessions: dict[str, float] = {}

    def hub(self, organization_id: str) -> Hub:
        hub = self.hubs.get(organization_id)
        if hub is None:
            hub = self.hubs[organization_id] = Hub(organization_id, self)
        return hub

    def position_cursor(self) -> str:
        return format_cursor(*self.position)

    def advance(self, key: CursorKey) -> None:
        if key > self.position:
            self.position = key

    def can_resume(self, hub: Hub, key: CursorKey) -> bool:
        """Whether every event after `key` that `hub` may hold is still in its history."""
        if self.complete_from is None or key > self.position:
            return False  # not streaming yet, or a cursor from the future: another database
        for evicted in (hub.evicted_up_to, self.global_history.evicted_up_to):
            if evicted is not None and key < evicted:
                return False
        return key >= self.complete_from

    def publish(self, event: RoutedEvent) -> None:
        key = parse_cursor(event.cursor)
        assert key is not None
        now = self._clock()
        self.metrics.events.inc()
        if event.organization_id is None:
            # Kept once, for every organization: hubs made later replay it too.
            self.remember(self.global_history, key, now, event)
            for hub in list(self.hubs.values()):
                hub.deliver_live(event)
        else:
            self.hub(event.organization_id).publish(key, event, now)
        self.advance(key)

    def remember(self, hub: Hub, key: CursorKey, now: float, event: RoutedEvent) -> None:
        """Add an event to `hub`'s history, then trim by time and by both bounds."""
        hub.history.append((key, now, event))
        self._remembered.append((key, hub))
        self.history_size += 1
        hub.trim(now)
        remembered = self._remembered
        while self.history_size > self.max_total_events:
            oldest_key, oldest_hub = remembered.popleft()
            history = oldest_hub.history
            if history and history[0][0] == oldest_key:
                oldest_hub.evict_oldest()
        if len(remembered) > 2 * self.history_size + 1024:
            self._forget_evicted()

    def _forget_evicted(self) -> None:
        """Rebuild the order from what the hubs still hold (per-hub trims leave stale entries)."""
        hubs = [self.global_history, *self.hubs.values()]
        self._remembered = deque(
            heapq.merge(*([(key, hub) for key, _, _ in hub.history] for hub in hubs), key=_by_key)
        )

    def is_revoked(self, claims: TicketClaims) -> bool:
        """Whether an access change committed after this ticket was issued: its roles are stale.

        A ticket lives 60 s, so a revocation is remembered that long (and a little more).
        """
        for key in ((claims.organization_id, claims.user_id), (None, claims.user_id)):
            revoked_at = self._revoked_members.get(key)
            if revoked_at is not None and claims.issued_at < revoked_at:
                return True
        return claims.session_id is not None and claims.session_id in self._revoked_sessions

    def revoke(self, notice: AccessRevoked) -> None:
        if notice.session_id is not None:
            self._revoked_sessions[notice.session_id] = notice.committed_at
        elif notice.user_id is not None:
            key = (notice.organization_id, notice.user_id)
            self._revoked_members[key] = max(notice.committed_at, self._revoked_members.get(key, 0))
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
        """Expire old history everywhere and forget idle, empty hubs."""
        now = self._clock()
        forget_before = time.time() - REVOCATION_MEMORY_SECONDS
        self._revoked_members = {
            key: at for key, at in self._revoked_members.items() if at >= forget_before
        }
        self._revoked_sessions = {
            key: at for key, at in self._revoked_sessions.items() if at >= forget_before
        }
        self.global_history.trim(now)
        for org, hub in list(self.hubs.items()):
            hub.trim(now)
            if not hub.history and not hub.by_roles and hub.evicted_up_to is None:
                del self.hubs[org]
        remembered = self._remembered
        while remembered and not _still_held(*remembered[0]):
            remembered.popleft()
        self.metrics.history_events.set(self.history_size)

    def connections(self) -> Iterable[Connection]:
        for hub in self.hubs.values():
            yield from hub.connections()
