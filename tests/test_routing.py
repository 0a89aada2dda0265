"""Routing rules (walcast.routing), cursors (cdc.cursors) and the retention window, as pure code."""

from __future__ import annotations

import functools
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import walcast.routing
from cdc.changes import LogicalMessage, RowChange, TableColumns, TransactionStart
from cdc.cursors import format_cursor, parse_cursor
from gateway.broadcasts import BroadcastSigner
from gateway.config import RealtimeConfig, parse_realtime_config
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent
from gateway.metrics import Metrics
from walcast.pipeline import SAMPLE_SECONDS, RetentionWindow
from walcast.routing import Router

SECRET = "routing-test-secret-0123456789-abcdefgh"
OLD_SECRET = "routing-test-old-secret-0123456789-abcd"

CONFIG = parse_realtime_config(
    {
        "tables": {
            "applications": {"ownerColumn": "createdBy", "onDelete": False},
            "notes": {"userColumn": "userId"},
        }
    }
)
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _router(
    config: RealtimeConfig = CONFIG, secrets: tuple[str, ...] = (SECRET,), **options: Any
) -> Router:
    router = Router(config, BroadcastSigner(secrets), Metrics(), **options)
    router.route(TransactionStart(xid=1, commit_lsn=0x100, commit_time=WHEN))
    return router


def _metric(router: Router, name: str, **labels: str) -> float:
    value = router._metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


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
    router = _router(parse_realtime_config({"tables": {"t": {}}}))
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
    router = _router(parse_realtime_config({"tables": {"t": {}}}))
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


def test_a_config_naming_the_session_store_still_gets_access_changes_only() -> None:
    """A realtime config that lists `member` or `session` must not turn their rows into
    events: a member row would reach the organization raw, a session row its token."""
    config = parse_realtime_config({"tables": {"member": {}, "session": {}}})
    router = _router(config)
    member = {"organizationId": "o", "userId": "u", "role": "owner"}
    assert router.route(_change("INSERT", "member", new=member)) == []
    (notice,) = router.route(_change("DELETE", "member", old=member))
    assert isinstance(notice, AccessRevoked) and notice.reason == "member-removed"
    session = {"id": "s1", "userId": "u", "token": "secret", "organizationId": "o"}
    assert router.route(_change("INSERT", "session", new=session)) == []
    router.route(TableColumns(0x100, 1, "public", "member", ("x",)))  # withheld, then back
    router.route(TableColumns(0x100, 2, "public", "member", tuple(member)))
    assert router.route(_change("INSERT", "member", new=member)) == []


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
    (event,) = router.route(LogicalMessage(0x100, 2, "walcast", _signed(body)))
    assert isinstance(event, BroadcastEvent)
    assert event.target_roles == frozenset({"r"}) and event.target_user is None
    assert orjson.loads(orjson.dumps(event.payload)) == {"x": [1, 2]}
    assert router.route(LogicalMessage(0x100, 3, "other-prefix", b"{}")) == []
    signer = BroadcastSigner([SECRET])
    for bad in (b"not json", b"{}", b'{"organizationId": 1, "event": "e"}'):
        assert router.route(LogicalMessage(0x100, 4, "walcast", signer.sign(bad))) == []
    assert router.dropped_bad_broadcast == 3
    assert _metric(router, "walcast_forged_messages_total") == 0


def _signed(body: dict[str, Any], secret: str = SECRET) -> bytes:
    return BroadcastSigner([secret]).sign(orjson.dumps(body))


BODY = {"organizationId": "o", "event": "e", "payload": {"n": 1}}


def test_unsigned_and_forged_broadcasts_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    router = _router(clock=lambda: now[0])
    plain = orjson.dumps(BODY)
    signed = _signed(BODY)
    forged = [
        plain,  # what any database role can write
        _signed(BODY, "someone-elses-secret-0123456789-abcdefgh"),
        signed[:-1] + b"}}",  # content changed after signing
        signed.replace(b"v1.", b"v2.", 1),  # a version this node does not know
        signed[:40],  # cut short
        b"v1." + b"A" * 43 + b"." + plain,
        b"",
    ]
    for content in forged:
        assert router.route(LogicalMessage(0x100, 2, "walcast", content)) == []
    assert _metric(router, "walcast_forged_messages_total") == len(forged)
    # One log line per interval, without the content.
    assert len(caplog.records) == 1 and "without a valid signature" in caplog.text
    assert '"payload"' not in caplog.text and "organizationId" not in caplog.text
    now[0] = 61.0
    router.route(LogicalMessage(0x200, 1, "walcast", plain))
    first, second = (record.getMessage() for record in caplog.records)
    assert first.startswith("dropped 1 broadcast message(s) without a valid signature")
    assert second.startswith("dropped 7 broadcast message(s)")  # the six held back, and this
    assert router.dropped_bad_broadcast == 0


def test_rotation_signs_with_the_first_secret_and_accepts_any() -> None:
    router = _router(secrets=(SECRET, OLD_SECRET))
    for secret in (SECRET, OLD_SECRET):
        (event,) = router.route(LogicalMessage(0x100, 2, "walcast", _signed(BODY, secret)))
        assert isinstance(event, BroadcastEvent)
    signer = BroadcastSigner([SECRET, OLD_SECRET])
    assert signer.sign(b"{}") == BroadcastSigner([SECRET]).sign(b"{}")
    assert BroadcastSigner([OLD_SECRET]).verify(signer.sign(b"{}")) is None


def test_signed_broadcasts_still_obey_the_namespace_rules() -> None:
    config = parse_realtime_config(
        {"namespaces": {"screening": {"events": ["started"], "requiredRoles": ["recruiter"]}}}
    )
    router = _router(config)
    for event in ("auth:token-invalidated", "evil:x", "screening:other"):
        body = {**BODY, "event": event}
        assert router.route(LogicalMessage(0x100, 2, "walcast", _signed(body))) == []
    wide = {**BODY, "event": "screening:started", "targetRoles": ["owner"]}
    assert router.route(LogicalMessage(0x100, 3, "walcast", _signed(wide))) == []
    assert router.dropped_bad_broadcast == 4
    assert _metric(router, "walcast_dropped_events_total", reason="refused_broadcast") == 4
    (event,) = router.route(
        LogicalMessage(0x100, 4, "walcast", _signed({**BODY, "event": "screening:started"}))
    )
    assert isinstance(event, BroadcastEvent) and event.target_roles == {"recruiter"}


MASKED = parse_realtime_config(
    {
        "tables": {
            "applications": {
                "userColumn": "assigneeId",
                "masking": {"ssn": {"type": "ssn", "show": {"roles": ["owner"]}}},
            }
        }
    }
)
COLUMNS = ("id", "organizationId", "assigneeId", "ssn")


def test_a_table_missing_a_named_column_is_withheld_until_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = _router(MASKED)
    row = {"id": 1, "organizationId": "o", "assigneeId": "u", "ssn": "123-45-6789"}
    router.route(TableColumns(0x100, 1, "public", "applications", COLUMNS))
    assert len(router.route(_change("INSERT", new=row))) == 1
    assert router.withheld == frozenset()

    renamed = ("id", "organizationId", "assigneeId", "ssn_number")
    router.route(TableColumns(0x200, 1, "public", "applications", renamed))
    raw = {**{k: v for k, v in row.items() if k != "ssn"}, "ssn_number": "123-45-6789"}
    for kind in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
        assert router.route(_change(kind, new=raw, old=raw)) == []
    assert router.withheld == {"public.applications"}
    assert _metric(router, "walcast_withheld_events_total", table="public.applications") == 4
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    message = error.getMessage()
    assert 'column "ssn" (named by masking.ssn)' in message
    assert 'tables."public.applications".masking.ssn' in message
    assert "rename the column back" in message and "ssn_number" in message
    assert "123-45-6789" not in caplog.text

    router.route(TableColumns(0x300, 1, "public", "applications", renamed))  # said once
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
    router.route(TableColumns(0x400, 1, "public", "applications", COLUMNS))
    assert router.withheld == frozenset()
    assert len(router.route(_change("INSERT", new=row))) == 1


@pytest.mark.parametrize(
    ("gone", "key"),
    [("organizationId", "organizationColumn"), ("assigneeId", "userColumn")],
)
def test_a_dropped_routing_column_withholds_the_table(
    gone: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = _router(MASKED)
    left = tuple(column for column in COLUMNS if column != gone)
    router.route(TableColumns(0x100, 1, "public", "applications", left))
    row = {c: "x" for c in COLUMNS if c != gone}
    assert router.route(_change("INSERT", new=row)) == []
    assert f'column "{gone}" (named by {key})' in caplog.text


def test_columns_of_other_tables_change_nothing() -> None:
    router = _router(MASKED)
    router.route(TableColumns(0x100, 1, "public", "other", ("x",)))
    router.route(TableColumns(0x100, 1, "public", "member", ("x",)))
    assert router.withheld == frozenset()


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


def test_retention_window_of_a_busy_stream_stays_small() -> None:
    """A new position every millisecond (a transaction at 1,000/s) for 30 s: the window keeps
    about `seconds / SAMPLE_SECONDS` samples, not one per transaction."""
    now = [0.0]
    window = RetentionWindow(10.0, start_lsn=0, clock=lambda: now[0])
    for step in range(1, 30_001):
        now[0] = step / 1000
        window.record(step)
        window.retained()  # the pipeline asks after every batch
    assert len(window) <= 10.0 / SAMPLE_SECONDS + 2


def test_retention_window_answers_at_most_what_was_reached_then() -> None:
    """Never a position past the one reached `seconds` ago (the slot would forget WAL a resume
    needs), and never one reached more than `SAMPLE_SECONDS` plus the gap between two records
    before that (the pipeline records every batch, and every second when idle)."""
    rng = random.Random(7)
    steps = (0.0001, 0.001, 0.02, 0.3)
    slack = SAMPLE_SECONDS + max(steps)
    now = [0.0]
    window = RetentionWindow(5.0, start_lsn=0, clock=lambda: now[0])
    reached: list[tuple[float, int]] = [(0.0, 0)]
    lsn = 0
    for _ in range(20_000):
        now[0] += rng.choice(steps)
        lsn += rng.randrange(1, 100)
        window.record(lsn)
        reached.append((now[0], lsn))
        answer = window.retained()
        cutoff = now[0] - 5.0
        then = max((at_lsn for at, at_lsn in reached if at <= cutoff), default=0)
        earlier = max((at_lsn for at, at_lsn in reached if at <= cutoff - slack), default=0)
        assert earlier <= answer <= then
        while len(reached) > 2 and reached[1][0] <= cutoff - slack:
            reached.pop(0)


# -- the C route of the common INSERT and DELETE (walcast/_speedups.c) -------------------------

needs_c = pytest.mark.skipif(
    walcast.routing._route_row_change is None, reason="walcast._speedups was not built"
)

ROUTED = parse_realtime_config(
    {
        "tables": {
            "plain": {},
            "owned": {"ownerColumn": "createdBy", "onDelete": False},
            "targeted": {"userColumn": "userId", "onInsert": False},
            "both": {"userColumn": "userId", "ownerColumn": "createdBy"},
            "quiet": {"onInsert": False, "onUpdate": False, "onDelete": False},
        }
    }
)
_TABLES = ("plain", "owned", "targeted", "both", "quiet", "member", "session", "other")
_CELL = st.one_of(st.none(), st.sampled_from(["o1", "o2", "u1", ""]), st.integers(0, 3))


_COLUMNS = ("id", "organizationId", "userId", "createdBy", "role", "token", "expiresAt")


_PEOPLE = st.sampled_from([None, "u1", "u2"])


@st.composite
def _row(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    present = draw(st.lists(st.sampled_from(_COLUMNS), unique=True))
    row = {column: draw(_CELL) for column in present}
    if draw(st.booleans()):  # a row C can route: text routing columns
        row |= {
            "organizationId": draw(st.sampled_from(["o1", "o2"])),
            "userId": draw(_PEOPLE),
            "createdBy": draw(_PEOPLE),
        }
    return row


@st.composite
def _items(draw: st.DrawFn) -> list[Any]:
    items: list[Any] = []
    for position in range(1, draw(st.integers(1, 40)) + 1):
        choice = draw(st.integers(0, 19))
        if choice == 0:
            xid = draw(st.integers(1, 9))
            items.append(TransactionStart(xid=xid, commit_lsn=0x100 * xid, commit_time=WHEN))
        elif choice == 1:  # a table loses a column the config names, or gets it back
            table = draw(st.sampled_from(_TABLES))
            columns = draw(
                st.sampled_from([("id",), ("id", "organizationId", "userId", "createdBy")])
            )
            items.append(TableColumns(0x100, position, "public", table, columns))
        else:
            # An equal kind string that is not the interned one takes the general path.
            kind = draw(
                st.sampled_from(["UPDATE", "INSERT", "DELETE", "TRUNCATE", "".join("INSERT")])
            )
            table = draw(st.sampled_from(("both", "owned", *_TABLES)))  # owners: more often
            new, old = draw(_row()), draw(_row())
            if new is not None and draw(st.booleans()):  # an old row that differs in one column
                column = draw(st.sampled_from(("createdBy", "userId", *_COLUMNS)))
                old = {**new, column: draw(_PEOPLE if column in ("createdBy", "userId") else _CELL)}
            items.append(RowChange(0x200, position, "public", table, kind, new, old, ("b",)))
    return items


_OWNED = {"organizationId": "o1", "userId": "u1", "createdBy": "u1"}


@needs_c
@given(_items())
@example([_change("UPDATE", "owned", new=_OWNED, old={**_OWNED, "createdBy": "u2"})])
@example([_change("UPDATE", "both", new=_OWNED, old={**_OWNED, "userId": "u2"})])
@example([_change("UPDATE", "both", new=_OWNED, old={"id": 1})])
@example([_change("DELETE", "plain", old=_OWNED), _change("INSERT", "both", new=_OWNED)])
@settings(max_examples=150, deadline=None)
def test_the_c_route_gives_what_the_router_gives(items: list[Any]) -> None:
    """Two routers, one routing row changes through `route_change` (C for the common INSERT
    and DELETE), one through `route` only: the same events (of the same types), in order,
    and the same drop counts, whatever the stream."""
    fast, slow = Router(ROUTED, BroadcastSigner((SECRET,)), Metrics()), _router(ROUTED)
    fast.route(TransactionStart(xid=1, commit_lsn=0x100, commit_time=WHEN))
    fast.epoch = slow.epoch = "e1"
    for item in items:
        if type(item) is RowChange:
            got = _outcome(fast.route_change, item)
        else:
            got = _outcome(fast.route, item)
        assert got == _outcome(slow.route, item), item
    assert fast.dropped_null_organization == slow.dropped_null_organization
    assert fast.withheld == slow.withheld


def _outcome(route: Any, item: Any) -> Any:
    try:
        events = route(item)
    except AssertionError as exc:  # a row the reader never gives (an INSERT without its row)
        return ("assert", str(exc))
    return [(type(event), event) for event in events]


@needs_c
def test_the_c_route_takes_the_common_insert_update_and_delete_itself() -> None:
    """What C routes without calling back, and what it hands to `Router.route`."""
    router = _router(ROUTED)
    router.epoch = "e1"
    route_change = router.route_change
    assert isinstance(route_change, functools.partial)
    handed: list[Any] = []
    (bound,) = route_change.args
    fast = functools.partial(route_change.func, (*bound[:-1], handed.append))
    row = {"id": 1, "organizationId": "o1", "userId": "u1", "createdBy": "u2"}
    (event,) = fast(_change("INSERT", "both", new=row))
    assert event == ChangeEvent("o1", (0x100, 1), "e1", WHEN, ROUTED.tables["public.both"],
                                "INSERT", row, None, (), "u1", "u2", 1)  # fmt: skip
    assert type(event) is ChangeEvent and type(event.key) is tuple
    (event,) = fast(_change("DELETE", "plain", old=row))
    assert (event.event_type, event.new, event.old, event.target_user) == (
        "DELETE",
        None,
        row,
        None,
    )
    moved_owner = {**row, "createdBy": "u3"}
    (event,) = fast(_change("UPDATE", "both", new=moved_owner, old=row))
    assert (event.event_type, event.new, event.old, event.owner_id) == (
        "UPDATE",
        moved_owner,
        row,
        None,  # the owner sees raw values only if they own both versions
    )
    (event,) = fast(_change("UPDATE", "both", new=row, old={"id": 1}))  # the key: new stands in
    assert (event.organization_id, event.target_user, event.owner_id) == ("o1", "u1", "u2")
    general = [
        _change("UPDATE", "plain", new=row, old={**row, "organizationId": "o2"}),  # moves
        _change("UPDATE", "both", new=row, old={**row, "userId": "u9"}),  # moves
        _change("UPDATE", "quiet", new=row, old=row),  # onUpdate false
        _change("UPDATE", "plain", new={**row, "organizationId": None}, old=None),
        _change("TRUNCATE", "plain"),
        _change("INSERT", "plain", new={**row, "organizationId": None}),  # counted by Python
        _change("INSERT", "plain", new={**row, "organizationId": 7}),  # str() by Python
        _change("INSERT", "both", new={**row, "userId": 7}),
        _change("INSERT", "targeted", new=row),  # onInsert false
        _change("DELETE", "owned", old=row),  # onDelete false
        _change("INSERT", "member", new=row),
        _change("INSERT", "other", new=row),
        TransactionStart(xid=2, commit_lsn=0x200, commit_time=WHEN),
    ]
    for item in general:
        handed.clear()
        fast(item)
        assert handed == [item]


def test_without_the_extension_every_item_goes_through_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(walcast.routing, "_route_row_change", None)
    router = _router(ROUTED)
    assert router.route_change == router.route
    (event,) = router.route_change(_change("INSERT", "plain", new={"organizationId": "o1"}))
    assert isinstance(event, ChangeEvent) and event.organization_id == "o1"
