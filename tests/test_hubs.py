"""Hubs as pure code: a recording connection captures fan-out, no sockets, no database.

Covers what the integration tests can only sample: the order replay → ready → live, exactly
one serialization per visibility class, user targeting, the owner rule, the resume floor, and
revocation (notice, then close, then nothing more)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cdc.cursors import format_cursor
from gateway.config import TableConfig, parse_realtime_config
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent
from gateway.fanout import Connection, WriteScheduler
from gateway.history import MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.protocol import CloseCode
from gateway.tickets import StaleTicketError, TicketClaims

CONFIG = parse_realtime_config(
    {
        "tables": {
            "applications": {
                "requiredRoles": ["owner", "recruiter"],
                "ownerColumn": "createdBy",
                "masking": {
                    "ssn": {"type": "ssn", "show": {"roles": ["owner"]}},
                    "email": {"type": "email", "show": {"roles": ["owner"], "or": "owner"}},
                },
            },
            "notes": {"requiredRoles": ["owner"]},  # no owner rule: one frame per audience
        }
    }
)
TABLE = CONFIG.tables["public.applications"]
NOTES = CONFIG.tables["public.notes"]
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class RecordingTransport:
    """The transport under a `Connection`: keeps each write (one per socket per write pass)."""

    def __init__(self, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.buffered = buffered  #: what `get_write_buffer_size` reports: a slow client's backlog
        self.reads_nothing = False  #: every write stays buffered, as for a client that stopped

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self.reads_nothing:
            self.buffered += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        pass


class RecordingSocket:
    """The `WebSocketResponse` under a `Connection`: only its close code matters here."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def close(self, *, code: int, message: bytes) -> bool:
        self.closed_with = code
        return True


class Recording:
    """A real `gateway.fanout.Connection` over a recording transport; reads back its frames."""

    def __init__(
        self,
        user: str,
        roles: set[str],
        session: str | None = None,
        *,
        writes: WriteScheduler,
        buffered: int = 0,
        org: str = "o",
    ) -> None:
        self._writes = writes
        self.transport = RecordingTransport(buffered)
        self.socket = RecordingSocket()
        self.conn = Connection(
            self.socket,  # type: ignore[arg-type]
            self.transport,  # type: ignore[arg-type]
            user_id=user,
            organization_id=org,
            roles=frozenset(roles),
            session_id=session,
            max_send_buffer=1024,
            on_slow=lambda _conn: None,
            writes=writes,
        )

    @property
    def frames(self) -> list[bytes]:
        """The payloads written by now, frame by frame (server frames: FIN + text, no mask)."""
        self._writes.flush_now()  # the write pass that would run at the end of this turn
        stream, out = b"".join(self.transport.writes), []
        while stream:
            size, start = stream[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(stream[2:4]), 4
            out.append(stream[start : start + size])
            stream = stream[start + size :]
        return out

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(frame) for frame in self.frames]

    @property
    def closed_with(self) -> int | None:
        return self.socket.closed_with


def _change(
    lsn: int,
    row_id: str,
    *,
    org: str = "o",
    user: str | None = None,
    owner: str | None = "u-creator",
    table: TableConfig = TABLE,
) -> ChangeEvent:
    row = {
        "id": row_id,
        "organizationId": org,
        "ssn": "123-45-6789",
        "email": "paul@example.com",
        "createdBy": owner,
    }
    return ChangeEvent(org, (lsn, 1), "", WHEN, table, "INSERT", row, None, (), user, owner)


def _registry(writes: WriteScheduler | None = None, **history_options: Any) -> HubRegistry:
    """A registry over a `MemoryHistory` that is complete from 0x10 on (streaming started)."""
    history = MemoryHistory(**history_options)
    history.complete_from = (0x10, 0)
    history.advance((0x10, 0))
    return HubRegistry(Metrics(), history, writes=writes)


def _held(registry: HubRegistry, org: str | None) -> list[str]:
    history = registry.history
    assert isinstance(history, MemoryHistory)
    return [event.new["id"] for event in history.held(org) if isinstance(event, ChangeEvent)]


async def test_one_serialization_per_visibility_class() -> None:
    registry = _registry()
    owners = [Recording(f"own{i}", {"owner"}, writes=registry.writes) for i in range(50)]
    recruiters = [Recording(f"rec{i}", {"recruiter"}, writes=registry.writes) for i in range(50)]
    creator = Recording("u-creator", {"recruiter"}, writes=registry.writes)
    viewer = Recording("v", {"viewer"}, writes=registry.writes)
    for rec in [*owners, *recruiters, creator, viewer]:
        await registry.attach(rec.conn, None)
    registry.writes.flush_now()  # `ready` goes out in its own pass
    registry.publish(_change(0x20, "a"))
    assert registry.metrics.serializations.value == 3  # owner, masked, creator
    assert {rec.messages[-1]["new"]["ssn"] for rec in owners} == {"123-45-6789"}
    assert {rec.messages[-1]["new"]["ssn"] for rec in recruiters} == {"*****6789"}
    assert creator.messages[-1]["new"]["email"] == "paul@example.com"
    assert recruiters[0].messages[-1]["new"]["email"] == "p***@e******.com"
    assert [m["event"] for m in viewer.messages] == ["ready"]  # not in requiredRoles
    # Every owner socket was written the same bytes object: framed once, joined once.
    assert owners[0].transport.writes[-1] is owners[1].transport.writes[-1]


async def test_user_targeted_events_reach_only_that_user() -> None:
    registry = _registry()
    alice = Recording("alice", {"owner"}, writes=registry.writes)
    bob = Recording("bob", {"owner"}, writes=registry.writes)
    for rec in (alice, bob):
        await registry.attach(rec.conn, None)
    registry.publish(_change(0x20, "for-alice", user="alice"))
    registry.publish(
        BroadcastEvent("o", (0x30, 1), "", "b", orjson.Fragment(b"{}"), frozenset(), "bob")
    )
    assert [m.get("id") for m in alice.messages[1:]] == [format_cursor(0x20, 1)]
    assert [m.get("event") for m in bob.messages[1:]] == ["b"]


async def test_replay_then_ready_then_live_and_the_resume_floor() -> None:
    registry = _registry(max_events=2)
    registry.publish(_change(0x20, "one"))
    registry.publish(_change(0x30, "two"))
    registry.publish(_change(0x40, "three"))  # evicts "one": history holds two and three
    resumed = Recording("r", {"owner"}, writes=registry.writes)
    await registry.attach(resumed.conn, format_cursor(0x20, 1))
    registry.publish(_change(0x50, "four"))
    kinds = [m.get("event") or m["new"]["id"] for m in resumed.messages]
    assert kinds == ["two", "three", "ready", "four"]

    too_old = Recording("r2", {"owner"}, writes=registry.writes)
    await registry.attach(too_old.conn, format_cursor(0x10, 1))
    assert [m["event"] for m in too_old.messages] == ["resync_required", "ready"]
    future = Recording("r3", {"owner"}, writes=registry.writes)
    await registry.attach(future.conn, format_cursor(0x99, 1))
    assert [m["event"] for m in future.messages] == ["resync_required", "ready"]


async def test_the_node_wide_bound_evicts_the_oldest_events_of_any_hub() -> None:
    registry = _registry(max_events=100, max_total_events=3)
    registry.publish(_change(0x20, "a1", org="a"))
    registry.publish(_change(0x30, "b1", org="b"))
    registry.publish(_change(0x40, "a2", org="a"))
    registry.publish(_change(0x50, "b2", org="b"))  # four events: "a1", the oldest, goes
    assert len(registry.history) == 3
    assert _held(registry, "a") == ["a2"]
    assert _held(registry, "b") == ["b1", "b2"]

    # "a" cannot replay from before a1 any more; "b" lost nothing and still can.
    a = Recording("ra", {"owner"}, writes=registry.writes, org="a")
    await registry.attach(a.conn, format_cursor(0x10, 1))
    assert [m.get("event") for m in a.messages] == ["resync_required", "ready"]
    b = Recording("rb", {"owner"}, writes=registry.writes, org="b")
    await registry.attach(b.conn, format_cursor(0x10, 1))
    assert [m.get("event") or m["new"]["id"] for m in b.messages] == ["b1", "b2", "ready"]
    a_later = Recording("ra2", {"owner"}, writes=registry.writes, org="a")
    await registry.attach(a_later.conn, format_cursor(0x20, 1))  # saw a1: a2 is all it needs
    assert [m.get("event") or m["new"]["id"] for m in a_later.messages] == ["a2", "ready"]


async def test_replay_applies_roles_and_masks_as_if_live() -> None:
    registry = _registry()
    registry.publish(_change(0x20, "a"))
    recruiter = Recording("x", {"recruiter"}, writes=registry.writes)
    viewer = Recording("y", {"viewer"}, writes=registry.writes)
    for rec in (recruiter, viewer):
        await registry.attach(rec.conn, format_cursor(0x10, 0))
    assert recruiter.messages[0]["new"]["ssn"] == "*****6789"
    assert [m["event"] for m in viewer.messages] == ["ready"]


async def test_truncate_is_replayed_in_hubs_made_later() -> None:
    registry = _registry()
    truncate = ChangeEvent(None, (0x20, 1), "", WHEN, TABLE, "TRUNCATE", None, None, (), None, None)
    registry.publish(truncate)
    late = Recording("late", {"owner"}, writes=registry.writes, org="new-org")
    await registry.attach(late.conn, format_cursor(0x10, 0))
    assert late.messages[0]["eventType"] == "TRUNCATE"


async def test_revocation_sends_the_notice_closes_and_delivers_nothing_more() -> None:
    registry = _registry()
    gone = Recording("gone", {"owner"}, "s1", writes=registry.writes)
    other = Recording("other", {"owner"}, writes=registry.writes)
    for rec in (gone, other):
        await registry.attach(rec.conn, None)
    registry.revoke(AccessRevoked("role-changed", "o", "gone", None, 0x20, WHEN.timestamp()))
    registry.publish(_change(0x30, "after"))
    assert gone.messages[-1] == {
        "type": "broadcast",
        "event": "auth:token-invalidated",
        "payload": {"reason": "role-changed"},
    }
    await asyncio.sleep(0.01)  # the close handshake runs in the background
    assert gone.closed_with == CloseCode.ACCESS_REVOKED
    assert other.messages[-1]["new"]["id"] == "after"

    def claims(issued_at: float, session: str | None = None) -> TicketClaims:
        return TicketClaims(
            "gone", "o", frozenset({"owner"}), "j", issued_at + 60, session, issued_at
        )

    assert registry.is_revoked(claims(WHEN.timestamp() - 1))
    assert not registry.is_revoked(claims(WHEN.timestamp() + 1))
    registry.revoke(AccessRevoked("session-revoked", None, "gone", "s1", 0x40, WHEN.timestamp()))
    assert registry.is_revoked(claims(WHEN.timestamp() + 1, "s1"))


async def test_revocation_of_everyone_closes_every_socket_and_stales_older_tickets() -> None:
    """``TRUNCATE member``: a notice naming no organization, user or session applies to every
    socket of every organization, a resuming one included."""
    registry = _registry()
    socks = [
        Recording("a", {"owner"}, "s1", writes=registry.writes, org="o"),
        Recording("b", {"recruiter"}, writes=registry.writes, org="p"),
    ]
    for rec in socks:
        await registry.attach(rec.conn, None)
    resuming = Recording("c", {"owner"}, writes=registry.writes, org="p")
    attaching = asyncio.create_task(registry.attach(resuming.conn, format_cursor(0x10, 0)))
    await asyncio.sleep(0)
    at = WHEN.timestamp()
    registry.revoke(AccessRevoked("member-removed", None, None, None, 0x20, at))
    registry.publish(_change(0x30, "after", org="p"))
    await attaching
    await asyncio.sleep(0.01)
    for rec in (*socks, resuming):
        assert rec.messages[-1]["payload"] == {"reason": "member-removed"}
        assert rec.closed_with == CloseCode.ACCESS_REVOKED

    def claims(user: str, issued_at: float) -> TicketClaims:
        return TicketClaims(user, "q", frozenset(), "j", issued_at + 60, None, issued_at)

    assert registry.revocation(claims("anyone", at - 0.001)) == "member-removed"
    assert registry.revocation(claims("anyone", at)) is None


def test_tickets_issued_before_the_view_of_revocations_began_are_stale() -> None:
    registry = HubRegistry(Metrics(), MemoryHistory(), revocations_since=WHEN.timestamp())
    issued = WHEN.timestamp() - 0.5  # an iat in whole seconds, just before: not rounded up
    with pytest.raises(StaleTicketError) as info:
        registry.check_ticket(TicketClaims("u", "o", frozenset(), "j", issued + 60, None, issued))
    assert "fetch a new ticket" in info.value.reason
    registry.check_ticket(
        TicketClaims("u", "o", frozenset(), "j", WHEN.timestamp() + 60, None, WHEN.timestamp())
    )


# -- write passes (gateway.fanout): shared audience frames, a socket's own frames, order --------


def _note(lsn: int, row_id: str, user: str | None = None) -> ChangeEvent:
    return _change(lsn, row_id, user=user, table=NOTES)


async def _owners(registry: HubRegistry, *users: str) -> list[Recording]:
    recs = [Recording(user, {"owner"}, writes=registry.writes) for user in users]
    for rec in recs:
        await registry.attach(rec.conn, None)
    registry.writes.flush_now()
    return recs


def _ids(rec: Recording) -> list[str]:
    return [m.get("id") or m["event"] for m in rec.messages]


async def test_a_socket_s_own_frame_between_shared_ones_keeps_the_order() -> None:
    registry = _registry()
    alice, bob = await _owners(registry, "alice", "bob")
    registry.publish(_note(0x20, "a"))
    registry.publish(_note(0x30, "for-alice", user="alice"))
    registry.publish(_note(0x40, "b"))
    a, only, b = (format_cursor(lsn, 1) for lsn in (0x20, 0x30, 0x40))
    assert _ids(alice)[1:] == [a, only, b]
    assert _ids(bob)[1:] == [a, b]
    assert len(bob.transport.writes) == 2  # `ready`, then both events in one write


async def test_a_socket_attached_mid_pass_gets_what_follows_it_exactly_once() -> None:
    registry = _registry()
    (alice,) = await _owners(registry, "alice")
    registry.publish(_note(0x20, "a"))
    late = Recording("late", {"owner"}, writes=registry.writes)
    resumed = Recording("resumed", {"owner"}, writes=registry.writes)
    await registry.attach(late.conn, None)
    await registry.attach(resumed.conn, format_cursor(0x10, 0))
    registry.publish(_note(0x30, "b"))
    a, b = format_cursor(0x20, 1), format_cursor(0x30, 1)
    assert _ids(alice)[1:] == [a, b]
    assert _ids(late) == ["ready", b]
    assert _ids(resumed) == [a, "ready", b]  # "a" by replay, not again from the pass


async def test_close_writes_what_is_queued_then_nothing_more() -> None:
    registry = _registry()
    alice, bob = await _owners(registry, "alice", "bob")
    registry.publish(_note(0x20, "a"))
    alice.conn.write(b"\x81\x02{}")
    alice.conn.close(1000, "bye")
    registry.detach(alice.conn)
    registry.publish(_note(0x30, "b"))
    await asyncio.sleep(0.01)
    assert alice.closed_with == 1000
    assert alice.messages[1:] == [alice.messages[1], {}]  # "a", its own frame; not "b"
    assert alice.messages[1]["id"] == format_cursor(0x20, 1)
    assert _ids(bob)[1:] == [format_cursor(0x20, 1), format_cursor(0x30, 1)]


async def test_a_slow_consumer_is_closed_after_the_pass_the_others_get_everything() -> None:
    registry = _registry()
    fast, slow = await _owners(registry, "fast", "slow")
    slow.transport.buffered = 10**9  # its client stopped reading: the kernel buffer is full
    registry.publish(_note(0x20, "a"))
    registry.publish(_note(0x30, "b"))
    registry.writes.flush_now()  # a pass of shared frames only: the audience's own path
    registry.publish(_note(0x40, "c"))
    await asyncio.sleep(0.01)
    assert slow.closed_with == CloseCode.TRY_AGAIN_LATER
    assert _ids(slow) == ["ready", format_cursor(0x20, 1), format_cursor(0x30, 1)]
    assert _ids(fast)[1:] == [format_cursor(lsn, 1) for lsn in (0x20, 0x30, 0x40)]


async def test_a_pass_past_the_limit_goes_in_whole_frame_pieces_and_stops_past_it() -> None:
    registry = _registry()
    reading, stalled = await _owners(registry, "reading", "stalled")
    stalled.transport.reads_nothing = True
    already = len(stalled.transport.writes)
    lsns = range(0x20, 0x20 + 0x10 * 20, 0x10)  # 20 frames, several times the 1024-byte limit
    for lsn in lsns:
        registry.publish(_note(lsn, f"n{lsn}"))
    registry.writes.flush_now()  # a pass of shared frames only: the audience's own path
    await asyncio.sleep(0.01)
    limit, pieces = stalled.conn.max_send_buffer, stalled.transport.writes[already:]
    assert len(pieces) > 1 and all(len(piece) <= limit for piece in pieces)
    assert limit < stalled.transport.buffered <= 2 * limit  # it stopped once past the limit
    assert stalled.closed_with == CloseCode.TRY_AGAIN_LATER
    expected = [format_cursor(lsn, 1) for lsn in lsns]
    got = _ids(stalled)[1:]
    assert 0 < len(got) < len(expected) and got == expected[: len(got)]  # whole frames, in order
    assert all(len(piece) <= limit for piece in reading.transport.writes)  # pieces too
    assert _ids(reading)[1:] == expected  # and it got them all


async def test_writes_coalesce_right_after_a_pass_and_go_at_once_when_idle() -> None:
    coalesce = 0.5  # long enough that a stalled CI machine cannot pass it by accident
    registry = _registry(writes=WriteScheduler(coalesce))
    alice = Recording("alice", {"owner"}, writes=registry.writes)
    await registry.attach(alice.conn, None)
    await asyncio.sleep(coalesce * 1.5)  # `ready` went out; the gateway is idle again
    assert len(alice.transport.writes) == 1
    registry.publish(_note(0x20, "a"))
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(alice.transport.writes) == 2  # idle: written on the next loop turn
    registry.publish(_note(0x30, "b"))
    registry.publish(_note(0x40, "c"))
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(alice.transport.writes) == 2  # a pass just ran: these wait for the next one
    await asyncio.sleep(coalesce * 1.5)
    assert len(alice.transport.writes) == 3  # ... and go out together
    assert _ids(alice)[1:] == [format_cursor(lsn, 1) for lsn in (0x20, 0x30, 0x40)]
