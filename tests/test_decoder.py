"""cdc.decoder: pgoutput messages built byte by byte, truncations, and fuzzing."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdc.decoder
from cdc.decoder import Decoder, read_cells_py, read_insert_py
from cdc.errors import ProtocolError, UnknownRelationError
from cdc.messages import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Toast,
    Truncate,
    Type,
    UnknownMessage,
    Update,
)

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
WHEN = datetime(2026, 11, 28, 11, 46, 37, 123456, tzinfo=UTC)
WHEN_US = (WHEN - PG_EPOCH) // timedelta(microseconds=1)

try:
    from cdc._speedups import read_cells as read_cells_c
    from cdc._speedups import read_insert as read_insert_c
except ImportError:  # no compiler where this checkout was installed
    read_cells_c = read_insert_c = None  # type: ignore[assignment]

CELL_READERS = {
    "python": (read_cells_py, read_insert_py),
    "c": (read_cells_c, read_insert_c),
}


@pytest.fixture(autouse=True, params=list(CELL_READERS))
def cell_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test here runs with the tuple loop and the Insert reader in Python and in C."""
    read_cells, read_insert = CELL_READERS[request.param]
    if read_cells is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    monkeypatch.setattr(cdc.decoder, "_read_cells", read_cells)
    monkeypatch.setattr(cdc.decoder, "_read_insert", read_insert)
    yield request.param


def test_the_c_tuple_loop_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the Python loop is what runs")
    assert read_cells_c is not None, "cdc._speedups missing: run pip install -e . again"


# --- byte builders (written from the manual, independent of the decoder) -----------------


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tup(*cells: bytes | Toast | None) -> bytes:
    out = struct.pack("!h", len(cells))
    for cell in cells:
        if cell is None:
            out += b"n"
        elif cell is Toast.UNCHANGED:
            out += b"u"
        else:
            out += b"t" + struct.pack("!i", len(cell)) + cell
    return out


def relation_msg(
    oid: int, namespace: str, name: str, columns: list[tuple[str, int, int, bool]], ident: str = "f"
) -> bytes:
    out = b"R" + struct.pack("!I", oid) + s(namespace) + s(name) + ident.encode()
    out += struct.pack("!h", len(columns))
    for col_name, type_oid, typmod, key in columns:
        out += (
            struct.pack("!b", 1 if key else 0) + s(col_name) + struct.pack("!Ii", type_oid, typmod)
        )
    return out


USERS_COLUMNS = [("id", 23, -1, True), ("name", 25, -1, False), ("bio", 25, -1, False)]
USERS = Relation(
    oid=16384,
    namespace="public",
    name="users",
    replica_identity="f",
    columns=(
        Column("id", 23, -1, True),
        Column("name", 25, -1, False),
        Column("bio", 25, -1, False),
    ),
)
TAGS = Relation(
    oid=16400,
    namespace="app",
    name="tags",
    replica_identity="d",
    columns=(Column("tag", 1043, 68, True),),
)


def cached_decoder() -> Decoder:
    decoder = Decoder()
    decoder.relations[USERS.oid] = USERS
    decoder.relations[TAGS.oid] = TAGS
    return decoder


ROW_NEW = (b"1", b"ann", Toast.UNCHANGED)
ROW_OLD = (b"1", b"an", None)
ROW_KEY = (b"1", None, None)

# (id, payload, expected message) — each decoded by a decoder with USERS and TAGS cached.
CASES: list[tuple[str, bytes, PgOutputMessage]] = [
    (
        "begin",
        b"B" + struct.pack("!QqI", 0x16B3748, WHEN_US, 742),
        Begin(final_lsn=0x16B3748, commit_time=WHEN, xid=742),
    ),
    (
        "begin-before-epoch",
        b"B" + struct.pack("!QqI", 1, -1, 0xFFFFFFFF),
        Begin(final_lsn=1, commit_time=PG_EPOCH - timedelta(microseconds=1), xid=0xFFFFFFFF),
    ),
    (
        "commit",
        b"C" + struct.pack("!BQQq", 0, 0x16B3748, 0x16B3778, WHEN_US),
        Commit(flags=0, commit_lsn=0x16B3748, end_lsn=0x16B3778, commit_time=WHEN),
    ),
    (
        "origin",
        b"O" + struct.pack("!Q", 0xABCDEF0123) + s("node-1"),
        Origin(commit_lsn=0xABCDEF0123, name="node-1"),
    ),
    (
        "relation",
        relation_msg(USERS.oid, "public", "users", USERS_COLUMNS),
        USERS,
    ),
    (
        "relation-pg-catalog",
        relation_msg(1262, "", "pg_database", [("datname", 19, -1, False)], ident="n"),
        Relation(1262, "pg_catalog", "pg_database", "n", (Column("datname", 19, -1, False),)),
    ),
    (
        "relation-no-columns-utf8",
        relation_msg(7, "schéma", "tâble", []),
        Relation(7, "schéma", "tâble", "f", ()),
    ),
    (
        "type",
        b"Y" + struct.pack("!I", 90001) + s("public") + s("mood"),
        Type(oid=90001, namespace="public", name="mood"),
    ),
    (
        "type-pg-catalog",
        b"Y" + struct.pack("!I", 90002) + s("") + s("thing"),
        Type(oid=90002, namespace="pg_catalog", name="thing"),
    ),
    (
        "insert",
        b"I" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW),
        Insert(relation=USERS, new=ROW_NEW),
    ),
    (
        "insert-empty-text-and-binary",
        b"I"
        + struct.pack("!I", USERS.oid)
        + b"N\x00\x03"
        + b"t\x00\x00\x00\x00"
        + b"b\x00\x00\x00\x02\x00\xff"
        + b"n",
        Insert(relation=USERS, new=(b"", b"\x00\xff", None)),
    ),
    (
        "update-no-old",
        b"U" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW),
        Update(relation=USERS, new=ROW_NEW, old=None, old_is_key=False),
    ),
    (
        "update-key",
        b"U" + struct.pack("!I", USERS.oid) + b"K" + tup(*ROW_KEY) + b"N" + tup(*ROW_NEW),
        Update(relation=USERS, new=ROW_NEW, old=ROW_KEY, old_is_key=True),
    ),
    (
        "update-old",
        b"U" + struct.pack("!I", USERS.oid) + b"O" + tup(*ROW_OLD) + b"N" + tup(*ROW_NEW),
        Update(relation=USERS, new=ROW_NEW, old=ROW_OLD, old_is_key=False),
    ),
    (
        "delete-key",
        b"D" + struct.pack("!I", TAGS.oid) + b"K" + tup(b"red"),
        Delete(relation=TAGS, old=(b"red",), old_is_key=True),
    ),
    (
        "delete-old",
        b"D" + struct.pack("!I", USERS.oid) + b"O" + tup(*ROW_OLD),
        Delete(relation=USERS, old=ROW_OLD, old_is_key=False),
    ),
    (
        "truncate",
        b"T" + struct.pack("!IB", 1, 0) + struct.pack("!I", USERS.oid),
        Truncate(relations=(USERS,), cascade=False, restart_identity=False),
    ),
    (
        "truncate-cascade",
        b"T" + struct.pack("!IBII", 2, 1, USERS.oid, TAGS.oid),
        Truncate(relations=(USERS, TAGS), cascade=True, restart_identity=False),
    ),
    (
        "truncate-restart-identity",
        b"T" + struct.pack("!IBI", 1, 2, TAGS.oid),
        Truncate(relations=(TAGS,), cascade=False, restart_identity=True),
    ),
    (
        "truncate-both-options",
        b"T" + struct.pack("!IBI", 1, 3, TAGS.oid),
        Truncate(relations=(TAGS,), cascade=True, restart_identity=True),
    ),
    (
        "message-transactional",
        b"M" + struct.pack("!BQ", 1, 0x16B3800) + s("walcast") + struct.pack("!i", 7) + b'{"a":1}',
        Message(transactional=True, lsn=0x16B3800, prefix="walcast", content=b'{"a":1}'),
    ),
    (
        "message-not-transactional",
        b"M" + struct.pack("!BQ", 0, 5) + s("other") + struct.pack("!i", 3) + b"\x00\x01\x02",
        Message(transactional=False, lsn=5, prefix="other", content=b"\x00\x01\x02"),
    ),
    (
        "message-empty",
        b"M" + struct.pack("!BQ", 0, 5) + s("") + struct.pack("!i", 0),
        Message(transactional=False, lsn=5, prefix="", content=b""),
    ),
]

VALID = [payload for _, payload, _ in CASES]


@pytest.mark.parametrize(("payload", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_cases(payload: bytes, expected: PgOutputMessage) -> None:
    assert cached_decoder().decode(payload) == expected
    assert cached_decoder().decode(memoryview(b"xx" + payload)[2:]) == expected


def test_row_messages_carry_the_cached_relation_object() -> None:
    decoder = cached_decoder()
    message = decoder.decode(b"I" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW))
    assert isinstance(message, Insert)
    assert message.relation is USERS


def test_relation_message_fills_the_cache() -> None:
    decoder = Decoder()
    payload = b"I" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW)
    with pytest.raises(UnknownRelationError):
        decoder.decode(payload, lsn=0x10)
    relation = decoder.decode(relation_msg(USERS.oid, "public", "users", USERS_COLUMNS))
    assert decoder.relations == {USERS.oid: relation}
    message = decoder.decode(payload)
    assert isinstance(message, Insert)
    assert message.relation is relation


def test_relation_message_replaces_the_cached_one() -> None:
    decoder = cached_decoder()
    altered = relation_msg(
        USERS.oid, "public", "users", [*USERS_COLUMNS, ("age", 23, -1, False)], ident="d"
    )
    new = decoder.decode(altered)
    assert isinstance(new, Relation)
    assert decoder.relations[USERS.oid] is new
    assert [c.name for c in new.columns] == ["id", "name", "bio", "age"]
    assert new.replica_identity == "d"
    # the old 3-column shape no longer fits; the new 4-column one does
    with pytest.raises(ProtocolError, match="columns"):
        decoder.decode(b"I" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW))
    message = decoder.decode(b"I" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_NEW, b"42"))
    assert isinstance(message, Insert)
    assert message.relation is new
    assert message.new == (*ROW_NEW, b"42")
    assert decoder.relations[TAGS.oid] is TAGS


@pytest.mark.parametrize(
    "payload",
    [
        b"I" + struct.pack("!I", 999) + b"N" + tup(b"1"),
        b"U" + struct.pack("!I", 999) + b"N" + tup(b"1"),
        b"D" + struct.pack("!I", 999) + b"K" + tup(b"1"),
        b"T" + struct.pack("!IBII", 2, 0, USERS.oid, 999),
    ],
    ids=["insert", "update", "delete", "truncate"],
)
def test_unknown_relation(payload: bytes) -> None:
    with pytest.raises(UnknownRelationError, match="999") as info:
        cached_decoder().decode(payload, lsn=0xABC)
    assert info.value.lsn == 0xABC


@pytest.mark.parametrize("payload", [b"Z", b"Zsome bytes\x00", b"\xff\x00", b"\x00"])
def test_unknown_kind_is_returned_not_raised(payload: bytes) -> None:
    assert Decoder().decode(payload) == UnknownMessage(payload[0], payload)


INSERT_HEAD = b"I" + struct.pack("!I", USERS.oid) + b"N"

# (id, payload) — each must raise ProtocolError, not anything else.
MALFORMED = [
    ("empty", b""),
    ("trailing-garbage-begin", VALID[0] + b"\x00"),
    ("trailing-garbage-insert", INSERT_HEAD + tup(*ROW_NEW) + b"x"),
    ("trailing-garbage-truncate", b"T" + struct.pack("!IBII", 1, 0, USERS.oid, TAGS.oid)),
    ("truncate-short-oids", b"T" + struct.pack("!IBI", 2, 0, USERS.oid)),
    ("truncate-huge-count", b"T" + struct.pack("!IBI", 0xFFFFFFFF, 0, USERS.oid)),
    ("string-without-nul", b"Y" + struct.pack("!I", 1) + b"public"),
    ("bad-utf8", b"Y" + struct.pack("!I", 1) + b"\xff\xfe\x00name\x00"),
    ("bad-cell-kind", INSERT_HEAD + b"\x00\x03" + b"n" + b"x" + b"n"),
    ("negative-cell-length", INSERT_HEAD + b"\x00\x03" + b"t\xff\xff\xff\xff" + b"nn"),
    ("cell-past-end", INSERT_HEAD + b"\x00\x03" + b"nn" + b"t\x00\x00\x00\x09abc"),
    ("too-few-columns", INSERT_HEAD + tup(b"1", b"2")),
    ("too-many-columns", INSERT_HEAD + tup(b"1", b"2", b"3", b"4")),
    ("insert-without-N", b"I" + struct.pack("!I", USERS.oid) + b"O" + tup(*ROW_NEW)),
    ("update-bad-marker", b"U" + struct.pack("!I", USERS.oid) + b"X" + tup(*ROW_NEW)),
    (
        "update-old-then-no-N",
        b"U" + struct.pack("!I", USERS.oid) + b"O" + tup(*ROW_OLD) + b"O" + tup(*ROW_NEW),
    ),
    ("delete-with-N", b"D" + struct.pack("!I", USERS.oid) + b"N" + tup(*ROW_OLD)),
    ("message-negative-length", b"M" + struct.pack("!BQ", 1, 5) + s("p") + b"\xff\xff\xff\xff"),
    (
        "message-content-short",
        b"M" + struct.pack("!BQ", 1, 5) + s("p") + struct.pack("!i", 4) + b"ab",
    ),
    ("begin-timestamp-overflow", b"B" + struct.pack("!QqI", 1, 2**63 - 1, 1)),
    ("commit-timestamp-underflow", b"C" + struct.pack("!BQQq", 0, 1, 2, -(2**63))),
]


@pytest.mark.parametrize("payload", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_raises_protocol_error_with_lsn(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        cached_decoder().decode(payload, lsn=0x16B3748)
    assert type(info.value) is ProtocolError
    assert info.value.lsn == 0x16B3748
    assert "16B3748" in str(info.value)


@pytest.mark.parametrize("payload", VALID, ids=[c[0] for c in CASES])
def test_every_prefix_is_rejected(payload: bytes) -> None:
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            cached_decoder().decode(payload[:cut], lsn=cut)


def test_payload_views_are_not_retained() -> None:
    buffer = bytearray(INSERT_HEAD + tup(*ROW_NEW))
    message = cached_decoder().decode(memoryview(buffer))
    buffer[:] = b"\x00" * len(buffer)
    assert isinstance(message, Insert)
    assert message.new == ROW_NEW
    assert all(type(cell) is not memoryview for cell in message.new)


# --- fuzzing ------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=400,
    deadline=None,
    # The cell_reader fixture only picks the implementation: the same for every example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


def decode_or_protocol_error(payload: bytes) -> None:
    try:
        cached_decoder().decode(payload, lsn=1)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(payload: bytes) -> None:
    decode_or_protocol_error(payload)


@FUZZ
@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=128))
def test_fuzz_known_kind_random_body(kind: int, body: bytes) -> None:
    decode_or_protocol_error(bytes([kind]) + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        index = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[index] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[index]
        elif op == "cut":
            del data[index:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_valid_messages(payload: bytes) -> None:
    decode_or_protocol_error(payload)


def cells_outcome(read: Callable[..., Any], buf: bytes, pos: int, ncols: int) -> object:
    """What one tuple loop makes of the input: its result, or how it failed."""
    try:
        return read(buf, pos, ncols, Toast.UNCHANGED)
    except ValueError as exc:
        return ("invalid", str(exc))
    except (IndexError, struct.error):  # `decode` reports both as a truncated message
        return "ended too soon"


@st.composite
def cell_bytes(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """Mostly well-formed TupleData, with every kind of damage now and then."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(b"tbnu" * 4 + b"x\x00"))
        part = bytes([kind])
        if kind in b"tb":
            value = draw(st.binary(max_size=12))
            length = draw(st.sampled_from([len(value)] * 6 + [len(value) + 3, 2**32 - 1]))
            part += struct.pack("!I", length) + value
        parts.append(part)
    buf = draw(st.binary(max_size=3)) + b"".join(parts)
    cut = draw(st.integers(0, len(buf)))
    buf = buf[:cut] if draw(st.booleans()) else buf
    return buf, draw(st.integers(0, 3)), draw(st.integers(0, 7))


@FUZZ
@given(cell_bytes())
def test_fuzz_c_and_python_tuple_loops_agree(case: tuple[bytes, int, int]) -> None:
    if read_cells_c is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    buf, pos, ncols = case
    assert cells_outcome(read_cells_c, buf, pos, ncols) == cells_outcome(
        read_cells_py, buf, pos, ncols
    )


def insert_outcome(read: Callable[..., Any], payload: bytes) -> object:
    """What one Insert reader makes of a payload: the message (with its relation's identity),
    None (left to the general path), or how it failed (it never should)."""
    relations = {USERS.oid: USERS, TAGS.oid: TAGS}
    try:
        message = read(payload, relations, Insert, Toast.UNCHANGED)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))
    if message is None:
        return None
    assert type(message) is Insert
    return message, message.relation is relations[message.relation.oid]


@st.composite
def insert_payloads(draw: st.DrawFn) -> bytes:
    """Mostly well-formed Inserts for the cached relations, with every kind of damage."""
    oid = draw(st.sampled_from([USERS.oid] * 3 + [TAGS.oid] * 2 + [999]))
    marker = draw(st.sampled_from(b"N" * 6 + b"OK"))
    width = {USERS.oid: 3, TAGS.oid: 1}.get(oid, 2) + draw(st.sampled_from([0] * 6 + [-1, 1]))
    cells = draw(
        st.lists(
            st.one_of(st.binary(max_size=8), st.none(), st.just(Toast.UNCHANGED)),
            min_size=width,
            max_size=width,
        )
    )
    payload = b"I" + struct.pack("!IB", oid, marker) + tup(*cells)
    if draw(st.integers(0, 4)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]
    if draw(st.integers(0, 4)) == 0:
        payload += draw(st.binary(min_size=1, max_size=3))
    return payload


@FUZZ
@given(st.one_of(insert_payloads(), mutated(), st.binary(max_size=64).map(lambda b: b"I" + b)))
def test_fuzz_c_and_python_insert_readers_agree(payload: bytes) -> None:
    if read_insert_c is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    assert insert_outcome(read_insert_c, payload) == insert_outcome(read_insert_py, payload)


@FUZZ
@given(st.one_of(insert_payloads(), mutated()))
def test_fuzz_the_insert_reader_agrees_with_the_general_path(payload: bytes) -> None:
    """Whatever the one-call reader accepts, the general parser decodes to the same Insert;
    whatever it leaves, the general parser decodes or rejects on its own."""
    fast = cdc.decoder._read_insert(payload, cached_decoder().relations, Insert, Toast.UNCHANGED)
    if fast is not None:
        reader = cdc.decoder._Reader(payload, None)
        assert cdc.decoder._parse_insert(cached_decoder(), reader) == fast
        assert reader.pos == len(payload)
