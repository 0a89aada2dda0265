"""Fan-out: serialize and frame an event once per visibility class, write the same bytes to
every socket of that class.

Writing never awaits a client. Frames queued for a socket during one event-loop turn are
written to its transport together at the end of that turn (one `transport.write`, so one
send(2), per socket per turn instead of one per frame: under load, when many events are
published in one turn, that is what makes fan-out cheaper than a loop of `send_str`; see
docs/benchmarks.md). Order is kept: a socket's frames go out in the order queued, and
`close()` writes what is queued before the close frame. A socket whose transport buffer is past
`max_send_buffer` after a write is a slow consumer: it is closed with 1013 and counted, and
nobody else waits for it. There is no other back-pressure: the reader's slot acknowledgement
does not depend on any socket (history, not sockets, keeps events for resume).

Frames are built here rather than by aiohttp so that one `bytes` object serves every socket of
a class. Sockets are opened without per-message compression, so a server frame is just
RFC 6455 §5.2's header followed by the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["CLOSE_SLOW_CONSUMER", "Connection", "text_frame"]

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER = 1013  #: RFC 6455 §7.4.1 "Try Again Later": the send buffer overflowed

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (text), RFC 6455 §5.2


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client text frame carrying `payload` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return _SHORT.pack(_FIN_TEXT, size) + payload
    if size < 1 << 16:
        return _MEDIUM.pack(_FIN_TEXT, 126, size) + payload
    return _LONG.pack(_FIN_TEXT, 127, size) + payload


class Connection:
    """One subscriber socket, as the hubs see it."""

    __slots__ = (
        "_on_slow",
        "_pending",
        "_transport",
        "closed",
        "max_send_buffer",
        "organization_id",
        "roles",
        "session_id",
        "user_id",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        *,
        user_id: str,
        organization_id: str,
        roles: frozenset[str],
        session_id: str | None,
        max_send_buffer: int,
        on_slow: Callable[[Connection], None],
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.user_id = user_id
        self.organization_id = organization_id
        self.roles = roles
        self.session_id = session_id
        self.max_send_buffer = max_send_buffer
        self._on_slow = on_slow
        self._pending: list[bytes] | None = None  #: frames queued this turn, not yet written
        self.closed = False

    def write(self, frame: bytes) -> bool:
        """Queue one frame, written at the end of this loop turn; False if the socket is gone."""
        if self.closed:
            return False
        pending = self._pending
        if pending is not None:
            pending.append(frame)
            return True
        if self._transport.is_closing():
            self.closed = True
            return False
        self._pending = [frame]
        _flush_later(self)
        return True

    def flush(self) -> None:
        """Write the queued frames now; close the socket (1013) if its buffer is then too full."""
        if self._write_pending() and self._transport.get_write_buffer_size() > self.max_send_buffer:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            self._on_slow(self)

    def _write_pending(self) -> bool:
        pending, self._pending = self._pending, None
        if not pending or self.closed:
            return False
        transport = self._transport
        if transport.is_closing():
            self.closed = True
            return False
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        return True

    def close(self, code: int, reason: str) -> None:
        """Write what is queued, stop writing, and close the socket in the background."""
        if self.closed:
            return
        self._write_pending()
        self.closed = True
        task = asyncio.get_running_loop().create_task(self._close(code, reason))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), 2.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            # A client that does not read will never take the close frame: drop it.
            with contextlib.suppress(Exception):
                self._transport.abort()

    def __repr__(self) -> str:
        roles = ",".join(sorted(self.roles))
        return f"<Connection user={self.user_id} org={self.organization_id} roles={roles}>"


_closing: set[asyncio.Task[Any]] = set()

# The connections with frames queued in the current loop turn, flushed by one callback.
_batch: list[Connection] | None = None
_batch_loop: asyncio.AbstractEventLoop | None = None


def _flush_later(conn: Connection) -> None:
    global _batch, _batch_loop
    loop = asyncio.get_running_loop()
    if _batch is None or _batch_loop is not loop:  # a batch of a closed loop is dropped
        _batch, _batch_loop = [], loop
        loop.call_soon(_flush_batch, _batch)
    _batch.append(conn)


def _flush_batch(batch: list[Connection]) -> None:
    global _batch
    if _batch is batch:
        _batch = None
    for conn in batch:
        conn.flush()
