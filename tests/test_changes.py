"""cdc.changes: messages → items, TOAST merge, and values equal to PostgreSQL's to_jsonb.

The unit tests push hand-built `cdc.messages` dataclasses through `ChangeBuilder`. The oracle
test loads real column text from PostgreSQL exactly as pgoutput would send it and compares the
rendered rows with `to_jsonb(row)` from the same server, digit for digit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.adapt import Buffer, Loader

import cdc.rows
from cdc.changes import (
    ChangeBuilder,
    LogicalMessage,
    RowChange,
    TableColumns,
    TransactionEnd,
    TransactionStart,
    TypeDescription,
)
from cdc.errors import ProtocolError
from cdc.messages import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    Toast,
    Truncate,
    Type,
    UnknownMessage,
    Update,
)
from cdc.render import RawJson, dumps
from tests.pg import OPTIONAL_TYPES, PostgresServer

U = Toast.UNCHANGED
T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
T1 = datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)

INT4, TEXT, NUMERIC, INT8 = 23, 25, 1700, 20

ACCOUNTS = Relation(
    oid=16400,
    namespace="public",
    name="accounts",
    replica_identity="f",
    columns=(
        Column("id", INT4, -1, True),
        Column("name", TEXT, -1, False),
        Column("body", TEXT, -1, False),
        Column("price", NUMERIC, -1, False),
    ),
)
ORDERS = Relation(
    oid=16500,
    namespace="shop",
    name="orders",
    replica_identity="d",
    columns=(Column("order_id", INT8, -1, True), Column("note", TEXT, -1, False)),
)


def begin(lsn: int = 0x16B3748, xid: int = 700) -> Begin:
    return Begin(final_lsn=lsn, commit_time=T0, xid=xid)


def commit(lsn: int = 0x16B3748, end: int = 0x16B3780) -> Commit:
    return Commit(flags=0, commit_lsn=lsn, end_lsn=end, commit_time=T0)


def feed_all(builder: ChangeBuilder, *messages: Any) -> list[Any]:
    items: list[Any] = []
    for message in messages:
        items.extend(builder.feed(message))
    return items


def rows_of(items: list[Any]) -> list[RowChange]:
    return [item for item in items if isinstance(item, RowChange)]


try:
    from cdc._speedups import load_row as load_row_c
    from cdc._speedups import load_values as load_values_c
except ImportError:  # no compiler where this checkout was installed
    load_row_c = load_values_c = None  # type: ignore[assignment]

ROW_LOOPS = {
    "python": (cdc.rows.load_row_py, cdc.rows.load_values_py),
    "c": (load_row_c, load_values_c),
}


@pytest.fixture(autouse=True, params=list(ROW_LOOPS))
def row_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test here (the to_jsonb oracle too) runs with the row loop in Python and in C."""
    load_row, load_values = ROW_LOOPS[request.param]
    if load_row is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    monkeypatch.setattr(cdc.rows, "load_row", load_row)
    monkeypatch.setattr(cdc.rows, "load_values", load_values)
    yield request.param


@pytest.fixture
def builder() -> ChangeBuilder:
    return ChangeBuilder()


def test_the_c_row_loop_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the Python loop is what runs")
    assert load_row_c is not None, "cdc._speedups missing: run pip install -e . again"


# --- transactions and positions ------------------------------------------------------------


def test_insert_transaction(builder: ChangeBuilder) -> None:
    items = feed_all(
        builder,
        begin(),
        ACCOUNTS,
        Insert(ACCOUNTS, (b"1", b"alice", None, b"10.50")),
        Insert(ACCOUNTS, (b"2", b"bob", b"hi", b"NaN")),
        commit(),
    )
    assert items == [
        TransactionStart(xid=700, commit_lsn=0x16B3748, commit_time=T0),
        TableColumns(0x16B3748, 0, "public", "accounts", ("id", "name", "body", "price")),
        RowChange(
            0x16B3748,
            1,
            "public",
            "accounts",
            "INSERT",
            {"id": 1, "name": "alice", "body": None, "price": RawJson("10.50")},
            None,
            (),
        ),
        RowChange(
            0x16B3748,
            2,
            "public",
            "accounts",
            "INSERT",
            {"id": 2, "name": "bob", "body": "hi", "price": "NaN"},
            None,
            (),
        ),
        TransactionEnd(commit_lsn=0x16B3748, end_lsn=0x16B3780, commit_time=T0),
    ]
    price = items[2].new["price"]
    assert type(price) is RawJson
    assert type(items[3].new["price"]) is str  # NaN is a JSON string, as in to_jsonb
    assert dumps(items[2].new) == b'{"id":1,"name":"alice","body":null,"price":10.50}'


def test_relation_yields_the_table_columns(builder: ChangeBuilder) -> None:
    assert builder.feed(ACCOUNTS) == [
        TableColumns(0, 0, "public", "accounts", ("id", "name", "body", "price"))
    ]
    (_, _, columns) = feed_all(builder, begin(0x200), Insert(ORDERS, (b"1", b"x")), ORDERS)
    assert columns == TableColumns(0x200, 1, "shop", "orders", ("order_id", "note"))


def test_positions_restart_with_each_transaction(builder: ChangeBuilder) -> None:
    first = feed_all(
        builder, begin(0x100), Insert(ACCOUNTS, (b"1", None, None, None)), commit(0x100, 0x110)
    )
    second = feed_all(
        builder,
        begin(0x200, 701),
        Insert(ACCOUNTS, (b"2", None, None, None)),
        Insert(ACCOUNTS, (b"3", None, None, None)),
        commit(0x200, 0x210),
    )
    assert [(r.commit_lsn, r.position) for r in rows_of(first)] == [(0x100, 1)]
    assert [(r.commit_lsn, r.position) for r in rows_of(second)] == [(0x200, 1), (0x200, 2)]
    assert second[0] == TransactionStart(701, 0x200, T0)
    assert second[-1] == TransactionEnd(0x200, 0x210, T0)


def test_row_before_its_relation_message_binds_lazily(builder: ChangeBuilder) -> None:
    items = feed_all(builder, begin(), Insert(ORDERS, (b"9007199254740993", b"n")), commit())
    assert rows_of(items)[0].new == {"order_id": 9007199254740993, "note": "n"}
    assert rows_of(items)[0].schema == "shop"


def test_relation_change_rebinds(builder: ChangeBuilder) -> None:
    feed_all(builder, begin(), ORDERS, Insert(ORDERS, (b"1", b"x")), commit())
    altered = Relation(
        oid=ORDERS.oid,
        namespace="shop",
        name="orders",
        replica_identity="d",
        columns=(*ORDERS.columns, Column("total", NUMERIC, -1, False)),
    )
    items = feed_all(builder, begin(), altered, Insert(altered, (b"2", b"y", b"3.10")), commit())
    assert rows_of(items)[0].new == {"order_id": 2, "note": "y", "total": RawJson("3.10")}


# --- update / delete / TOAST ---------------------------------------------------------------


def update_items(builder: ChangeBuilder, message: Update) -> RowChange:
    items = feed_all(builder, begin(), ACCOUNTS, message, commit())
    [row] = rows_of(items)
    assert row.kind == "UPDATE"
    assert row.position == 1
    return row


def test_update_without_old_tuple(builder: ChangeBuilder) -> None:
    row = update_items(
        builder, Update(ACCOUNTS, (b"1", b"alice", b"x", b"1.0"), None, old_is_key=False)
    )
    assert row.new == {"id": 1, "name": "alice", "body": "x", "price": RawJson("1.0")}
    assert row.old is None
    assert row.unchanged == ()


def test_update_with_full_old_tuple(builder: ChangeBuilder) -> None:
    row = update_items(
        builder,
        Update(
            ACCOUNTS,
            (b"1", b"alice", b"new", b"2"),
            (b"1", b"al", b"old", None),
            old_is_key=False,
        ),
    )
    assert row.new == {"id": 1, "name": "alice", "body": "new", "price": RawJson("2")}
    assert row.old == {"id": 1, "name": "al", "body": "old", "price": None}


def test_update_unchanged_toast_taken_from_full_old_tuple(builder: ChangeBuilder) -> None:
    row = update_items(
        builder,
        Update(
            ACCOUNTS,
            (b"1", b"alice", U, b"2"),
            (b"1", b"al", b"a long body", b"1"),
            old_is_key=False,
        ),
    )
    assert row.new == {"id": 1, "name": "alice", "body": "a long body", "price": RawJson("2")}
    assert list(row.new) == ["id", "name", "body", "price"]  # column order kept
    assert row.old == {"id": 1, "name": "al", "body": "a long body", "price": RawJson("1")}
    assert row.unchanged == ()


def test_update_unchanged_toast_without_old_tuple(builder: ChangeBuilder) -> None:
    row = update_items(builder, Update(ACCOUNTS, (b"1", U, U, b"2"), None, old_is_key=False))
    assert row.new == {"id": 1, "price": RawJson("2")}
    assert row.old is None
    assert row.unchanged == ("name", "body")


def test_update_unchanged_toast_with_key_only_old_tuple(builder: ChangeBuilder) -> None:
    # A 'K' tuple carries the key columns; the others are sent as NULL placeholders and are
    # not values: an unchanged cell can't be filled from them.
    row = update_items(
        builder, Update(ACCOUNTS, (b"2", b"alice", U, b"2"), (b"1", None, None, None), True)
    )
    assert row.new == {"id": 2, "name": "alice", "price": RawJson("2")}
    assert row.old == {"id": 1}
    assert row.unchanged == ("body",)


def test_update_unchanged_in_old_tuple_too(builder: ChangeBuilder) -> None:
    row = update_items(
        builder, Update(ACCOUNTS, (b"1", b"a", U, b"2"), (b"1", b"a", U, b"2"), False)
    )
    assert row.new == {"id": 1, "name": "a", "price": RawJson("2")}
    assert row.old == {"id": 1, "name": "a", "price": RawJson("2")}
    assert row.unchanged == ("body",)


def test_delete_with_key_tuple(builder: ChangeBuilder) -> None:
    items = feed_all(
        builder, begin(), Delete(ACCOUNTS, (b"7", None, None, None), old_is_key=True), commit()
    )
    [row] = rows_of(items)
    assert (row.kind, row.new, row.old, row.unchanged) == ("DELETE", None, {"id": 7}, ())


def test_delete_with_full_old_tuple(builder: ChangeBuilder) -> None:
    items = feed_all(
        builder,
        begin(),
        Delete(ACCOUNTS, (b"7", b"zed", None, b"-0.5"), old_is_key=False),
        commit(),
    )
    [row] = rows_of(items)
    assert row.kind == "DELETE"
    assert row.new is None
    assert row.old == {"id": 7, "name": "zed", "body": None, "price": RawJson("-0.5")}


def test_truncate_of_two_relations(builder: ChangeBuilder) -> None:
    items = feed_all(
        builder,
        begin(),
        Insert(ACCOUNTS, (b"1", None, None, None)),
        Truncate((ACCOUNTS, ORDERS), cascade=True, restart_identity=False),
        commit(),
    )
    rows = rows_of(items)
    assert [(r.position, r.schema, r.table, r.kind) for r in rows] == [
        (1, "public", "accounts", "INSERT"),
        (2, "public", "accounts", "TRUNCATE"),
        (3, "shop", "orders", "TRUNCATE"),
    ]
    assert all(r.new is None and r.old is None and r.unchanged == () for r in rows[1:])


# --- messages and ignored kinds ------------------------------------------------------------


def test_transactional_message_gets_a_position(builder: ChangeBuilder) -> None:
    items = feed_all(
        builder,
        begin(),
        Insert(ACCOUNTS, (b"1", None, None, None)),
        Message(True, 0x16B3700, "walcast", b'{"event":"x"}'),
        Message(False, 0x16B3710, "walcast", b"not in the transaction"),
        Insert(ACCOUNTS, (b"2", None, None, None)),
        commit(),
    )
    assert items[2] == LogicalMessage(0x16B3748, 2, "walcast", b'{"event":"x"}')
    assert [r.position for r in rows_of(items)] == [1, 3]
    assert len(items) == 5


def test_non_transactional_message_outside_a_transaction(builder: ChangeBuilder) -> None:
    assert builder.feed(Message(False, 0x10, "walcast", b"{}")) == []


@pytest.mark.parametrize(
    "message",
    [
        Type(oid=16600, namespace="public", name="mood"),
        Origin(commit_lsn=0x10, name="upstream"),
        UnknownMessage(kind=ord("Z"), data=b"\x00\x01"),
    ],
)
def test_ignored_kinds(builder: ChangeBuilder, message: Any) -> None:
    assert builder.feed(begin()) != []
    assert builder.feed(message) == []
    items = feed_all(builder, Insert(ACCOUNTS, (b"1", None, None, None)), commit())
    assert rows_of(items)[0].position == 1  # ignored kinds take no position


# --- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Insert(ACCOUNTS, (b"1", None, None, None)),
        Update(ACCOUNTS, (b"1", None, None, None), None, False),
        Delete(ACCOUNTS, (b"1", None, None, None), True),
        Truncate((ACCOUNTS,), False, False),
        Message(True, 1, "walcast", b""),
    ],
)
def test_change_outside_a_transaction(builder: ChangeBuilder, message: Any) -> None:
    with pytest.raises(ProtocolError, match="outside a transaction"):
        builder.feed(message)


def test_tuple_width_mismatch(builder: ChangeBuilder) -> None:
    builder.feed(begin())
    with pytest.raises(ProtocolError, match="tuple of 2 columns"):
        builder.feed(Insert(ACCOUNTS, (b"1", b"x")))


def test_unloadable_value_names_no_value(builder: ChangeBuilder) -> None:
    builder.feed(begin())
    with pytest.raises(ProtocolError, match=r"public\.accounts") as raised:
        builder.feed(Insert(ACCOUNTS, (b"secret-value", None, None, None)))
    assert "secret" not in str(raised.value)
    # The builder stays usable.
    items = feed_all(builder, Insert(ACCOUNTS, (b"1", None, None, None)), commit())
    assert rows_of(items)[0].new == {"id": 1, "name": None, "body": None, "price": None}


# --- types ---------------------------------------------------------------------------------

MOOD = TypeDescription(16600, "public", "mood", "e", array_oid=16599)
MOOD_ARRAY = TypeDescription(16599, "public", "_mood", "b", element_oid=16600)
POSINT = TypeDescription(16610, "public", "posint", "d", base_oid=INT4, array_oid=16609)
ITEM = TypeDescription(
    16620,
    "public",
    "item",
    "c",
    array_oid=16619,
    fields=(("n", NUMERIC), ("m", 16600), ("p", 16610)),
)
ITEM_DOMAIN = TypeDescription(16630, "public", "item_d", "d", base_oid=16620)


def relation_of(*oids: int) -> Relation:
    return Relation(
        oid=17000,
        namespace="public",
        name="typed",
        replica_identity="f",
        columns=tuple(Column(f"c{i}", oid, -1, False) for i, oid in enumerate(oids)),
    )


def test_missing_types_walks_dependencies(builder: ChangeBuilder) -> None:
    rel = relation_of(INT4, TEXT, 16599, 16630)
    assert builder.missing_types(rel) == [16599, 16630]
    builder.register_types([MOOD_ARRAY, ITEM_DOMAIN])
    assert builder.missing_types(rel) == [16600, 16620]
    builder.register_types([MOOD, ITEM])
    assert builder.missing_types(rel) == [16610]
    builder.register_types([POSINT])
    assert builder.missing_types(rel) == []


def test_array_known_through_its_element(builder: ChangeBuilder) -> None:
    builder.register_types([MOOD])
    assert builder.missing_types(relation_of(16599)) == []


def test_user_types_load(builder: ChangeBuilder) -> None:
    builder.register_types([ITEM_DOMAIN, ITEM, POSINT, MOOD])  # any order
    rel = relation_of(16600, 16599, 16610, 16609, 16620, 16619, 16630)
    items = feed_all(
        builder,
        begin(),
        rel,
        Insert(
            rel,
            (
                b"happy",
                b'{happy,NULL,"sad"}',
                b"5",
                b"{1,NULL}",
                b"(1.50,ok,3)",
                b'{"(2,sad,)",NULL}',
                b"(,,)",
            ),
        ),
        commit(),
    )
    new = rows_of(items)[0].new
    assert new == {
        "c0": "happy",
        "c1": ["happy", None, "sad"],
        "c2": 5,
        "c3": [1, None],
        "c4": {"n": RawJson("1.50"), "m": "ok", "p": 3},
        "c5": [{"n": RawJson("2"), "m": "sad", "p": None}, None],
        "c6": {"n": None, "m": None, "p": None},
    }


def test_unknown_user_types_load_as_text(builder: ChangeBuilder) -> None:
    rel = relation_of(99999, 99998)
    items = feed_all(builder, begin(), Insert(rel, (b"whatever", b"{1,2}")), commit())
    assert rows_of(items)[0].new == {"c0": "whatever", "c1": "{1,2}"}


def test_types_registered_after_binding_apply_to_later_rows(builder: ChangeBuilder) -> None:
    rel = relation_of(16609)
    feed_all(builder, begin(), rel, commit())
    builder.register_types([POSINT])
    items = feed_all(builder, begin(), Insert(rel, (b"{1,2}",)), commit())
    assert rows_of(items)[0].new == {"c0": [1, 2]}


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (1184, b"2026-01-01 10:00:00+00", "2026-01-01T10:00:00+00:00"),
        (1184, b"2026-01-01 10:00:00.5+05:30", "2026-01-01T10:00:00.5+05:30"),
        (1184, b"2026-01-01 10:00:00-07", "2026-01-01T10:00:00-07:00"),
        (1184, b"1850-01-01 10:00:00+00:09:21", "1850-01-01T10:00:00+00:09:21"),
        (1184, b"0044-03-15 10:00:00+00 BC", "0044-03-15T10:00:00+00:00 BC"),
        (1184, b"0044-03-15 10:00:00-03 BC", "0044-03-15T10:00:00-03:00 BC"),
        (1184, b"infinity", "infinity"),
        (1184, b"-infinity", "-infinity"),
        (1114, b"2026-01-01 10:00:00.123456", "2026-01-01T10:00:00.123456"),
        (1114, b"2026-01-01 10:00:00 BC", "2026-01-01T10:00:00 BC"),
        (1114, b"-infinity", "-infinity"),
        (1082, b"0044-03-15 BC", "0044-03-15 BC"),
        (700, b"-0", RawJson("0")),
        (701, b"1e+100", RawJson("1" + "0" * 100)),
        (701, b"-1.5e-07", RawJson("-0.00000015")),
        (701, b"-Infinity", "-Infinity"),
        (1700, b"-Infinity", "-Infinity"),
        (1700, b"0.000", RawJson("0.000")),
        (26, b"4294967295", "4294967295"),
        (114, b' {"a" : 1} ', RawJson(' {"a" : 1} ')),
    ],
)
def test_builtin_loaders(builder: ChangeBuilder, oid: int, text: bytes, expected: Any) -> None:
    rel = relation_of(oid)
    items = feed_all(builder, begin(), Insert(rel, (text,)), commit())
    value = rows_of(items)[0].new["c0"]  # type: ignore[index]
    assert value == expected
    assert type(value) is type(expected)


# --- the row loop: C against Python ---------------------------------------------------------

#: (type OID, the code its loader gets): the C loop makes these values itself.
CODED = [
    (21, cdc.rows.INT),
    (INT4, cdc.rows.INT),
    (INT8, cdc.rows.INT),
    (TEXT, cdc.rows.TEXT),
    (1043, cdc.rows.TEXT),  # varchar
    (2950, cdc.rows.TEXT),  # uuid: its text
    (16, cdc.rows.BOOL),
    (NUMERIC, cdc.rows.NUMERIC),
    (114, cdc.rows.JSON),
    (3802, cdc.rows.JSON),
    (1114, cdc.rows.TIMESTAMP),
    (1184, cdc.rows.TIMESTAMPTZ),
    (701, cdc.rows.CALL),  # float8: always its loader
    (1007, cdc.rows.CALL),  # int4[]
]


def bound_of(builder: ChangeBuilder, relation: Relation) -> Any:
    builder.feed(relation)
    return builder._bound[relation.oid]


def test_common_types_take_the_c_shortcut(builder: ChangeBuilder) -> None:
    rel = relation_of(*(oid for oid, _ in CODED))
    codes = bound_of(builder, rel).load_values.args[0]
    assert list(codes) == [code for _, code in CODED]


GARBAGE = st.one_of(
    st.binary(max_size=12),
    st.text("0123456789-+. :tfTeE\u00e9", max_size=24).map(str.encode),
    st.sampled_from([b"", b"-", b"-0", b"1234567890123456789", b"-9223372036854775808"]),
    st.sampled_from([b"true", b"NaN", b"-Infinity", b"1e+100", b"infinity", b"\xff\xfe+00"]),
)
STAMP = st.builds(
    lambda when, zone, era: (when.isoformat(sep=" ") + zone + era).encode(),
    st.datetimes(),
    st.sampled_from(["", "+00", "+05:30", "-07", "+00:09:21"]),
    st.sampled_from(["", "", " BC"]),
)
#: Text each type's column would plausibly carry, by code.
PLAUSIBLE = {
    cdc.rows.INT: st.integers(-(2**63), 2**63 - 1).map(lambda n: str(n).encode()),
    cdc.rows.TEXT: st.text().map(str.encode),
    cdc.rows.BOOL: st.sampled_from([b"t", b"f", b"T", b""]),
    cdc.rows.NUMERIC: st.decimals().map(lambda d: str(d).encode()),
    cdc.rows.JSON: st.text().map(lambda t: json.dumps(t, ensure_ascii=False).encode()),
    cdc.rows.TIMESTAMP: STAMP,
    cdc.rows.TIMESTAMPTZ: STAMP,
    cdc.rows.CALL: st.sampled_from([b"1.5", b"-0", b"{1,2,NULL}", b"NaN"]),
}
CELLS = st.tuples(
    *(
        st.one_of(PLAUSIBLE[code], PLAUSIBLE[code], GARBAGE, st.none(), st.just(U))
        for _, code in CODED
    )
)


def outcome(load: Callable[..., Any], *args: Any) -> object:
    """A result in a form where `RawJson("1")`, `"1"` and `1` all differ, or the error type."""
    try:
        result = load(*args)
    except Exception as exc:
        return ("raised", type(exc).__name__)
    items = result.items() if isinstance(result, dict) else enumerate(result)
    return [(key, type(value), value) for key, value in items]


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(CELLS)
def test_fuzz_c_and_python_row_loops_agree(cells: tuple[Any, ...]) -> None:
    if load_row_c is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    bound = bound_of(ChangeBuilder(), relation_of(*(oid for oid, _ in CODED)))
    plan = bound.load_row.args
    assert outcome(load_row_c, *plan, cells) == outcome(cdc.rows.load_row_py, *plan, cells)
    plan = bound.load_values.args
    assert outcome(load_values_c, *plan, cells) == outcome(cdc.rows.load_values_py, *plan, cells)
    for i, cell in enumerate(cells):  # one column at a time: a failing one hides no other
        single = (plan[0][i : i + 1], plan[1][i : i + 1], *plan[2:])
        assert outcome(load_values_c, *single, [cell]) == outcome(
            cdc.rows.load_values_py, *single, [cell]
        )


# --- the oracle: to_jsonb on a real server -------------------------------------------------

SESSION = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
)

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE item AS (x int, label text, at timestamptz, tags text[], price numeric, m mood);
CREATE TYPE single AS (v int);
CREATE TYPE wrapper AS (inner_item item, moods mood[], n posint, d date);
CREATE DOMAIN item_d AS item;
CREATE DOMAIN tags_d AS text[];
"""

# (column, type, SQL literals); row i takes literal i, or NULL once a column runs out.
MATRIX: list[tuple[str, str, list[str]]] = [
    ("i2", "smallint", ["-32768", "0", "32767"]),
    ("i4", "integer", ["-2147483648", "42"]),
    ("i8", "bigint", ["9007199254740993", "-9223372036854775808", "9223372036854775807"]),
    (
        "num",
        "numeric",
        [
            "123456789012345678901234567890.123456789012345678901",
            "1.50",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "0.000",
            "-0.5",
            "1e-20",
            "1e30",
        ],
    ),
    ("num_s", "numeric(10,3)", ["1.5", "-0"]),
    (
        "r4",
        "real",
        [
            "1.5",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "3.4e38",
            "1e-7",
            "'-0'",
            "0.1",
            "123456789",
            "1.17549435e-38",
        ],
    ),
    (
        "f8",
        "double precision",
        [
            "0.1",
            "1e100",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1.5e-7",
            "'-0'",
            "123456789012345678",
            "2.2250738585072014e-308",
            "1.7976931348623157e308",
            "-1.5e-300",
            "100000000000000",
            "1e15",
            "0.0001",
            "0.00001",
            "3.141592653589793",
        ],
    ),
    ("b", "boolean", ["true", "false"]),
    (
        "t",
        "text",
        [
            "'plain'",
            "'quote \" back \\ slash'",
            "E'new\\nline\\ttab'",
            "'é ✓ 😀'",
            "''",
            "'NULL'",
            "'{a,b}'",
            "E'\\x01 control'",
        ],
    ),
    ("vc", "varchar(20)", ["'hello'", "''"]),
    ("ch", "char(5)", ["'ab'", "''", "'abcde'"]),
    ("qc", '"char"', ["'x'"]),
    ("nm", "name", ["'pg_class'"]),
    ("u", "uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]),
    (
        "d",
        "date",
        ["'2026-01-01'", "'infinity'", "'-infinity'", "'0044-03-15 BC'", "'12345-06-07'"],
    ),
    ("tm", "time", ["'10:00:00'", "'23:59:59.999999'", "'00:00:00.5'"]),
    ("ttz", "timetz", ["'10:00:00+02'", "'23:59:59.123-05:30'", "'00:00:00+00'"]),
    (
        "ts",
        "timestamp",
        [
            "'2026-01-01 10:00:00'",
            "'2026-01-01 10:00:00.5'",
            "'2026-01-01 10:00:00.123456'",
            "'infinity'",
            "'-infinity'",
            "'2026-01-01 10:00:00 BC'",
            "'12345-06-07 08:09:10'",
        ],
    ),
    (
        "tstz",
        "timestamptz",
        [
            "'2026-01-01 10:00:00.5+02'",
            "'2026-01-01 10:00:00.123456Z'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 10:00:00 BC'",
            "'1900-01-01 00:00:00+00'",
            "'12345-06-07 08:09:10+00'",
            "'2026-06-01 12:00:00-07:30'",
        ],
    ),
    (
        "iv",
        "interval",
        [
            "'1 year 2 months 3 days 04:05:06.5'",
            "'-1 mons'",
            "'0'",
            "'1 day -00:00:01'",
            "'100 years'",
        ],
    ),
    ("by", "bytea", ["'\\x00ff10'", "''", "'hello'"]),
    (
        "js",
        "json",
        [
            '\'{"a": [1, 2.50, null], "b": "x"}\'',
            "'[]'",
            "'\"str\"'",
            "'12345678901234567890.12345678901234567890'",
            "'null'",
            '\'{"nested": {"deep": [true, false]}, "u": "\\u00e9"}\'',
            "'  {\"spaced\" :  1 }  '",
        ],
    ),
    (
        "jb",
        "jsonb",
        [
            '\'{"big": 123456789012345678901234567890.123456789, "f": 1.50}\'',
            '\'[1, "two", {"3": null}]\'',
            "'\"s\"'",
            "'0'",
        ],
    ),
    ("ia", "int[]", ["'{{1,2},{3,NULL}}'", "'{}'", "'{NULL}'", "'[0:1]={5,6}'", "'{1,2,3}'"]),
    (
        "ta",
        "text[]",
        [
            '\'{"a b","NULL",NULL,"q\\"uote","back\\\\slash","",x}\'',
            "'{{a,b},{c,d}}'",
            "'{}'",
        ],
    ),
    ("na", "numeric[]", ["'{1.50,NaN,Infinity,-1e-3}'"]),
    ("fa", "float8[]", ["'{1e100,-0,NaN,0.1,-Infinity}'"]),
    ("r4a", "real[]", ["'{1.5,3.4e38}'"]),
    ("tsa", "timestamptz[]", ["'{\"2026-01-01 10:00:00.5+00\",infinity,NULL}'"]),
    ("tsna", "timestamp[]", ['\'{"2026-01-01 10:00:00.5","0044-03-15 10:00:00 BC"}\'']),
    ("da", "date[]", ["'{2026-01-01,infinity}'"]),
    ("ja", "jsonb[]", ["ARRAY['{\"a\": 1}'::jsonb, '[2.50]'::jsonb, NULL]"]),
    ("jsa", "json[]", ["ARRAY['{\"a\": 1}'::json, '\"x\"'::json]"]),
    ("ba", "bool[]", ["'{t,f,NULL}'"]),
    ("ua", "uuid[]", ["'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'"]),
    ("iva", "interval[]", ['\'{"1 day","-1 mons"}\'']),
    ("i8a", "bigint[]", ["'{9007199254740993,-1}'"]),
    ("mo", "mood", ["'happy'", "'sad'"]),
    ("dom", "posint", ["5"]),
    ("doma", "posint[]", ["'{1,2}'"]),
    ("moa", "mood[]", ["'{happy,sad,NULL}'", "'{}'"]),
    (
        "comp",
        "item",
        [
            "ROW(1, 'a \"q\" \\ b, (c)', '2026-01-01 10:00:00.5+00', '{x,\"y z\"}', 1.50, 'ok')",
            "ROW(NULL, NULL, NULL, NULL, NULL, NULL)",
            "ROW(0, '', 'infinity', '{}', 'NaN', NULL)",
        ],
    ),
    ("compa", "item[]", ["ARRAY[ROW(1, 'x', NULL, NULL, 2.5, 'sad')::item, NULL]"]),
    ("sc", "single", ["ROW(NULL)", "ROW(7)"]),
    (
        "wr",
        "wrapper",
        [
            "ROW(ROW(1, 'x', '2026-01-01 10:00:00+00', '{a}', 1e-3, 'happy')::item,"
            " '{happy,NULL}', 3, '2026-01-01')",
            "ROW(NULL, NULL, NULL, NULL)",
        ],
    ),
    ("itd", "item_d", ["ROW(2, 'y', NULL, '{}', 0.10, 'ok')"]),
    ("tgd", "tags_d", ["'{a,\"b c\"}'"]),
    ("ip", "inet", ["'192.168.0.1/24'", "'::1'", "'10.0.0.1'"]),
    ("cd", "cidr", ["'10.0.0.0/8'", "'2001:db8::/32'"]),
    ("mac", "macaddr", ["'08:00:2b:01:02:03'"]),
    ("pt", "point", ["'(1.5,2)'"]),
    ("bx", "box", ["'(1,1),(0,0)'"]),
    ("bxa", "box[]", ["'{(1,1),(0,0);(2,2),(1,1)}'"]),
    ("r", "int4range", ["'[1,5)'", "'empty'", "'(,3]'"]),
    ("nr", "numrange", ["'[1.50,2)'"]),
    ("tsr", "tstzrange", ["'[2026-01-01 10:00+00,2026-01-02 00:00+00)'"]),
    ("mr", "int4multirange", ["'{[1,3),[5,7)}'"]),
    ("ra", "int4range[]", ["'{\"[1,2)\",empty}'"]),
    ("mon", "money", ["1.50", "-1234.5"]),
    ("o", "oid", ["12345"]),
    ("x", "xml", ["'<a>b</a>'"]),
    ("vb", "bit varying", ["B'10101'"]),
    ("lsn", "pg_lsn", ["'0/16B3748'"]),
    ("tsv", "tsvector", ["'a fat cat'"]),
]

#: The matrix in parts: "core" holds the types every server has; each type a server may be built
#: without (xml needs libxml) is a part of its own, skipped with the reason where it is missing.
MATRIX_PARTS: dict[str, list[tuple[str, str, list[str]]]] = {
    "core": [column for column in MATRIX if column[1] not in OPTIONAL_TYPES],
    **{name: [column for column in MATRIX if column[1] == name] for name in OPTIONAL_TYPES},
}


def matrix_part(server: PostgresServer, part: str) -> list[tuple[str, str, list[str]]]:
    """The columns of `part`; skips the test when the server lacks the part's type."""
    reason = server.lacks_type(part) if part in OPTIONAL_TYPES else None
    if reason:
        pytest.skip(reason)
    return MATRIX_PARTS[part]


_TYPE_QUERY = """
SELECT t.oid::int, n.nspname, t.typname, t.typtype::text, t.typbasetype::int,
       CASE WHEN t.typsubscript = 'array_subscript_handler'::regproc THEN t.typelem::int
            ELSE 0 END,
       t.typarray::int,
       COALESCE((SELECT array_agg(ARRAY[a.attname::text, a.atttypid::text] ORDER BY a.attnum)
                 FROM pg_attribute a
                 WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped),
                '{}')
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = ANY(%s)
"""


class _RawLoader(Loader):
    """The column's text output, exactly as pgoutput sends it."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def _describe(conn: psycopg.Connection[Any], oids: list[int]) -> list[TypeDescription]:
    rows = conn.execute(_TYPE_QUERY, (oids,)).fetchall()
    return [
        TypeDescription(
            oid,
            nsp,
            name,
            typtype,
            base_oid=base,
            element_oid=elem,
            array_oid=arr,
            fields=tuple((f, int(o)) for f, o in fields),
        )
        for oid, nsp, name, typtype, base, elem, arr, fields in rows
    ]


def _exact(value: Any) -> Any:
    """A form where 1.50 and 1.5 differ: Decimals by their digits, recursively."""
    if isinstance(value, Decimal):
        return ("number", str(value))
    if isinstance(value, dict):
        return {key: _exact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_exact(item) for item in value]
    return value


def _parse(document: bytes | str) -> Any:
    return json.loads(document, parse_float=Decimal, parse_int=Decimal)


@pytest.mark.integration
@pytest.mark.parametrize("part", MATRIX_PARTS)
def test_values_equal_to_jsonb(pg_server: PostgresServer, database_url: str, part: str) -> None:
    matrix = matrix_part(pg_server, part)
    nrows = max(len(values) for _, _, values in matrix) + 1  # and a row of NULLs
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in SESSION:
            conn.execute(statement)
        conn.execute(SCHEMA)
        columns = ", ".join(f'"{name}" {sqltype}' for name, sqltype, _ in matrix)
        conn.execute(f"CREATE TABLE matrix (id int PRIMARY KEY, {columns})")
        for i in range(nrows):
            names = ", ".join(f'"{name}"' for name, _, _ in matrix)
            literals = ", ".join(
                f"({values[i]})::{sqltype}" if i < len(values) else "NULL"
                for _, sqltype, values in matrix
            )
            conn.execute(f"INSERT INTO matrix (id, {names}) VALUES ({i}, {literals})")

        attributes = conn.execute(
            "SELECT attname::text, atttypid::int, atttypmod FROM pg_attribute"
            " WHERE attrelid = 'matrix'::regclass AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum"
        ).fetchall()
        relation = Relation(
            oid=conn.execute("SELECT 'matrix'::regclass::oid::int").fetchone()[0],  # type: ignore[index]
            namespace="public",
            name="matrix",
            replica_identity="d",
            columns=tuple(
                Column(name, oid, typmod, name == "id") for name, oid, typmod in attributes
            ),
        )

        builder = ChangeBuilder()
        for _ in range(10):
            missing = builder.missing_types(relation)
            if not missing:
                break
            builder.register_types(_describe(conn, missing))
        assert builder.missing_types(relation) == []

        with conn.cursor() as cur:
            for oid in {column.type_oid for column in relation.columns}:
                cur.adapters.register_loader(oid, _RawLoader)
            texts = cur.execute("SELECT * FROM matrix ORDER BY id").fetchall()
        expected = [
            _parse(doc)
            for (doc,) in conn.execute("SELECT to_jsonb(m)::text FROM matrix m ORDER BY id")
        ]

    items = feed_all(
        builder,
        begin(),
        relation,
        *(Insert(relation, tuple(row)) for row in texts),
        commit(),
    )
    rows = rows_of(items)
    assert len(rows) == nrows

    mismatches = []
    checked = 0
    for row, texts_row, want in zip(rows, texts, expected, strict=True):
        assert row.new is not None
        got = _parse(dumps(row.new))
        assert set(got) == set(want)
        for (column, text), name in zip(
            zip(relation.columns, texts_row, strict=True), got, strict=True
        ):
            assert column.name == name
            checked += text is not None
            if _exact(got[name]) != _exact(want[name]):
                mismatches.append((name, text, got[name], want[name]))
    assert not mismatches, "\n".join(
        f"{name}: text {text!r} → {got!r}, to_jsonb {want!r}"
        for name, text, got, want in mismatches
    )
    assert checked == nrows + sum(len(values) for _, _, values in matrix)  # ids and literals


def test_global_psycopg_adapters_are_untouched(builder: ChangeBuilder) -> None:
    builder.register_types([MOOD, ITEM, POSINT])
    transformer = psycopg.adapt.Transformer(psycopg.postgres.adapters)
    transformer.set_loader_types([NUMERIC, 1184, 1009], psycopg.pq.Format.TEXT)
    numeric, stamp, array = transformer.load_sequence((b"1.50", b"2026-01-01 10:00:00+00", b"{a}"))
    assert numeric == Decimal("1.50") and type(numeric) is Decimal
    assert isinstance(stamp, datetime)
    assert array == ["a"]
    assert psycopg.postgres.adapters.get_loader(16600, psycopg.pq.Format.TEXT) is None
