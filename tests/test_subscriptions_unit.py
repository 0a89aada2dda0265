"""`gateway.subscriptions` and the pure parts of `gateway.snapshot`, as case tables, plus the
hubs' grouping by (visibility class, subscription) with recording connections.

The integration tests (real PostgreSQL, the gateway, concurrent writers) are in
tests/test_subscriptions.py."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.cursors import format_cursor
from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.events import ChangeEvent
from gateway.policy import PolicyCache
from gateway.snapshot import Visibility, parse_row
from gateway.subscriptions import (
    ALL,
    Subscription,
    SubscriptionError,
    compile_subscription,
    parse_filter,
    parse_subscription,
)
from tests.test_hubs import Recording, _registry

CONFIG = parse_realtime_config(
    {
        "tables": {
            "orders": {
                "requiredRoles": ["a", "b", "c"],
                "ownerColumn": "createdBy",
                "fields": [
                    "id",
                    "organizationId",
                    "amount",
                    "price",
                    "status",
                    "at",
                    "day",
                    "ssn",
                    "email",
                    "createdBy",
                    "paid",
                    "ref",
                    "doc",
                ],
                "masking": {
                    "ssn": {"type": "ssn", "show": {"roles": ["a"]}},
                    "email": {"type": "email", "show": {"roles": ["b"], "or": "owner"}},
                },
            },
            "secrets": {"requiredRoles": ["admin"]},
        }
    }
)
ORDERS = CONFIG.tables["public.orders"]
TYPES = {
    "public.orders": {
        "id": ("integer", "N"),
        "organizationId": ("text", "S"),
        "amount": ("numeric", "N"),
        "price": ("double precision", "N"),
        "status": ("text", "S"),
        "at": ("timestamp with time zone", "D"),
        "day": ("date", "D"),
        "ssn": ("text", "S"),
        "email": ("text", "S"),
        "createdBy": ("text", "S"),
        "paid": ("boolean", "B"),
        "ref": ("uuid", "U"),
        "doc": ("jsonb", "U"),
        "hidden": ("text", "S"),
    }
}
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def subscribe(*filters: str, tables: str | None = None, roles: str = "a") -> Subscription:
    request = parse_subscription(
        [tables] if tables else [],
        list(filters),
        [],
        config=CONFIG,
        roles=frozenset(roles.split(",")),
        policies=PolicyCache(),
    )
    return compile_subscription(request, TYPES)


def refused(
    *filters: str, tables: str | None = None, roles: str = "a", snapshot: str = ""
) -> tuple[int, str]:
    with pytest.raises(SubscriptionError) as caught:
        request = parse_subscription(
            [tables] if tables else [],
            list(filters),
            [snapshot] if snapshot else [],
            config=CONFIG,
            roles=frozenset(roles.split(",")),
            policies=PolicyCache(),
        )
        compile_subscription(request, TYPES)
    return caught.value.status, caught.value.message


# --- parsing ----------------------------------------------------------------------------------

PARSED = [
    ("orders:amount=eq.5", ("public.orders", "amount", "eq", ("5",))),
    ("public.orders:status=neq.open", ("public.orders", "status", "neq", ("open",))),
    ("orders:status=eq.a.b", ("public.orders", "status", "eq", ("a.b",))),  # dots in the value
    ("orders:status=eq.", ("public.orders", "status", "eq", ("",))),  # the empty string
    ("orders:status=eq.x=y", ("public.orders", "status", "eq", ("x=y",))),
    ("orders:amount=in.(1,2,3)", ("public.orders", "amount", "in", ("1", "2", "3"))),
    ('orders:status=in.("a,b",c,"q\\"x")', ("public.orders", "status", "in", ("a,b", "c", 'q"x'))),
    ("orders:status=in.()", ("public.orders", "status", "in", ("",))),
    ("orders:ssn=is.null", ("public.orders", "ssn", "is.null", ())),
    ("orders:ssn=not.is.null", ("public.orders", "ssn", "not.is.null", ())),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_filter(text: str, expected: tuple[Any, ...]) -> None:
    parsed = parse_filter(text)
    assert (parsed.table, parsed.column, parsed.op, parsed.values) == expected


BAD_SYNTAX = [
    ("orders", "expected <table>:<column>=<op>.<value>"),
    ("orders:amount", "expected <table>:<column>=<op>.<value>"),
    (":amount=eq.1", "expected <table>:<column>=<op>.<value>"),
    ("orders:=eq.1", "expected <table>:<column>=<op>.<value>"),
    ("orders:amount=like.1", "unknown operator"),
    ("orders:amount=eq", "unknown operator"),
    ("orders:amount=is.true", "unknown operator"),
    ("orders:amount=in.1,2", "in takes a list"),
    ('orders:amount=in.("1,2)', "unterminated quote"),
    ('orders:amount=in.("1"x)', "expected ','"),
    ('orders:amount=in.(1"2")', "a quote may only start a value"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SYNTAX)
def test_bad_filter_syntax_is_a_precise_400(text: str, message: str) -> None:
    status, detail = refused(text)
    assert status == 400
    assert message in detail
    assert repr(text[:80]) in detail  # names the parameter


CHECKS = [
    # (filters, tables, roles, status, message)
    ((), "nowhere", "a", 400, "table 'public.nowhere' is not configured"),
    ((), "orders,", "a", 400, "comma-separated list"),
    ((), "secrets", "a", 403, "may not see table 'public.secrets'"),
    ((), "orders,secrets", "a", 403, "may not see"),
    (("secrets:id=eq.1",), None, "a", 403, "may not see"),
    (("nowhere:id=eq.1",), None, "a", 400, "not configured"),
    (("orders:amount=eq.1",), "secrets", "admin", 400, "not in tables="),
    (("orders:hidden=eq.1",), None, "a", 400, "not among the table's fields"),
    (("orders:nope=eq.1",), None, "a", 400, "not among the table's fields"),
    (("orders:ssn=eq.1",), None, "b", 403, "'ssn' is masked for your roles"),
    (("orders:ssn=is.null",), None, "b,c", 403, "masked"),  # even a null test probes
    (("orders:email=eq.x",), None, "a", 403, "masked"),  # raw for its owner only: still masked
    (("orders:amount=eq.abc",), None, "a", 400, "'abc' is not a valid numeric"),
    (("orders:id=eq.1.5",), None, "a", 400, "is not a valid integer"),
    (("orders:at=gt.yesterday",), None, "a", 400, "is not a valid timestamptz"),
    (("orders:paid=eq.maybe",), None, "a", 400, "is not a valid boolean"),
    (("orders:ref=eq.xyz",), None, "a", 400, "is not a valid uuid"),
    (("orders:ref=lt.00000000-0000-0000-0000-000000000000",), None, "a", 400, "lt cannot"),
    (("orders:doc=eq.{}",), None, "a", 400, "cannot filter on column 'doc' of type jsonb"),
    (("orders:amount=in.(1,x)",), None, "a", 400, "'x' is not a valid numeric"),
]


@pytest.mark.parametrize(("filters", "tables", "roles", "status", "message"), CHECKS)
def test_checks(
    filters: tuple[str, ...], tables: str | None, roles: str, status: int, message: str
) -> None:
    got_status, detail = refused(*filters, tables=tables, roles=roles)
    assert (got_status, message in detail) == (status, True), detail


def test_unknown_column_of_a_table_without_fields() -> None:
    config = parse_realtime_config({"tables": {"t": {}}})
    request = parse_subscription(
        [], ["t:nope=eq.1"], [], config=config, roles=frozenset(), policies=PolicyCache()
    )
    with pytest.raises(SubscriptionError, match="has no column 'nope'") as caught:
        compile_subscription(request, {"public.t": {"id": ("integer", "N")}})
    assert caught.value.status == 400


def test_repeated_and_bad_flags() -> None:
    assert refused(snapshot="yes")[0] == 400
    with pytest.raises(SubscriptionError, match="once"):
        parse_subscription(
            ["orders", "orders"],
            [],
            [],
            config=CONFIG,
            roles=frozenset("a"),
            policies=PolicyCache(),
        )


def test_no_parameters_is_todays_protocol() -> None:
    request = parse_subscription(
        [], [], [], config=CONFIG, roles=frozenset("a"), policies=PolicyCache()
    )
    assert request.default
    assert compile_subscription(request, {}) is ALL
    # equal filters, in any order and spelling, are one group
    assert subscribe("orders:amount=gt.1.0", "orders:status=eq.x") == subscribe(
        "orders:status=eq.x", "orders:amount=gt.1"
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.text(alphabet='orders:amountstatusidpaidref=.,()"\\-1 05eqnltgiNUL\x00é', max_size=40),
        max_size=3,
    ),
    st.one_of(st.none(), st.text(max_size=30)),
    st.one_of(st.none(), st.text(max_size=8)),
)
def test_fuzz_parser_only_ever_says_400_or_403(
    filters: list[str], tables: str | None, snapshot: str | None
) -> None:
    try:
        request = parse_subscription(
            [tables] if tables is not None else [],
            filters,
            [snapshot] if snapshot is not None else [],
            config=CONFIG,
            roles=frozenset({"a"}),
            policies=PolicyCache(),
        )
        subscription = compile_subscription(request, TYPES)
    except SubscriptionError as exc:
        assert exc.status in (400, 403)
        assert exc.message
        return
    hash(subscription)
    row = {"amount": RawJson("5"), "status": "x", "id": 1, "paid": True, "at": None}
    subscription.matches(ORDERS, row)  # evaluating never raises either


# --- evaluation ------------------------------------------------------------------------------

ROW = {
    "id": 7,
    "amount": RawJson("10.50"),
    "price": RawJson("0.1"),
    "status": "Open",
    "at": "2026-01-01T10:00:00+00:00",
    "day": "2026-01-01",
    "paid": False,
    "ref": "6f1c2c8e-0000-4000-8000-000000000001",
    "ssn": None,
}

EVALUATED = [
    ("orders:amount=eq.10.5", True),  # numbers as numbers, not as text
    ("orders:amount=eq.10.50000", True),
    ("orders:amount=gt.9", True),  # as text "10.50" < "9"
    ("orders:amount=lt.1e2", True),
    ("orders:amount=gte.10.51", False),
    ("orders:amount=lte.NaN", True),  # NaN sorts above every number
    ("orders:price=eq.0.1", True),
    ("orders:id=in.(1,7,9)", True),
    ("orders:id=in.(1,9)", False),
    ("orders:id=neq.7", False),
    ("orders:status=eq.open", False),  # text: exact
    ("orders:status=lt.a", True),  # code point order: 'O' < 'a'
    ("orders:at=eq.2026-01-01T12:00:00+02:00", True),  # instants, not texts
    ("orders:at=lt.2026-01-01T10:00:01Z", True),
    ("orders:at=gt.2026-01-01 09:59:59", True),  # no offset: UTC
    ("orders:at=lt.infinity", True),
    ("orders:at=gt.-infinity", True),
    ("orders:day=eq.2026-01-01", True),
    ("orders:day=lt.2026-01-01T10:00:00", False),
    ("orders:paid=eq.f", True),
    ("orders:paid=eq.TRUE", False),
    ("orders:ref=eq.6F1C2C8E000040008000000000000001", True),  # uuid, any spelling
    ("orders:ssn=is.null", True),
    ("orders:ssn=not.is.null", False),
    ("orders:ssn=eq.x", False),  # NULL = 'x' is not true
    ("orders:createdBy=eq.x", False),  # absent from the row: unknown, so no match
]


@pytest.mark.parametrize(("text", "matches"), EVALUATED)
def test_values_compare_as_postgresql_does(text: str, matches: bool) -> None:
    assert subscribe(text).matches(ORDERS, ROW) is matches


def test_filters_on_one_table_are_anded() -> None:
    both = subscribe("orders:amount=gt.9", "orders:status=eq.Open")
    assert both.matches(ORDERS, ROW)
    assert not subscribe("orders:amount=gt.9", "orders:status=eq.x").matches(ORDERS, ROW)


def _event(kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent("o", (0x20, 1), "", WHEN, ORDERS, kind, new, old, (), None, None, 42)


VIEWS = [
    # (event type, old amount, new amount, delivered as)
    ("UPDATE", 60, 70, "UPDATE"),
    ("UPDATE", 10, 70, "INSERT"),  # enters the filter
    ("UPDATE", 60, 10, "DELETE"),  # leaves it
    ("UPDATE", 10, 20, None),
    ("UPDATE", None, 70, "INSERT"),  # NULL never matches gt
    ("INSERT", None, 70, "INSERT"),
    ("INSERT", None, 10, None),
    ("DELETE", 60, None, "DELETE"),
    ("DELETE", 10, None, None),
]


@pytest.mark.parametrize(("kind", "old", "new", "delivered"), VIEWS)
def test_rows_entering_and_leaving_a_filter(
    kind: str, old: int | None, new: int | None, delivered: str | None
) -> None:
    old_row = None if kind == "INSERT" else {"id": 1, "amount": old}
    new_row = None if kind == "DELETE" else {"id": 1, "amount": new}
    view = subscribe("orders:amount=gt.50").view(_event(kind, new_row, old_row))
    if delivered is None:
        assert view is None
        return
    assert view is not None and view.event_type == delivered
    if delivered == "INSERT":
        assert (view.new, view.old) == (new_row, None)
    if delivered == "DELETE":
        assert (view.new, view.old) == (None, old_row)
    assert view.xid == 42


def test_tables_restrict_changes_only() -> None:
    only = subscribe(tables="secrets", roles="admin")
    assert only.view(_event("INSERT", {"id": 1}, None)) is None
    assert ALL.view(_event("INSERT", {"id": 1}, None)) is not None


# --- snapshot visibility -----------------------------------------------------------------------

EPOCH = 3 << 32


@pytest.mark.parametrize(
    ("xmin", "xmax", "xip", "xid", "reflected"),
    [
        (100, 110, (), 99, True),  # committed before the snapshot
        (100, 110, (), 105, True),
        (100, 110, (105,), 105, False),  # in progress when it was taken
        (100, 110, (), 110, False),  # started after it
        (100, 110, (), 5000, False),
        (EPOCH + 10, EPOCH + 20, (), 15, True),  # 32-bit xids of a later epoch
        (EPOCH + 10, EPOCH + 20, (EPOCH + 15,), 15, False),
        (EPOCH + 10, EPOCH + 20, (), 25, False),
        (EPOCH - 10, EPOCH - 5, (), 2, False),  # wrapped past the snapshot's xmax
        (EPOCH - 10, EPOCH - 5, (), (1 << 32) - 7, True),
        (100, 110, (), 0, False),  # unknown xid: delivered rather than dropped
    ],
)
def test_snapshot_visibility(
    xmin: int, xmax: int, xip: tuple[int, ...], xid: int, reflected: bool
) -> None:
    visibility = Visibility(xmin, xmax, frozenset(xip))
    event = _event("INSERT", {"id": 1}, None)

    assert visibility.reflects(event._replace(xid=xid)) is reflected


def test_snapshot_rows_keep_postgresql_numbers() -> None:
    row = parse_row('{"a": 1.50, "b": 12345678901234567890123, "c": 7, "d": "x", "e": {"f": 2.0}}')
    assert row["a"] == RawJson("1.50") and type(row["a"]) is RawJson
    assert type(row["b"]) is RawJson and row["c"] == 7
    assert row["e"] == {"f": RawJson("2.0")}
    assert Decimal(row["a"]) == Decimal("1.5")


# --- hubs: one frame per (class, shape), never per socket ----------------------------------------

GROUPED = parse_realtime_config(
    {
        "tables": {
            "orders": {
                "masking": {
                    "ssn": {"type": "ssn", "show": {"roles": ["a"]}},
                    "email": {"type": "email", "show": {"roles": ["b"]}},
                }
            }
        }
    }
)


def _order_update(old: int, new: int) -> ChangeEvent:
    table = GROUPED.tables["public.orders"]
    row = {"id": 1, "organizationId": "o", "ssn": "123-45-6789", "email": "p@example.com"}
    return ChangeEvent(
        "o",
        (0x20, 1),
        "",
        WHEN,
        table,
        "UPDATE",
        {**row, "amount": new},
        {**row, "amount": old},
        (),
        None,
        None,
        9,
    )


@pytest.mark.parametrize("filtered", [True, False])
async def test_serializations_per_event_with_1000_sockets(filtered: bool) -> None:
    registry = _registry()
    classes = ["a", "b", "c"]  # three visibility classes: ssn raw, email raw, neither
    thresholds = list(range(0, 100, 10))  # ten filters
    subscriptions = [
        compile_subscription(
            parse_subscription(
                [],
                [f"orders:amount=gt.{t}"],
                [],
                config=GROUPED,
                roles=frozenset(),
                policies=PolicyCache(),
            ),
            {"public.orders": {"amount": ("integer", "N")}},
        )
        for t in thresholds
    ]
    sockets = []
    for index in range(1000):
        rec = Recording(f"u{index}", {classes[index % 3]}, writes=registry.writes)
        if filtered:
            rec.conn.subscription = subscriptions[(index // 3) % 10]
        await registry.attach(rec.conn, None)
        sockets.append((index, rec))
    registry.writes.flush_now()
    before = registry.metrics.serializations.value
    registry.publish(_order_update(35, 65))  # in gt.0-30 before and after, enters gt.40-60
    per_event = registry.metrics.serializations.value - before
    if filtered:
        assert per_event <= 30
        assert per_event == 6  # UPDATE and INSERT, for each of three classes
    else:
        assert per_event == 3
    for index, rec in sockets:
        received = [m for m in rec.messages if m["type"] == "postgres_changes"]
        threshold = thresholds[(index // 3) % 10] if filtered else -1
        expected = "UPDATE" if threshold < 35 else "INSERT" if threshold < 65 else None
        assert [m["eventType"] for m in received] == ([expected] if expected else [])
        if received:
            ssn = received[0]["new"]["ssn"]
            assert (ssn == "123-45-6789") is (index % 3 == 0)


async def test_replay_is_filtered_the_same_way() -> None:
    registry = _registry()
    registry.history.append(_order_update(35, 65))
    registry.history.advance((0x30, 0))
    rec = Recording("u", {"a"}, writes=registry.writes)
    rec.conn.subscription = subscriptions_gt(50)
    await registry.attach(rec.conn, format_cursor(0x10, 0))
    kinds = [m.get("eventType", m.get("event")) for m in rec.messages]
    assert kinds == ["INSERT", "ready"]


def subscriptions_gt(threshold: int) -> Subscription:
    request = parse_subscription(
        [],
        [f"orders:amount=gt.{threshold}"],
        [],
        config=GROUPED,
        roles=frozenset(),
        policies=PolicyCache(),
    )
    return compile_subscription(request, {"public.orders": {"amount": ("integer", "N")}})


async def test_a_held_socket_gets_what_its_snapshot_does_not_reflect() -> None:
    registry = _registry()
    hub = registry.hub("o")
    rec = Recording("u", {"a"}, writes=registry.writes)
    hub.hold_at_ready.add(rec.conn)
    await registry.attach(rec.conn, None)
    assert rec.conn in hub.held
    seen = _order_update(1, 2)._replace(xid=100)
    unseen = _order_update(2, 3)._replace(xid=200, key=(0x21, 1))
    registry.publish(seen)
    registry.publish(unseen)
    assert [m["event"] for m in rec.messages] == ["ready"]  # held: nothing yet
    hub.release(rec.conn, Visibility(150, 150, frozenset()).reflects)
    registry.publish(_order_update(3, 4)._replace(xid=300, key=(0x22, 1)))
    news = [m["new"]["amount"] for m in rec.messages if m["type"] == "postgres_changes"]
    assert news == [3, 4]
    assert rec.conn not in hub.held
