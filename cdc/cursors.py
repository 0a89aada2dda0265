"""Event cursors: the opaque, ordered `id` of every event.

An id is the commit LSN of the event's transaction, the event's 1-based position in it, and
the history epoch it belongs to: `00000000016B3748-0003-9f2c41ab`. Changes and broadcasts
(logical messages) share this space, so one cursor orders everything a client can receive.

* **Order.** Positions up to 0xFFFE take four hex digits; larger ones are written `FFFF`
  followed by sixteen hex digits of `position - 0xFFFF`. No LSN-and-position part is a prefix
  of another, so within one epoch plain string order is commit order, for clients that compare
  ids as strings. Across epochs, ids do not compare: a cursor of another epoch is not a place
  in this history at all.
* **Epoch.** The history a cursor points into: one database's WAL as one slot reads it
  (`cdc.identity`). LSNs of another database, or of the same database after a restored
  backup, mean other transactions, so `parse_cursor` answers None for a cursor of another
  epoch, exactly as for garbage: the caller treats both as "cannot resume from here"
  (``resync_required``), never as a place to resume from.
* **No epoch** (`NO_EPOCH`, the empty string) is the format of cursors made before epochs
  existed (`<LSN>-<position>`). No running history has it, so those cursors resync too; it is
  also what code that is not tied to a database (unit tests, benchmarks) uses.
"""

from __future__ import annotations

import re

__all__ = [
    "EPOCH_LENGTH",
    "NO_EPOCH",
    "CursorKey",
    "cursor_key",
    "format_cursor",
    "is_epoch",
    "parse_cursor",
    "split_cursor",
]

CursorKey = tuple[int, int]
"""(commit_lsn, position): the comparable form of a cursor within one epoch."""

NO_EPOCH = ""
"""The epoch of cursors written without one (see the module docstring)."""

EPOCH_LENGTH = 8
"""An epoch id is this many lowercase hex digits."""

_WIDE = 0xFFFF
_CURSOR = re.compile(r"([0-9A-F]{16})-((?!FFFF)[0-9A-F]{4}|FFFF[0-9A-F]{16})(?:-([0-9a-f]{8}))?")
_EPOCH = re.compile(r"[0-9a-f]{8}")


def is_epoch(text: str) -> bool:
    """Whether `text` is a well-formed epoch id (`NO_EPOCH` is not one)."""
    return _EPOCH.fullmatch(text) is not None


def format_cursor(commit_lsn: int, position: int, epoch: str = NO_EPOCH) -> str:
    """The cursor of the event at `position` in the transaction committed at `commit_lsn`."""
    if position < _WIDE:
        text = f"{commit_lsn:016X}-{position:04X}"
    else:
        text = f"{commit_lsn:016X}-FFFF{position - _WIDE:016X}"
    return f"{text}-{epoch}" if epoch else text


def parse_cursor(text: str, epoch: str = NO_EPOCH) -> CursorKey | None:
    """The key of `text` when it is a cursor of `epoch`; None for a cursor of another epoch
    (the old format included, unless `epoch` is `NO_EPOCH`) and for anything malformed.

    Never raises, whatever `text` is: a client's cursor is untrusted input.
    """
    if not isinstance(text, str) or len(text) > 46:  # the longest cursor, epoch included
        return None
    match = _CURSOR.fullmatch(text)
    if match is None or (match.group(3) or NO_EPOCH) != epoch:
        return None
    return _key(match)


def cursor_key(text: str) -> CursorKey | None:
    """The key of a well-formed cursor of any epoch, or None (never raises).

    For cursors walcast made itself, whose epoch is known to be the history's own; a
    client's cursor is read with `parse_cursor` and the history's epoch.
    """
    if not isinstance(text, str):
        return None
    match = _CURSOR.fullmatch(text)
    return None if match is None else _key(match)


def split_cursor(text: str) -> tuple[CursorKey, str] | None:
    """The key and the epoch of a well-formed cursor, or None (never raises): for cursors
    walcast made itself and stored (the Redis bus), read back into events."""
    if not isinstance(text, str):
        return None
    match = _CURSOR.fullmatch(text)
    return None if match is None else (_key(match), match.group(3) or NO_EPOCH)


def _key(match: re.Match[str]) -> CursorKey:
    lsn_hex, pos_hex = match.group(1), match.group(2)
    position = int(pos_hex, 16) if len(pos_hex) == 4 else _WIDE + int(pos_hex[4:], 16)
    return int(lsn_hex, 16), position
