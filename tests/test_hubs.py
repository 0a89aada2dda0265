"""Hubs as pure code: a recording connection captures fan-out, no sockets, no database.

Covers what the integration tests can only sample: the order replay → ready → live, exactly
one serialization per visibility class, user targeting, the owner rule, the resume floor, and
revocation (notice, then close, then nothing more)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from cdc.cursors import format_cursor
from cdc.enrich import AccessRevoked, BroadcastEvent, ChangeEvent
from gateway.fanout import Connection
from gateway.hubs import CLOSE_ACCESS_REVOKED, HubRegistry
from gateway.metrics import Metrics
from gateway.tickets import TicketClaims
from walcast.config import parse_realtime_config

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
            }
        }
    }
)
TABLE = CONFIG.tables["public.applications"]
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class Recording:
    """Stands in for `gateway.fanout.Connection`: keeps what would have been written."""

    def __init__(self, user: str, roles: set[str], session: str | None = None) -> None:
        self.user_id, self.roles, self.session_id = user, frozenset(roles), session
        self.frames: list[bytes] = []
        self.closed_with: int | None = None
        self.closed = False

    def write(self, frame: bytes) -> bool:
        if self.closed:
            return False
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed, self.closed_with = True, code

    @property
    def messages(self) -> list[dict[str, Any]]:
        # A server text frame: 2 header bytes for payloads under 126 bytes, 4 up to 64 KiB.
        out = []
        for frame in self.frames:
            size = frame[1] & 0x7F
            out.append(orjson.loads(frame[2:] if size < 126 else frame[4:]))
        return out


def _as_conn(rec: Recording) -> Connection:
    return rec  # type: ignore[return-value]


def _change(
    lsn: int,
    row_id: str,
    *,
    org: str = "o",
    user: str | None = None,
    owner: str | None = "u-creator",
) -> ChangeEvent:
    row = {
        "id": row_id,
        "organizationId": org,
        "ssn": "123-45-6789",
        "email": "paul@example.com",
        "createdBy": owner,
    }
    return ChangeEvent(
        org, format_cursor(lsn, 1), lsn, WHEN, TABLE, "INSERT", row, None, (), user, owner
    )


def _registry(**options: Any) -> HubRegistry:
    registry = HubRegistry(Metrics(), **options)
    registry.complete_from = (0x10, 0)
    registry.advance((0x10, 0))
    return registry


def test_one_serialization_per_visibility_class() -> None:
    registry = _registry()
    hub = registry.hub("o")
    owners = [Recording(f"own{i}", {"owner"}) for i in range(50)]
    recruiters = [Recording(f"rec{i}", {"recruiter"}) for i in range(50)]
    creator = Recording("u-creator", {"recruiter"})
    viewer = Recording("v", {"viewer"})
    for rec in [*owners, *recruiters, creator, viewer]:
        hub.attach(_as_conn(rec), None)
    registry.publish(_change(0x20, "a"))
    assert registry.metrics.serializations._value.get() == 3  # owner, masked, creator
    assert {rec.messages[-1]["new"]["ssn"] for rec in owners} == {"123-45-6789"}
    assert {rec.messages[-1]["new"]["ssn"] for rec in recruiters} == {"*****6789"}
    assert creator.messages[-1]["new"]["email"] == "paul@example.com"
    assert recruiters[0].messages[-1]["new"]["email"] == "p***@e******.com"
    assert [m["event"] for m in viewer.messages] == ["ready"]  # not in requiredRoles
    assert owners[0].frames[-1] is owners[1].frames[-1]  # the same bytes object


def test_user_targeted_events_reach_only_that_user() -> None:
    registry = _registry()
    hub = registry.hub("o")
    alice, bob = Recording("alice", {"owner"}), Recording("bob", {"owner"})
    for rec in (alice, bob):
        hub.attach(_as_conn(rec), None)
    registry.publish(_change(0x20, "for-alice", user="alice"))
    registry.publish(
        BroadcastEvent(
            "o", format_cursor(0x30, 1), 0x30, "b", orjson.Fragment(b"{}"), frozenset(), "bob"
        )
    )
    assert [m.get("id") for m in alice.messages[1:]] == [format_cursor(0x20, 1)]
    assert [m.get("event") for m in bob.messages[1:]] == ["b"]


def test_replay_then_ready_then_live_and_the_resume_floor() -> None:
    registry = _registry(max_events=2)
    registry.publish(_change(0x20, "one"))
    registry.publish(_change(0x30, "two"))
    registry.publish(_change(0x40, "three"))  # evicts "one": history holds two and three
    resumed = Recording("r", {"owner"})
    registry.hub("o").attach(_as_conn(resumed), format_cursor(0x20, 1))
    registry.publish(_change(0x50, "four"))
    kinds = [m.get("event") or m["new"]["id"] for m in resumed.messages]
    assert kinds == ["two", "three", "ready", "four"]

    too_old = Recording("r2", {"owner"})
    registry.hub("o").attach(_as_conn(too_old), format_cursor(0x10, 1))
    assert [m["event"] for m in too_old.messages] == ["resync_required", "ready"]
    future = Recording("r3", {"owner"})
    registry.hub("o").attach(_as_conn(future), format_cursor(0x99, 1))
    assert [m["event"] for m in future.messages] == ["resync_required", "ready"]


def test_replay_applies_roles_and_masks_as_if_live() -> None:
    registry = _registry()
    registry.publish(_change(0x20, "a"))
    recruiter, viewer = Recording("x", {"recruiter"}), Recording("y", {"viewer"})
    for rec in (recruiter, viewer):
        registry.hub("o").attach(_as_conn(rec), format_cursor(0x10, 0))
    assert recruiter.messages[0]["new"]["ssn"] == "*****6789"
    assert [m["event"] for m in viewer.messages] == ["ready"]


def test_truncate_is_replayed_in_hubs_made_later() -> None:
    registry = _registry()
    truncate = ChangeEvent(
        None, format_cursor(0x20, 1), 0x20, WHEN, TABLE, "TRUNCATE", None, None, (), None, None
    )
    registry.publish(truncate)
    late = Recording("late", {"owner"})
    registry.hub("new-org").attach(_as_conn(late), format_cursor(0x10, 0))
    assert late.messages[0]["eventType"] == "TRUNCATE"


def test_revocation_sends_the_notice_closes_and_delivers_nothing_more() -> None:
    registry = _registry()
    hub = registry.hub("o")
    gone, other = Recording("gone", {"owner"}, "s1"), Recording("other", {"owner"})
    for rec in (gone, other):
        hub.attach(_as_conn(rec), None)
    registry.revoke(AccessRevoked("role-changed", "o", "gone", None, 0x20, WHEN.timestamp()))
    registry.publish(_change(0x30, "after"))
    assert gone.messages[-1] == {
        "type": "broadcast",
        "event": "auth:token-invalidated",
        "payload": {"reason": "role-changed"},
    }
    assert gone.closed_with == CLOSE_ACCESS_REVOKED
    assert other.messages[-1]["new"]["id"] == "after"

    def claims(issued_at: float, session: str | None = None) -> TicketClaims:
        return TicketClaims(
            "gone", "o", frozenset({"owner"}), "j", issued_at + 60, session, issued_at
        )

    assert registry.is_revoked(claims(WHEN.timestamp() - 1))
    assert not registry.is_revoked(claims(WHEN.timestamp() + 1))
    registry.revoke(AccessRevoked("session-revoked", None, "gone", "s1", 0x40, WHEN.timestamp()))
    assert registry.is_revoked(claims(WHEN.timestamp() + 1, "s1"))
