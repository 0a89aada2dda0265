"""cdc.runs: a run of row changes taken in one C call gives what feeding them one by one gives.

The general path (`ReplicationProtocol.receive` → `Decoder.decode` → `ChangeBuilder.feed`) is
the definition; the run must produce the same items, stop with the same error at the same
message, and leave the same protocol and transaction state, for any stream: valid inserts,
updates (with no old row, its key or all of it) and deletes, values a loader refuses, wrong
widths, truncated tuples, unchanged-TOAST cells, changes outside a transaction or of a relation
described anew, keepalives and every other message in between.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdc.runs
from cdc.changes import ChangeBuilder, Item, RowChange, TypeDescription
from cdc.decoder import Decoder
from cdc.render import RawJson
from cdc.replication import ReplicationProtocol, XLogData
from cdc.runs import ChangeRuns

KINDS = ("INSERT", "UPDATE", "DELETE")

needs_c = pytest.mark.skipif(
    cdc.runs._change_run is None, reason="cdc._speedups was not built (no C compiler)"
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- byte builders (from the protocol manual, independent of the decoder) -----------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def xlog(payload: bytes, data_start: int = 0x100, wal_end: int = 0x200) -> bytes:
    return b"w" + struct.pack("!QQq", data_start, wal_end, 0) + payload


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + struct.pack("!Qq?", wal_end, 0, reply)


def begin(final_lsn: int, xid: int = 7) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, 0, xid)


def commit(commit_lsn: int) -> bytes:
    return b"C" + struct.pack("!bQQq", 0, commit_lsn, commit_lsn + 8, 0)


def relation(oid: int, name: str, columns: list[tuple[str, int]]) -> bytes:
    out = b"R" + struct.pack("!I", oid) + _s("public") + _s(name) + b"f"
    out += struct.pack("!h", len(columns))
    for i, (column, type_oid) in enumerate(columns):
        key = 1 if i == 0 else 0  # the first column is the replica identity
        out += struct.pack("!b", key) + _s(column) + struct.pack("!Ii", type_oid, -1)
    return out


def tuple_data(cells: list[bytes | str | None]) -> bytes:
    """Cells: bytes is a text cell, None a NULL, "u" an unchanged TOAST cell, "b" a binary one."""
    out = struct.pack("!h", len(cells))
    for cell in cells:
        if cell is None:
            out += b"n"
        elif cell == "u":
            out += b"u"
        elif isinstance(cell, str):
            out += b"b" + struct.pack("!i", len(cell)) + cell.encode()
        else:
            out += b"t" + struct.pack("!i", len(cell)) + cell
    return out


def insert(oid: int, cells: list[bytes | str | None]) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + tuple_data(cells)


Cells = list[bytes | str | None]


def update(oid: int, new: Cells, old: Cells | None = None, old_kind: bytes = b"O") -> bytes:
    before = b"" if old is None else old_kind + tuple_data(old)
    return b"U" + struct.pack("!I", oid) + before + b"N" + tuple_data(new)


def delete(oid: int, old: Cells, old_kind: bytes = b"O") -> bytes:
    return b"D" + struct.pack("!I", oid) + old_kind + tuple_data(old)


# One table whose columns take every code of cdc.rows (TEXT, INT, BOOL, NUMERIC, JSON,
# TIMESTAMP, TIMESTAMPTZ) and loaders C calls (float8, int4[], a user enum), and a narrow one.
WIDE = 16500
WIDE_COLUMNS = [
    ("id", 20),
    ("name", 25),
    ("ok", 16),
    ("price", 1700),
    ("doc", 3802),
    ("at", 1114),
    ("atz", 1184),
    ("ratio", 701),
    ("ids", 1007),
    ("mood", 16600),
]
NARROW = 16501
NARROW_COLUMNS = [("id", 23), ("note", 25)]
MOOD = TypeDescription(16600, "public", "mood", "e", array_oid=16599)

GOOD = {
    20: [b"1", b"-42", b"123456789012345678", b"9223372036854775807"],
    23: [b"7", b"-1"],
    25: [b"ann", b"", "\u00e9t\u00e9".encode(), b"a b"],
    16: [b"t", b"f"],
    1700: [b"1.50", b"-0.001", b"NaN", b"Infinity", b"12345678901234567890.5"],
    3802: [b'{"a": [1, 2]}', b"null", b'"x"'],
    1114: [b"2026-01-01 10:00:00.5", b"infinity", b"2000-01-01 00:00:00 BC"],
    1184: [b"2026-01-01 10:00:00+00", b"2026-01-01 10:00:00.25+05:30", b"-infinity"],
    701: [b"1.5", b"1e+100", b"-0", b"NaN"],
    1007: [b"{1,2,NULL}", b"{}"],
    16600: [b"happy", b"sad"],
}
BAD = [b"x", b"1.2.3", b"\xff\xfe", b"{", b"99999999999999999999999", b" 1", b"T"]


@st.composite
def cells_for(draw: st.DrawFn, columns: list[tuple[str, int]]) -> list[bytes | str | None]:
    """Good text or NULL in every cell; now and then one cell a loader refuses, an unchanged
    TOAST cell or a binary one."""
    cells: list[bytes | str | None] = [
        draw(st.one_of(st.sampled_from(GOOD[type_oid]), st.none())) for _, type_oid in columns
    ]
    surprise = draw(st.sampled_from(["none"] * 12 + ["bad", "unchanged", "binary"]))
    if surprise != "none" and cells:
        at = draw(st.integers(0, len(cells) - 1))
        if surprise == "bad":
            cells[at] = draw(st.sampled_from(BAD))
        elif surprise == "unchanged":
            cells[at] = "u"
        else:
            cells[at] = draw(st.sampled_from(GOOD[columns[at][1]])).decode("utf-8", "replace")
    return cells


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """CopyData messages: mostly transactions of row changes of described tables, with every kind
    of surprise the general path has a rule for (each ends the stream if it is an error)."""
    lsn = 0x1000
    messages: list[bytes] = []
    described: dict[int, list[tuple[str, int]]] = {}
    if draw(st.integers(0, 9)):
        messages.append(xlog(begin(lsn + 500), lsn, lsn + 900))
    for oid, columns in ((WIDE, WIDE_COLUMNS), (NARROW, NARROW_COLUMNS)):
        if draw(st.integers(0, 9)):
            described[oid] = columns
            messages.append(xlog(relation(oid, f"t{oid}", columns), lsn, lsn + 900))
    for _ in range(draw(st.integers(1, 60))):
        lsn += draw(st.integers(-16, 64))  # a data start may also go back
        what = draw(
            st.sampled_from(
                ["begin", "commit", "relation", "keepalive"] + ["insert"] * 20 + ["garbage"]
            )
        )
        if what == "begin":
            messages.append(xlog(begin(lsn + 500), lsn, lsn + 900))
        elif what == "commit":
            messages.append(xlog(commit(lsn), lsn, lsn + 900))
        elif what == "relation":
            oid = draw(st.sampled_from([WIDE, NARROW]))
            described[oid] = draw(st.sampled_from([WIDE_COLUMNS, NARROW_COLUMNS, WIDE_COLUMNS[:4]]))
            messages.append(xlog(relation(oid, f"t{oid}", described[oid]), lsn, lsn + 900))
        elif what == "keepalive":
            messages.append(keepalive(lsn + draw(st.integers(0, 99)), draw(st.booleans())))
        elif what == "garbage":
            kind = draw(st.sampled_from([b"", b"I", b"U", b"Z"]))
            payload = kind + draw(st.binary(max_size=40))
            messages.append(xlog(payload, lsn) if kind else payload)
        else:
            oid = draw(st.sampled_from([WIDE, WIDE, NARROW, NARROW, 16999]))
            columns = described.get(oid, NARROW_COLUMNS)
            cells = draw(cells_for(columns))
            damage = draw(st.sampled_from(["none"] * 20 + ["width", "truncated", "longer"]))
            if damage == "width":
                cells = cells[: draw(st.integers(0, len(cells)))] + [b"1"] * draw(st.integers(0, 1))
            shape = draw(st.sampled_from(["insert"] * 3 + ["update", "delete"]))
            if shape == "insert":
                payload = insert(oid, cells)
            else:
                old_kind = draw(st.sampled_from([b"K", b"O", b"N"]))
                before = draw(cells_for(columns))
                if old_kind == b"K":  # a key-only old row: NULL but for the key
                    before = before[:1] + [None] * (len(before) - 1)
                if shape == "update":
                    payload = update(oid, cells, None if old_kind == b"N" else before, old_kind)
                else:  # a Delete without an old row is malformed: the general path says so
                    payload = delete(oid, before, b"O" if old_kind == b"N" else old_kind)
                    if old_kind == b"N" and draw(st.booleans()):
                        payload = payload[:5] + b"N" + payload[6:]
            if damage == "truncated":
                payload = payload[: draw(st.integers(1, len(payload)))]
            elif damage == "longer":
                payload += b"\0"
            messages.append(xlog(payload, lsn, lsn + draw(st.integers(0, 900))))
    return messages


# --- the two ways ---------------------------------------------------------------------------


class Stream:
    """One stream's state, fed as the reader feeds it (with or without runs)."""

    def __init__(self) -> None:
        self.protocol, self.decoder = ReplicationProtocol(), Decoder()
        self.builder = ChangeBuilder()
        self.builder.register_types([MOOD])
        self.runs = ChangeRuns(self.protocol, self.decoder, self.builder)

    def one(self, data: bytes) -> list[Item]:
        message = self.protocol.receive(data)
        if type(message) is not XLogData:
            return []
        return self.builder.feed(self.decoder.decode(message.payload, message.data_start))

    def state(self) -> tuple[Any, ...]:
        protocol, builder = self.protocol, self.builder
        return (
            protocol.received_lsn,
            protocol.server_wal_end,
            protocol.reply_pending,
            builder.commit_lsn,
            builder.position,
        )


Outcome = tuple[list[Item], str | None, tuple[Any, ...]]


def one_by_one(messages: list[bytes]) -> Outcome:
    stream, items = Stream(), []
    for data in messages:
        try:
            items += stream.one(data)
        except Exception as exc:
            return items, f"{type(exc).__name__}: {exc}", stream.state()
    return items, None, stream.state()


def with_runs(messages: list[bytes]) -> Outcome:
    stream, items = Stream(), []
    i = 0
    while i < len(messages):
        i = stream.runs.take(messages, i, items)
        if i == len(messages):
            break
        try:
            items += stream.one(messages[i])
        except Exception as exc:
            return items, f"{type(exc).__name__}: {exc}", stream.state()
        i += 1
    return items, None, stream.state()


def same(left: Outcome, right: Outcome) -> None:
    items, error, state = left
    assert [type(item) for item in right[0]] == [type(item) for item in items]
    assert right[0] == items
    # RawJson and str compare equal: the kinds of the values must match as well.
    assert [_kinds(item) for item in right[0]] == [_kinds(item) for item in items]
    assert right[1:] == (error, state)


def _kinds(item: Item) -> Any:
    if type(item) is not RowChange or item.new is None:
        return None
    return {name: type(value) for name, value in item.new.items()}


@needs_c
@FUZZ
@given(streams())
def test_fuzz_runs_give_what_one_by_one_gives(messages: list[bytes]) -> None:
    same(one_by_one(messages), with_runs(messages))


# --- what a run takes, and where it stops ----------------------------------------------------


def transaction(rows: int) -> list[bytes]:
    messages = [
        xlog(begin(0x9000), 0x1000),
        xlog(relation(NARROW, "narrow", NARROW_COLUMNS), 0x1000),
    ]
    messages += [xlog(insert(NARROW, [b"%d" % i, b"row"]), 0x1000 + i) for i in range(rows)]
    return [*messages, xlog(commit(0x9000), 0x9000, 0x9100)]


def fed_up_to(messages: list[bytes], count: int) -> tuple[Stream, list[Item]]:
    stream = Stream()
    items: list[Item] = []
    for data in messages[:count]:
        items += stream.one(data)
    return stream, items


@needs_c
def test_a_run_takes_every_insert_of_a_transaction_in_one_call() -> None:
    messages = transaction(100)
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == 102  # stops at the Commit
    changes = [item for item in items if type(item) is RowChange]
    assert [change.position for change in changes] == list(range(1, 101))
    assert changes[-1].new == {"id": 99, "note": "row"}
    assert stream.protocol.received_lsn == 0x1000 + 99
    assert stream.builder.position == 100
    assert one_by_one(messages) == with_runs(messages)


def test_no_run_outside_a_transaction() -> None:
    messages = transaction(3)
    stream, items = fed_up_to(messages, 2)
    stream.builder.feed(Decoder().decode(commit(0x9000)))  # the transaction ended
    assert stream.runs.take(messages, 2, items) == 2
    with pytest.raises(Exception, match="Insert outside a transaction"):
        stream.one(messages[2])


@needs_c
def test_a_run_stops_at_a_value_the_loader_refuses_and_the_general_path_reports_it() -> None:
    messages = transaction(5)
    messages[4] = xlog(insert(NARROW, [b"not a number", b"row"]), 0x2000)
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == 4
    with pytest.raises(Exception, match=r"public\.narrow: a value could not be loaded"):
        stream.one(messages[4])


@needs_c
def test_new_type_descriptions_retire_the_plans_until_the_relation_is_bound_again() -> None:
    messages = transaction(4)
    stream, items = fed_up_to(messages, 2)
    stream.builder.register_types([TypeDescription(16700, "public", "other", "e")])
    assert stream.runs.take(messages, 2, items) == 2  # no plan: the general path binds it
    items += stream.one(messages[2])
    assert stream.runs.take(messages, 3, items) == 6
    assert [item.position for item in items if type(item) is RowChange] == [1, 2, 3, 4]


@needs_c
def test_a_plan_bound_for_an_earlier_relation_message_is_not_used() -> None:
    messages = transaction(2)
    stream, items = fed_up_to(messages, 2)
    # The decoder caches a new Relation message the builder has not been fed yet.
    stream.decoder.decode(relation(NARROW, "narrow", NARROW_COLUMNS))
    assert stream.runs.take(messages, 2, items) == 2


@needs_c
def test_the_row_values_are_those_of_the_loaders() -> None:
    row: list[bytes | str | None] = [
        b"5",
        b"ann",
        b"t",
        b"1.50",
        b'{"a": 1}',
        b"2026-01-01 10:00:00",
        b"2026-01-01 10:00:00+00",
        b"1e+100",
        b"{1,NULL}",
        b"happy",
    ]
    messages = [
        xlog(begin(0x9000)),
        xlog(relation(WIDE, "wide", WIDE_COLUMNS)),
        xlog(insert(WIDE, row)),
    ]
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == 3
    new = items[-1].new
    assert new == {
        "id": 5,
        "name": "ann",
        "ok": True,
        "price": RawJson("1.50"),
        "doc": RawJson('{"a": 1}'),
        "at": "2026-01-01T10:00:00",
        "atz": "2026-01-01T10:00:00+00:00",
        "ratio": RawJson("1" + "0" * 100),
        "ids": [1, None],
        "mood": "happy",
    }
    assert type(new["price"]) is RawJson and type(new["ratio"]) is RawJson


@needs_c
@pytest.mark.parametrize(
    "call",
    [
        lambda run: run(
            (b"w",), 0, [], {}, {}, RowChange, RawJson, 1, 0, ("INSERT", "UPDATE", "DELETE"), ()
        ),
        lambda run: run(
            [], 0, (), {}, {}, RowChange, RawJson, 1, 0, ("INSERT", "UPDATE", "DELETE"), ()
        ),
        lambda run: run([], 0, [], {}, {}, dict, RawJson, 1, 0, KINDS, ()),
        lambda run: run(
            [], -1, [], {}, {}, RowChange, RawJson, 1, 0, ("INSERT", "UPDATE", "DELETE"), ()
        ),
        lambda run: run(
            [], 0, [], {}, {}, RowChange, RawJson, None, 0, ("INSERT", "UPDATE", "DELETE"), ()
        ),
        lambda run: run([], 0, [], {}),
        lambda run: run([], 0, [], {}, {}, RowChange, RawJson, 1, 0, ("INSERT",), ()),
    ],
)
def test_change_run_refuses_arguments_of_the_wrong_kind(call: Callable[..., Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        call(cdc.runs._change_run)


def test_without_the_extension_nothing_is_taken_and_every_message_goes_the_general_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cdc.runs, "_change_run", None)
    messages = transaction(5)
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == 2
    same(one_by_one(messages), with_runs(messages))


@needs_c
def test_updates_and_deletes_carry_their_old_rows_as_the_general_path_gives_them() -> None:
    messages = [
        xlog(begin(0x9000)),
        xlog(relation(NARROW, "narrow", NARROW_COLUMNS)),
        xlog(update(NARROW, [b"1", b"new"])),  # no old row: the key did not change
        xlog(update(NARROW, [b"2", b"new"], [b"1", None], b"K")),  # the key changed
        xlog(update(NARROW, [b"2", b"newer"], [b"2", b"new"], b"O")),  # REPLICA IDENTITY FULL
        xlog(delete(NARROW, [b"2", None], b"K")),
        xlog(delete(NARROW, [b"3", b"gone"], b"O")),
    ]
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == len(messages)
    changes = [item for item in items if type(item) is RowChange]
    assert [(c.kind, c.new, c.old, c.position) for c in changes] == [
        ("UPDATE", {"id": 1, "note": "new"}, None, 1),
        ("UPDATE", {"id": 2, "note": "new"}, {"id": 1}, 2),
        ("UPDATE", {"id": 2, "note": "newer"}, {"id": 2, "note": "new"}, 3),
        ("DELETE", None, {"id": 2}, 4),
        ("DELETE", None, {"id": 3, "note": "gone"}, 5),
    ]
    same(one_by_one(messages), with_runs(messages))


@needs_c
def test_an_update_with_an_unchanged_toast_cell_is_left_to_the_general_path() -> None:
    messages = [
        xlog(begin(0x9000)),
        xlog(relation(NARROW, "narrow", NARROW_COLUMNS)),
        xlog(update(NARROW, [b"1", "u"], [b"1", b"kept"], b"O")),
    ]
    stream, items = fed_up_to(messages, 2)
    assert stream.runs.take(messages, 2, items) == 2
    same(one_by_one(messages), with_runs(messages))
    assert with_runs(messages)[0][-1].new == {"id": 1, "note": "kept"}  # merged from the old row
