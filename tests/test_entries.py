"""gateway.entries: an event kept as bytes comes back as it was, and the C entry writer
(`gateway._speedups`) gives the bytes its Python twin gives.

A row is kept as plain JSON with the positions of its `RawJson` values in the header (the
masks), or, when masks cannot describe it, with tagged values; tests/test_history.py checks
the whole round trip through a `MemoryHistory` for any row shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.entries import (
    CODEC,
    HEADER,
    TAGGED,
    change_entry_py,
    event_of,
    micros_of,
    raw_json_mask_py,
    restore_raw_json,
)
from gateway.events import ChangeEvent

try:
    from gateway import _speedups
except ImportError:  # built without a C compiler
    _speedups = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_speedups is None, reason="gateway._speedups was not built")

TABLE = parse_realtime_config({"tables": {"notes": {}}}).tables["public.notes"]
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

#: What a row's text can be: UTF-8 the reader decoded, so never a lone surrogate.
_TEXT = st.characters(blacklist_categories=("Cs",))

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_TEXT),
    st.sampled_from(["1.50", "-0.000", "12345678901234567890.5", '{"k": [1, "x"]}']).map(RawJson),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
_ROWS = st.one_of(
    st.none(),
    st.dictionaries(st.text(_TEXT, max_size=8), _VALUES, max_size=70),
    st.dictionaries(st.text(_TEXT, max_size=8), _SCALARS, max_size=70),
)


@given(_ROWS)
def test_the_mask_twins_agree_and_restore_every_raw_json(row: dict[str, Any] | None) -> None:
    mask = raw_json_mask_py(row, RawJson)
    if _speedups is not None:
        assert _speedups.raw_json_mask(row, RawJson) == mask
    if mask < 0:  # the row needs the tagged form: it holds a list, or too many values
        assert row is not None
        plain = (str, int, float, bool, RawJson, type(None))
        assert len(row) > 63 or any(type(v) not in plain for v in row.values())
        return
    back = restore_raw_json(orjson.loads(orjson.dumps(row)), mask)
    assert back == row
    if row is not None and back is not None:
        assert [type(v) for v in back.values()] == [type(v) for v in row.values()]


@pytest.mark.parametrize(
    ("row", "mask"),
    [
        ({"a": 1, "b": RawJson("1"), "c": "x", "d": RawJson("{}")}, 0b1010),
        ({f"c{i}": i for i in range(62)} | {"last": RawJson("1")}, 1 << 62),  # 63 values
        ({f"c{i}": i for i in range(63)} | {"last": RawJson("1")}, -1),  # 64: tagged instead
        ({"n": True, "x": 1.5, "s": "NaN"}, 0),  # a NaN numeric is text, not RawJson
        ({"nested": {"k": RawJson("1")}}, -1),
        ({"array": [RawJson("1")]}, -1),
        ({"subclass": type("Text", (str,), {})("x")}, -1),
    ],
)
def test_mask_edges(row: dict[str, object], mask: int) -> None:
    assert raw_json_mask_py(row, RawJson) == mask
    if _speedups is not None:
        assert _speedups.raw_json_mask(row, RawJson) == mask


def _change(new: Any, old: Any, *, key: tuple[int, int] = (0x20, 3), xid: int = 7) -> ChangeEvent:
    return ChangeEvent("o", key, "e", WHEN, TABLE, "UPDATE", new, old, ("b",), "u", None, xid)


@needs_c
@given(
    _ROWS,
    _ROWS,
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.integers(0, 2**64 - 1),
    st.floats(allow_nan=False),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**32 - 1),
)
def test_the_c_entry_is_the_python_entry(
    new: Any, old: Any, key: tuple[int, int], xid: int, now: float, micros: int, context: int
) -> None:
    event = _change(new, old, key=key, xid=xid)
    entry = change_entry_py(event, now, micros, context, CODEC)
    assert _speedups.change_entry(event, now, micros, context, CODEC) == entry
    fields = HEADER.unpack_from(entry)
    assert fields[:6] == (*key, now, micros, xid, context)
    assert (fields[6] == TAGGED) == (
        raw_json_mask_py(new, RawJson) < 0 or raw_json_mask_py(old, RawJson) < 0
    )


@pytest.mark.parametrize("use_c", [False, pytest.param(True, marks=needs_c)])
def test_an_entry_reads_back_as_its_event(use_c: bool) -> None:
    write = _speedups.change_entry if use_c else change_entry_py
    rows: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        ({"id": RawJson("7"), "title": "x", "doc": RawJson('{"a": 1}')}, {"id": RawJson("7")}),
        ({"tags": [RawJson("1"), "a"], "n": RawJson("2")}, None),  # tagged: an array
    ]
    for new, old in rows:
        event = _change(new, old)
        back = event_of(write(event, 1.5, micros_of(WHEN), 0, CODEC), "o", [(TABLE, "e")])
        assert back == event
        assert isinstance(back, ChangeEvent) and back.new is not None
        assert [type(v) for v in back.new.values()] == [type(v) for v in new.values()]


@needs_c
def test_the_c_entry_refuses_what_struct_refuses() -> None:
    good = _change({"a": 1}, None)
    with pytest.raises(TypeError):
        _speedups.change_entry(good, 1.0, 0, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _speedups.change_entry(("too", "short"), 1.0, 0, 0, CODEC)
    with pytest.raises(TypeError):
        _speedups.change_entry(good, 1.0, 0, 0, (RawJson, orjson.dumps))  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        _speedups.change_entry(_change({}, None, xid=-1), 1.0, 0, 0, CODEC)
    with pytest.raises(OverflowError):
        _speedups.change_entry(good, 1.0, 0, 2**32, CODEC)

    def not_bytes(body: object) -> bytes:
        return "text"  # type: ignore[return-value]

    with pytest.raises(TypeError):
        _speedups.change_entry(good, 1.0, 0, 0, (RawJson, not_bytes, orjson.dumps))
    with pytest.raises(TypeError):
        _speedups.raw_json_mask({}, "not a type")  # type: ignore[arg-type]


def test_without_the_extension_the_history_uses_the_twins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `gateway.entries` falls back to without a compiler writes what it reads."""
    import gateway.history

    monkeypatch.setattr(gateway.history, "change_entry", change_entry_py)
    monkeypatch.setattr(gateway.history, "append_change", None)  # its C append writes in C
    history = gateway.history.MemoryHistory()
    event = _change({"id": RawJson("7"), "title": "x"}, None)
    history.append(event)
    assert history.held("o") == [event]
    assert gateway.entries.change_entry_py is change_entry_py
