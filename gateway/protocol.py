"""The client protocol's vocabulary: close codes and every message the server sends.

One place builds each outbound shape, so the wire format can be read (and changed) here and
nowhere else. Builders return the JSON payload (`bytes`); `gateway.fanout.text_frame` wraps it
into a WebSocket frame once, and that frame is written to every socket that should receive it.

Messages (server → client, one JSON text frame each):

* ``postgres_changes``: a row change, already masked for one visibility class;
* ``broadcast``: a custom event, or ``auth:token-invalidated`` just before a 4403 close;
* ``system``: ``ready``, ``resync_required``, ``error``.
"""

from __future__ import annotations

import struct
from datetime import datetime
from enum import IntEnum
from functools import lru_cache
from typing import Any

import orjson

from cdc.render import dumps
from gateway.events import BroadcastEvent, ChangeEvent
from gateway.policy import TablePolicy

__all__ = [
    "CloseCode",
    "broadcast_message",
    "change_message",
    "error_frame",
    "revoked_frame",
    "system_frame",
    "text_frame",
]


_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (text), RFC 6455 §5.2


class CloseCode(IntEnum):
    """WebSocket close codes the server uses."""

    #: RFC 6455 §7.4.1: the server is shutting down (SIGTERM).
    GOING_AWAY = 1001
    #: RFC 6455 §7.4.1: the client sent something the protocol does not allow.
    POLICY_VIOLATION = 1008
    #: RFC 6455 §7.4.1 "Try Again Later": a slow consumer whose send buffer overflowed, or a
    #: resume whose history could not be read. Reconnect with ``since``.
    TRY_AGAIN_LATER = 1013
    #: walcast: the user lost access (role change, membership or session removed).
    ACCESS_REVOKED = 4403


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client text frame carrying `payload` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return _SHORT.pack(_FIN_TEXT, size) + payload
    if size < 1 << 16:
        return _MEDIUM.pack(_FIN_TEXT, 126, size) + payload
    return _LONG.pack(_FIN_TEXT, 127, size) + payload


def system_frame(event: str, payload: dict[str, Any]) -> bytes:
    """A ``system`` event (``ready``, ``resync_required``, ``error``) as a ready frame."""
    return text_frame(orjson.dumps({"type": "system", "event": event, "payload": payload}))


def error_frame(message: str) -> bytes:
    """A ``system`` ``error`` event: the client sent something the server does not understand."""
    return system_frame("error", {"message": message})


def revoked_frame(reason: str) -> bytes:
    """The ``auth:token-invalidated`` notice a socket gets just before it is closed with 4403."""
    body = {"type": "broadcast", "event": "auth:token-invalidated", "payload": {"reason": reason}}
    return text_frame(orjson.dumps(body))


def change_message(event: ChangeEvent, policy: TablePolicy, raw: frozenset[str]) -> bytes:
    """A ``postgres_changes`` event as one visibility class sees it (`raw`: unmasked columns)."""
    table = event.table
    body: dict[str, Any] = {
        "type": "postgres_changes",
        "table": table.table_name,
        "schema": table.schema_name,
        "eventType": event.event_type,
        "new": policy.shape(event.new, raw),
        "old": policy.shape(event.old, raw),
        "id": event.cursor,
        "commitTimestamp": _commit_stamp(event.commit_time),
    }
    if event.unchanged:
        body["unchanged"] = policy.visible_unchanged(event.unchanged)
    return dumps(body)


@lru_cache(maxsize=64)
def _commit_stamp(when: datetime) -> str:
    """The commit time as frames spell it. Cached: a transaction's changes, and the visibility
    classes of each, share it, and `strftime` costs more than the rest of a small frame."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def broadcast_message(event: BroadcastEvent) -> bytes:
    """A custom ``broadcast`` event: the same bytes for every recipient."""
    return orjson.dumps(
        {"type": "broadcast", "event": event.event, "payload": event.payload, "id": event.cursor}
    )
