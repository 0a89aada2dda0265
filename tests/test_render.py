"""cdc.render: orjson output with RawJson embedded verbatim."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

import pytest

from cdc.render import RawJson, dumps


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-(2**63), b"-9223372036854775808"),
        (2**63 - 1, b"9223372036854775807"),
        ("text", b'"text"'),
        ('quote " back \\ nl \n tab \t', b'"quote \\" back \\\\ nl \\n tab \\t"'),
        ("é ✓ 😀", '"é ✓ 😀"'.encode()),
        ([], b"[]"),
        ({}, b"{}"),
        ([1, None, [2, [3]]], b"[1,null,[2,[3]]]"),
        ({"a": {"b": [True]}}, b'{"a":{"b":[true]}}'),
    ],
)
def test_plain_values(value: object, expected: bytes) -> None:
    assert dumps(value) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1.50",
        "0.000",
        "-12.5",
        "123456789012345678901234567890.123456789012345678901234567890",
        "100000000000000000000000000000000000000",
        '{"a": [1, 2.50, null], "b": "x"}',
        "[1,  2 ,3]",
        '"a string"',
        "null",
    ],
)
def test_raw_json_is_embedded_verbatim(text: str) -> None:
    assert dumps(RawJson(text)) == text.encode()
    assert dumps({"v": RawJson(text)}) == b'{"v":' + text.encode() + b"}"
    assert (
        dumps([RawJson(text), RawJson(text)]) == b"[" + text.encode() + b"," + text.encode() + b"]"
    )


def test_raw_json_keeps_every_digit() -> None:
    row = {"n": RawJson("1.50"), "big": RawJson("9007199254740993.000000000000000000001")}
    parsed = json.loads(dumps(row), parse_float=Decimal, parse_int=Decimal)
    assert str(parsed["n"]) == "1.50"
    assert str(parsed["big"]) == "9007199254740993.000000000000000000001"


def test_raw_json_is_a_str() -> None:
    raw = RawJson("1.50")
    assert isinstance(raw, str)
    assert raw == "1.50"
    assert repr(raw) == "RawJson('1.50')"
    # Plain strings with the same text stay JSON strings.
    assert dumps("1.50") == b'"1.50"'


def test_nested_row_shape() -> None:
    row = {
        "id": 1,
        "price": RawJson("10.00"),
        "tags": ["a", None],
        "meta": RawJson('{"k": 1}'),
        "addr": {"zip": "12345", "geo": [RawJson("1.5"), RawJson("2")]},
        "ratio": "NaN",
    }
    assert dumps(row) == (
        b'{"id":1,"price":10.00,"tags":["a",null],"meta":{"k": 1},'
        b'"addr":{"zip":"12345","geo":[1.5,2]},"ratio":"NaN"}'
    )


class _MyStr(str):
    pass


class _MyInt(int):
    pass


class _MyDict(dict[str, int]):
    pass


@pytest.mark.parametrize(
    "value",
    [
        object(),
        Decimal("1.5"),
        b"bytes",
        {1, 2},
        _MyStr("x"),
        _MyInt(1),
        _MyDict(a=1),
        2**64,
        {"nested": [object()]},
    ],
)
def test_unexpected_values_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        dumps(value)


def test_datetime_is_not_a_row_value_but_still_serializes() -> None:
    # Rows never hold datetimes (changes.py renders them as to_jsonb text); other callers of
    # dumps (event envelopes) get orjson's RFC 3339 output.
    assert dumps(datetime(2026, 1, 1, 10, 0, 0)) == b'"2026-01-01T10:00:00"'
