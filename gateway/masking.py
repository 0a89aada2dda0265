"""Column masks: what a subscriber without `show` rights sees instead of the value.

The rules, shared by every mask type:

- `None` is never masked; an empty string stays empty (also for `redact` and `custom`).
- A non-string value is masked on its text form: `str(value)`, except booleans (`"true"` /
  `"false"`, as PostgreSQL prints them) and lists/dicts (their JSON text). A masked value is
  always a string; a value a rule leaves *unchanged* is returned as it came, type and all.
- Lengths are counted in characters (code points), never in bytes.

Per type:

- ``email``: split at the last ``@``; the domain splits at its last dot into name and TLD. Keep
  the first character of the local part and of the name, star the rest (at least one star
  each), keep the dot and the TLD. Dots inside the name are starred too, so subdomains do not
  leak: ``a@mail.example.co.uk`` → ``a*@m**************.uk``. No ``@``, or no dot in the domain
  → unchanged. An empty local part or name becomes a single star.
- ``phone``, ``ssn``, ``creditCard``: keep the decimal digits only; fewer than 4 → unchanged;
  else one star per digit but the last 4 (``123-45-6789`` → ``*****6789``).
- ``name``: each word (a run of non-whitespace) → its first character plus one star per further
  character, at least one; the whitespace between words is kept (``John Doe`` → ``J*** D**``).
- ``redact``: ``[REDACTED]``.
- ``custom``: ``fn = "package.module:function"`` is imported once (`resolve_custom`, at
  config-load time, raising `MaskError`), cached, and called with the value as it came. If it
  raises, the value is replaced by ``[REDACTED]`` and the error type is logged (never the
  value): a broken mask must neither crash the fan-out nor let the raw value through.

Everything here is pure; which columns a visibility class sees raw is `gateway.policy`'s job,
and it calls `mask_value` once per class and event, never once per subscriber.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from typing import Any

from gateway.config import MaskRule
from gateway.errors import MaskError

__all__ = [
    "REDACTED",
    "MaskError",
    "mask_value",
    "resolve_custom",
    "text_form",
]

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
_STAR = "*"
_KEEP_DIGITS = 4

_custom_cache: dict[str, Callable[[Any], Any]] = {}


def text_form(value: Any) -> str:
    """The text a non-string value is masked on (numbers as PostgreSQL prints them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return str(value)


def _starred(part: str) -> str:
    """First character kept, every other one starred; at least one star."""
    return part[:1] + _STAR * max(1, len(part) - 1)


def _mask_email(value: Any) -> Any:
    text = text_form(value)
    local, at, domain = text.rpartition("@")
    if not at:
        return value
    name, dot, tld = domain.rpartition(".")
    if not dot:
        return value
    return f"{_starred(local)}@{_starred(name)}.{tld}"


def _mask_digits(value: Any) -> Any:
    digits = [char for char in text_form(value) if char.isdecimal()]
    if len(digits) < _KEEP_DIGITS:
        return value
    return _STAR * (len(digits) - _KEEP_DIGITS) + "".join(digits[-_KEEP_DIGITS:])


def _mask_name(value: Any) -> Any:
    text = text_form(value)
    out: list[str] = []
    word_start = None
    for index, char in enumerate(text):
        if char.isspace():
            if word_start is not None:
                out.append(_starred(text[word_start:index]))
                word_start = None
            out.append(char)
        elif word_start is None:
            word_start = index
    if word_start is not None:
        out.append(_starred(text[word_start:]))
    return "".join(out)


def _redact(value: Any) -> Any:
    return REDACTED


_MASKS: dict[str, Callable[[Any], Any]] = {
    "email": _mask_email,
    "phone": _mask_digits,
    "ssn": _mask_digits,
    "creditCard": _mask_digits,
    "name": _mask_name,
    "redact": _redact,
}


def resolve_custom(rule: MaskRule) -> Callable[[Any], Any]:
    """Import and cache the callable a custom rule names (`"package.module:function"`).

    The part after the colon may be dotted (`"pkg.mod:Class.method"`).

    Raises:
        MaskError: the rule has no fn, the module or attribute is missing, or it is not callable.
    """
    spec = rule.fn
    if not spec:
        raise MaskError(f"mask type {rule.type!r} has no fn to resolve")
    cached = _custom_cache.get(spec)
    if cached is not None:
        return cached
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MaskError(f'custom mask fn {spec!r} must look like "package.module:function"')
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise MaskError(f"custom mask fn {spec!r} cannot be imported: {exc}") from None
    if not callable(target):
        raise MaskError(f"custom mask fn {spec!r} is not callable")
    _custom_cache[spec] = target
    return target


def _mask_custom(rule: MaskRule, value: Any) -> Any:
    fn = resolve_custom(rule)
    try:
        return fn(value)
    except Exception as exc:
        logger.warning("custom mask %s raised %s; value redacted", rule.fn, type(exc).__name__)
        return REDACTED


def mask_value(rule: MaskRule, value: Any) -> Any:
    """The masked form of `value` under `rule` (see the module docstring)."""
    if value is None or (isinstance(value, str) and not value):
        return value
    if rule.type == "custom":
        return _mask_custom(rule, value)
    return _MASKS[rule.type](value)
