"""Routing rules (walcast.routing), cursors (cdc.cursors) and the retention window, as pure code."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.changes import LogicalMessage, RowChange, TransactionStart
from cdc.cursors import format_cursor, parse_cursor
from gateway.config import parse_realtime_config
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent
from walcast.pipeline import RetentionWindow
from walcast.routing import Router

CONFIG = parse_realtime_config(
    {
        "tables": {
            "applications": {"ownerColumn": "createdBy", "onDelete": False},
            "notes": {"userColumn": "userId"},
        }
    }
)
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _router() -> Router:
    router = Router(CONFIG)
    router.route(TransactionStart(xid=1, commit_lsn=0x100, commit_time=WHEN))
    return router


def _change(
    kind: str, table: str = "applications", *, new: Any = None, old: Any = None, position: int = 1
) -> RowChange:
    return RowChange(0x100, position, "public", table, kind, new, old, ())


def test_insert_routes_to_the_row_organization() -> None:
    (event,) = _router().route(
        _change("INSERT", new={"id": 1, "organizationId": "o1", "createdBy": "u9"})
    )
    assert isinstance(event, ChangeEvent)
    assert (event.organization_id, event.event_type, event.owner_id) == ("o1", "INSERT", "u9")
    assert event.cursor == "0000000000000100-0001" and event.commit_time == WHEN


def test_null_organization_is_dropped_and_counted() -> None:
    router = _router()
    assert router.route(_change("INSERT", new={"id": 1, "organizationId": None})) == []
    assert router.dropped_null_organization == 1


def test_kind_switches_and_unconfigured_tables() -> None:
    router = _router()
    assert router.route(_change("DELETE", old={"organizationId": "o1"})) == []  # onDelete false
    assert router.route(_change("INSERT", "other", new={"organizationId": "o1"})) == []


def test_moving_between_organizations_is_delete_then_insert() -> None:
    router = Router(parse_realtime_config({"tables": {"t": {}}}))
    router.route(TransactionStart(1, 0x100, WHEN))
    old = {"id": 1, "organizationId": "a", "v": "before"}
    new = {"id": 1, "organizationId": "b", "v": "after"}
    leave, arrive = router.route(_change("UPDATE", "t", new=new, old=old))
    assert isinstance(leave, ChangeEvent) and isinstance(arrive, ChangeEvent)
    assert (leave.organization_id, leave.event_type, leave.new, leave.old) == (
        "a",
        "DELETE",
        None,
        old,
    )
    assert (arrive.organization_id, arrive.event_type, arrive.new, arrive.old) == (
        "b",
        "INSERT",
        new,
        None,
    )


def test_reassigned_user_row_leaves_the_old_user() -> None:
    old = {"organizationId": "o", "userId": "u1"}
    new = {"organizationId": "o", "userId": "u2"}
    leave, arrive = _router().route(_change("UPDATE", "notes", new=new, old=old))
    assert (leave.target_user, leave.event_type) == ("u1", "DELETE")  # type: ignore[union-attr]
    assert (arrive.target_user, arrive.event_type) == ("u2", "INSERT")  # type: ignore[union-attr]


def test_owner_exception_needs_the_same_owner_in_both_versions() -> None:
    same = _router().route(
        _change(
            "UPDATE",
            new={"organizationId": "o", "createdBy": "u"},
            old={"organizationId": "o", "createdBy": "u"},
        )
    )
    changed = _router().route(
        _change(
            "UPDATE",
            new={"organizationId": "o", "createdBy": "u"},
            old={"organizationId": "o", "createdBy": "v"},
        )
    )
    assert same[0].owner_id == "u"  # type: ignore[union-attr]
    assert changed[0].owner_id is None  # type: ignore[union-attr]


def test_truncate_goes_to_every_organization() -> None:
    router = Router(parse_realtime_config({"tables": {"t": {}}}))
    router.route(TransactionStart(1, 0x100, WHEN))
    (event,) = router.route(_change("TRUNCATE", "t"))
    assert isinstance(event, ChangeEvent) and event.organization_id is None


@pytest.mark.parametrize(
    ("kind", "old", "new", "reason"),
    [
        (
            "UPDATE",
            {"organizationId": "o", "userId": "u", "role": "owner"},
            {"organizationId": "o", "userId": "u", "role": "recruiter"},
            "role-changed",
        ),
        ("DELETE", {"organizationId": "o", "userId": "u", "role": "owner"}, None, "member-removed"),
        (
            "UPDATE",
            {"organizationId": "o", "userId": "u", "role": "owner"},
            {"organizationId": "p", "userId": "u", "role": "owner"},
            "member-removed",
        ),
    ],
)
def test_member_changes_revoke_access(kind: str, old: Any, new: Any, reason: str) -> None:
    (notice,) = _router().route(_change(kind, "member", old=old, new=new))
    assert isinstance(notice, AccessRevoked)
    assert (notice.reason, notice.organization_id, notice.user_id) == (reason, "o", "u")
    assert notice.committed_at == WHEN.timestamp()


def test_member_insert_and_unchanged_role_revoke_nothing() -> None:
    row = {"organizationId": "o", "userId": "u", "role": "owner"}
    assert _router().route(_change("INSERT", "member", new=row)) == []
    assert _router().route(_change("UPDATE", "member", new=row, old=dict(row))) == []


def test_session_delete_revokes_that_session() -> None:
    (notice,) = _router().route(
        _change("DELETE", "session", old={"id": "s1", "userId": "u", "token": "secret"})
    )
    assert isinstance(notice, AccessRevoked)
    assert (notice.reason, notice.session_id, notice.user_id) == ("session-revoked", "s1", "u")


@pytest.mark.parametrize(
    ("table", "reason"), [("member", "member-removed"), ("session", "session-revoked")]
)
def test_truncate_of_the_session_store_revokes_everyone(table: str, reason: str) -> None:
    (notice,) = _router().route(_change("TRUNCATE", table))
    assert isinstance(notice, AccessRevoked)
    assert (notice.reason, notice.organization_id, notice.user_id, notice.session_id) == (
        reason,
        None,
        None,
        None,
    )
    assert notice.committed_at == WHEN.timestamp()


_SESSION = {
    "id": "s1",
    "userId": "u",
    "token": "secret",
    "expiresAt": "2026-11-29T12:00:00.000000+00:00",
    "updatedAt": "2026-11-28T11:00:00+00:00",
}


@pytest.mark.parametrize(
    ("changes", "revoked"),
    [
        ({"expiresAt": "2026-11-28T11:59:59.999999+00:00"}, True),  # before the commit
        ({"expiresAt": "2026-11-28T12:00:00+00:00"}, True),  # at the commit
        ({"expiresAt": "2026-11-28T13:00:00+01:00"}, True),  # the same instant, another offset
        ({"expiresAt": "2026-11-28T11:00:00"}, True),  # timestamp without time zone: UTC
        ({"expiresAt": "-infinity"}, True),
        ({"expiresAt": None}, True),
        ({"token": "rotated"}, True),
        ({"userId": "someone-else"}, True),
        ({"expiresAt": "2026-12-28T12:00:00+00:00"}, False),  # a rolling session, extended
        ({"expiresAt": "infinity"}, False),
        ({"updatedAt": "2026-11-28T12:00:00+00:00"}, False),
        ({"activeOrganizationId": "o2"}, False),
    ],
)
def test_session_update_revokes_when_it_ends_the_session(
    changes: dict[str, Any], revoked: bool
) -> None:
    routed = _router().route(
        _change("UPDATE", "session", old=dict(_SESSION), new={**_SESSION, **changes})
    )
    if not revoked:
        assert routed == []
        return
    (notice,) = routed
    assert isinstance(notice, AccessRevoked)
    assert (notice.reason, notice.session_id, notice.user_id) == ("session-revoked", "s1", "u")


def test_member_change_without_its_old_row_revokes_rather_than_trusts() -> None:
    row = {"organizationId": "o", "userId": "u", "role": "owner"}
    (notice,) = _router().route(_change("UPDATE", "member", new=row))
    assert isinstance(notice, AccessRevoked)
    assert (notice.reason, notice.organization_id, notice.user_id) == ("role-changed", "o", "u")


def test_broadcast_messages() -> None:
    body = {
        "organizationId": "o",
        "event": "e",
        "payload": {"x": [1, 2]},
        "targetRoles": ["r"],
        "targetUserId": None,
    }
    router = _router()
    (event,) = router.route(LogicalMessage(0x100, 2, "walcast", orjson.dumps(body)))
    assert isinstance(event, BroadcastEvent)
    assert event.target_roles == frozenset({"r"}) and event.target_user is None
    assert orjson.loads(orjson.dumps(event.payload)) == {"x": [1, 2]}
    assert router.route(LogicalMessage(0x100, 3, "other-prefix", b"{}")) == []
    for bad in (b"not json", b"{}", b'{"organizationId": 1, "event": "e"}'):
        assert router.route(LogicalMessage(0x100, 4, "walcast", bad)) == []
    assert router.dropped_bad_broadcast == 3


@given(st.integers(0, 2**64 - 1), st.integers(1, 2**63))
def test_cursors_round_trip_and_sort_as_strings(lsn: int, position: int) -> None:
    text = format_cursor(lsn, position)
    assert parse_cursor(text) == (lsn, position)
    later = format_cursor(lsn, position + 1)
    assert text < later and parse_cursor(later) > (lsn, position)  # type: ignore[operator]


def test_cursor_examples_and_garbage() -> None:
    assert format_cursor(0x16B3748, 3) == "00000000016B3748-0003"
    assert format_cursor(1, 0xFFFF) == "0000000000000001-FFFF0000000000000000"
    for garbage in ("", "x", "00000000016B3748", "00000000016b3748-0003", "1-2", "0" * 100):
        assert parse_cursor(garbage) is None


def test_retention_window_keeps_history_seconds_of_wal() -> None:
    now = [100.0]
    window = RetentionWindow(10.0, start_lsn=50, clock=lambda: now[0])
    assert window.retained() == 50
    for lsn in (60, 70, 80):
        now[0] += 4
        window.record(lsn)
    # At t=112 the position reached 10 s ago (t<=102) is still the start.
    assert window.retained() == 50
    now[0] = 115.0  # t<=105: 60 (recorded at 104)
    assert window.retained() == 60
    now[0] = 200.0
    assert window.retained() == 80
    window.record(70)  # never backwards
    assert window.retained() == 80
