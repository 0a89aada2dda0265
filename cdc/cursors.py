"""Event cursors: the opaque, ordered `id` of every event.

An id is the commit LSN of the event's transaction and the event's 1-based position in it:
`00000000016B3748-0003`. Changes and broadcasts (logical messages) share this space, so one
cursor orders everything a client can receive. Positions up to 0xFFFE take four hex digits;
larger ones are written `FFFF` followed by sixteen hex digits of `position - 0xFFFF`, which keeps
plain string order equal to commit order for clients that compare ids as strings.
"""

from __future__ import annotations

import re

__all__ = ["CursorKey", "format_cursor", "parse_cursor"]

CursorKey = tuple[int, int]
"""(commit_lsn, position): the comparable form of a cursor."""

_WIDE = 0xFFFF
_CURSOR = re.compile(r"([0-9A-F]{16})-([0-9A-F]{4}|FFFF[0-9A-F]{16})")


def format_cursor(commit_lsn: int, position: int) -> str:
    if position < _WIDE:
        return f"{commit_lsn:016X}-{position:04X}"
    return f"{commit_lsn:016X}-FFFF{position - _WIDE:016X}"


def parse_cursor(text: str) -> CursorKey | None:
    """The key of a well-formed cursor, or None for anything else (never raises)."""
    match = _CURSOR.fullmatch(text)
    if match is None:
        return None
    lsn_hex, pos_hex = match.groups()
    position = int(pos_hex, 16) if len(pos_hex) == 4 else _WIDE + int(pos_hex[4:], 16)
    return int(lsn_hex, 16), position
