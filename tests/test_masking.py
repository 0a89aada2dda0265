"""Masks (spec §8): every type, the spec's examples, and the edge cases around them."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from gateway import masking
from gateway.config import ConfigError, MaskRule, TableConfig
from gateway.masking import REDACTED, MaskError, mask_value, resolve_custom
from gateway.policy import TablePolicy

CALLS: list[Any] = []


def last_four(value: Any) -> Any:
    """A custom mask used by the tests: `"fn = tests.test_masking:last_four"`."""
    CALLS.append(value)
    return "…" + str(value)[-4:]


def broken_mask(value: Any) -> Any:
    raise RuntimeError(f"cannot mask {value}")


class Masks:
    @staticmethod
    def upper(value: Any) -> Any:
        return str(value).upper()


NOT_CALLABLE = 42


def _rule(kind: str, fn: str | None = None) -> MaskRule:
    return MaskRule(type=kind, fn=fn)  # type: ignore[arg-type]


CASES: list[tuple[str, Any, Any]] = [
    # email
    ("email", "paul@example.com", "p***@e******.com"),
    ("email", "a@b.io", "a*@b*.io"),
    ("email", "a@mail.example.co.uk", "a*@m**************.uk"),
    ("email", "first.last+tag@sub.example.org", "f*************@s**********.org"),
    ("email", "zoë@exämple.de", "z**@e******.de"),
    ("email", "@example.com", "*@e******.com"),
    ("email", "paul@.com", "p***@*.com"),
    ("email", '"odd@local"@example.com', '"**********@e******.com'),
    ("email", "not-an-email", "not-an-email"),
    ("email", "paul@localhost", "paul@localhost"),
    ("email", 12345, 12345),
    # phone, ssn, creditCard
    ("ssn", "123-45-6789", "*****6789"),
    ("ssn", "123", "123"),
    ("ssn", "1-2-3", "1-2-3"),
    ("ssn", "12-34", "1234"),
    ("phone", "+1 (555) 010-9999", "*******9999"),
    ("phone", "call me", "call me"),
    ("phone", "٠١٢٣٤٥", "**٢٣٤٥"),
    ("creditCard", "4111 1111 1111 1111", "************1111"),
    ("creditCard", 4111111111111111, "************1111"),
    ("creditCard", 123, 123),
    ("phone", Decimal("5550100.25"), "*****0025"),
    ("phone", -98765, "*8765"),
    ("ssn", True, True),
    # name
    ("name", "John Doe", "J*** D**"),
    ("name", "J", "J*"),
    ("name", "Al B", "A* B*"),
    ("name", "Zoë Ångström", "Z** Å*******"),
    ("name", "  Mary  Jane ", "  M***  J*** "),
    ("name", "Anne-Marie\tO'Neil", "A*********\tO*****"),
    ("name", "李小龍", "李**"),
    ("name", "   ", "   "),
    ("name", 1234, "1***"),
    ("name", False, "f****"),
    ("name", Decimal("1.50"), "1***"),
    # redact
    ("redact", "anything at all", REDACTED),
    ("redact", 0, REDACTED),
    ("redact", False, REDACTED),
    ("redact", {"nested": [1, 2]}, REDACTED),
]


@pytest.mark.parametrize(("kind", "value", "expected"), CASES)
def test_masks(kind: str, value: Any, expected: Any) -> None:
    assert mask_value(_rule(kind), value) == expected


@pytest.mark.parametrize("kind", ["email", "phone", "ssn", "creditCard", "name", "redact"])
def test_null_and_empty_are_never_masked(kind: str) -> None:
    assert mask_value(_rule(kind), None) is None
    assert mask_value(_rule(kind), "") == ""


def test_unchanged_values_keep_their_type() -> None:
    assert mask_value(_rule("ssn"), 123) == 123
    assert isinstance(mask_value(_rule("ssn"), 123), int)
    assert mask_value(_rule("email"), Decimal("1.5")) == Decimal("1.5")


def test_lengths_count_characters_not_bytes() -> None:
    masked = mask_value(_rule("name"), "Ångström")
    assert masked == "Å*******"
    assert len(masked) == len("Ångström")
    assert len("Ångström".encode()) > len("Ångström")


def test_json_values_are_masked_on_their_json_text() -> None:
    assert mask_value(_rule("name"), {"a": 1}) == "{**** 1*"
    assert mask_value(_rule("phone"), [1, 2, 3, 4, 5]) == "*2345"


# -- custom -------------------------------------------------------------------------------


def test_custom_fn_is_called_with_the_value_as_is() -> None:
    CALLS.clear()
    rule = _rule("custom", "tests.test_masking:last_four")
    assert mask_value(rule, "123-45-6789") == "…6789"
    assert mask_value(rule, 4111111111111111) == "…1111"
    assert CALLS == ["123-45-6789", 4111111111111111]


def test_custom_fn_never_sees_null_or_empty() -> None:
    CALLS.clear()
    rule = _rule("custom", "tests.test_masking:last_four")
    assert mask_value(rule, None) is None
    assert mask_value(rule, "") == ""
    assert CALLS == []


def test_custom_fn_is_resolved_once() -> None:
    rule = _rule("custom", "tests.test_masking:last_four")
    first = resolve_custom(rule)
    assert first is last_four
    assert resolve_custom(_rule("custom", "tests.test_masking:last_four")) is first
    assert masking._custom_cache["tests.test_masking:last_four"] is last_four


def test_custom_fn_may_be_a_dotted_attribute() -> None:
    rule = _rule("custom", "tests.test_masking:Masks.upper")
    assert mask_value(rule, "abc") == "ABC"


def test_custom_fn_that_raises_redacts_and_logs_no_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rule = _rule("custom", "tests.test_masking:broken_mask")
    with caplog.at_level(logging.WARNING, logger="gateway.masking"):
        assert mask_value(rule, "secret-value-123") == REDACTED
    assert "RuntimeError" in caplog.text
    assert "secret-value-123" not in caplog.text


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("tests.no_such_module:fn", "cannot be imported"),
        ("tests.test_masking:no_such_fn", "cannot be imported"),
        ("tests.test_masking:Masks.nope", "cannot be imported"),
        ("tests.test_masking:NOT_CALLABLE", "not callable"),
        (":fn", "must look like"),
        ("tests.test_masking:", "must look like"),
    ],
)
def test_unresolvable_custom_fn(fn: str, message: str) -> None:
    rule = _rule("custom", fn)
    with pytest.raises(MaskError, match=message) as info:
        resolve_custom(rule)
    assert fn in str(info.value)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(MaskError):
        mask_value(rule, "x")


def test_resolve_custom_needs_a_fn() -> None:
    with pytest.raises(MaskError):
        resolve_custom(_rule("email"))


def test_policy_shares_the_row_with_a_viewer_who_sees_it_all_and_masks_a_copy() -> None:
    table = TableConfig.model_validate(
        {"masking": {"ssn": {"type": "ssn", "show": {"roles": ["admin"]}}}}
    )
    policy = TablePolicy(table)
    row = {"id": 1, "ssn": "123-45-6789"}
    everything = policy.raw_columns(frozenset({"admin"}))
    assert policy.shape(row, everything) is row  # nothing to hide: no copy per frame
    masked = policy.shape(row, policy.raw_columns(frozenset({"member"})))
    assert masked == {"id": 1, "ssn": mask_value(table.masking["ssn"], "123-45-6789")}
    assert masked["ssn"] != "123-45-6789" and row["ssn"] == "123-45-6789"
