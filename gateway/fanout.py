"""Fan-out: serialize and frame an event once per visibility class, write the same bytes to
every socket of that class.

Writing never awaits a client. A frame is queued, and a *write pass* later writes everything
queued to each socket with one `transport.write` (one send(2)) per socket. On this machine a
send(2) costs ≈9 µs whatever its size (docs/benchmarks.md), so fan-out is as fast as the passes
are few:

* An `Audience` is the sockets of one visibility class of one hub. A frame queued for an
  audience is stored once; the pass joins the audience's frames once and writes the same bytes
  to every member, so the per-socket cost of an event is nothing until the pass.
* A frame for one socket only (replay, `ready`, a user-targeted event, an owner-rule frame, a
  pong) is queued on its `Connection`. Order is kept: such a frame first takes over the
  audience frames the socket has not got yet, and a socket that joins an audience does not get
  the frames queued there before it joined (its replay already has them).
* The `WriteScheduler` runs a pass on the next loop turn, or, if the last pass ended less than
  `coalesce` seconds ago, that long after it. An idle gateway writes at once; a busy one writes
  at most once per pass duration plus `coalesce`, each socket's frames together.

`close()` writes what is queued before the close frame. A socket whose transport buffer is past
`max_send_buffer` after a write is a slow consumer: it is closed with 1013 and counted, and
nobody else waits for it. There is no other back-pressure: the reader's slot acknowledgement
does not depend on any socket (history, not sockets, keeps events for resume).

What a socket costs the server is its transport's buffer: the bytes the kernel would not take,
copied (the shared frames are shared only until then). So no more than `max_send_buffer` is
handed to a transport at once: a pass bigger than that goes in whole frames, in pieces of at
most the limit, and stops as soon as the buffer is past it. A socket therefore holds at most
about twice `max_send_buffer` (the limit, plus one piece) until it is closed. A replay
(`gateway.hubs`) writes through the same `Connection` and waits for the socket to drain.

Frames are built here rather than by aiohttp so that one `bytes` object serves every socket of
a class. Sockets are opened without per-message compression, so a server frame is just
RFC 6455 §5.2's header followed by the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from aiohttp import web

from gateway.protocol import CloseCode
from gateway.subscriptions import ALL, Subscription

__all__ = [
    "DEFAULT_COALESCE_SECONDS",
    "Audience",
    "Connection",
    "WriteScheduler",
]

log = logging.getLogger(__name__)

DEFAULT_COALESCE_SECONDS = 0.0005


def _joined(frames: list[bytes]) -> bytes:
    return frames[0] if len(frames) == 1 else b"".join(frames)


def _pieces(frames: list[bytes], limit: int) -> Iterator[bytes]:
    """`frames` joined into pieces of at most `limit` bytes (a bigger frame is a piece alone)."""
    piece: list[bytes] = []
    size = 0
    for frame in frames:
        if piece and size + len(frame) > limit:
            yield _joined(piece)
            piece, size = [], 0
        piece.append(frame)
        size += len(frame)
    if piece:
        yield _joined(piece)


class _Flushable(Protocol):
    def flush(self) -> None: ...


class WriteScheduler:
    """Runs the write passes: everything queued since the last pass, one write per socket."""

    __slots__ = ("_dirty", "_last_pass_end", "_loop", "_observe", "coalesce")

    def __init__(
        self,
        coalesce: float = DEFAULT_COALESCE_SECONDS,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.coalesce = coalesce
        self._observe = observe  #: called with each pass's duration, seconds
        self._dirty: list[_Flushable] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_pass_end = float("-inf")

    def mark(self, item: _Flushable) -> None:
        """Flush `item` in the next pass (called once per pass, when it first queues)."""
        dirty = self._dirty
        if dirty is None or self._loop is None or self._loop.is_closed():
            loop = asyncio.get_running_loop()
            dirty = self._dirty = []
            self._loop = loop
            when = self._last_pass_end + self.coalesce
            if when <= loop.time():
                loop.call_soon(self._run_pass, dirty)
            else:
                loop.call_at(when, self._run_pass, dirty)
        dirty.append(item)

    def flush_now(self) -> None:
        """Run the pending pass now (before closing sockets, say) rather than when scheduled."""
        if self._dirty is not None:
            self._run_pass(self._dirty)

    def _run_pass(self, dirty: list[_Flushable]) -> None:
        if self._dirty is dirty:
            self._dirty = None
        if not dirty or self._loop is None:
            return
        started = self._loop.time()
        for item in dirty:
            item.flush()
        dirty.clear()  # run once: a pass run early by flush_now leaves its callback nothing
        self._last_pass_end = self._loop.time()
        if self._observe is not None:
            self._observe(self._last_pass_end - started)


class Audience:
    """The sockets of one visibility class of one hub: they all get the same frames."""

    __slots__ = ("_frames", "_writes", "members")

    def __init__(self, writes: WriteScheduler) -> None:
        self._writes = writes
        self.members: set[Connection] = set()
        self._frames: list[bytes] | None = None  #: queued for every member since the last pass

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self.members)

    def add(self, conn: Connection) -> None:
        """Make `conn` a member; it gets the frames queued from now on, not those before."""
        conn._audience = self
        conn._seen = len(self._frames) if self._frames else 0
        self.members.add(conn)

    def discard(self, conn: Connection) -> None:
        self.members.discard(conn)
        if conn._audience is self:
            conn._audience = None

    def write(self, frame: bytes) -> int:
        """Queue `frame` for every member; returns how many that is."""
        members = len(self.members)
        if members:
            frames = self._frames
            if frames is None:
                self._frames = [frame]
                self._writes.mark(self)
            else:
                frames.append(frame)
        return members

    def flush(self) -> None:
        frames = self._frames
        if not frames:
            return
        shared = _joined(frames)
        size = len(shared)
        slow = []
        for conn in self.members:
            if conn._pending is not None or conn._seen:
                own = conn._take()  # its own frames and this pass's, in the order queued
                conn._seen = 0
                if own is not None and conn._send(own):
                    slow.append(conn)
            elif not conn.closed:
                # The common case: nothing of its own this pass. This runs once per socket per
                # pass, so `_send` is written out here for a pass within the socket's limit.
                transport, limit = conn._transport, conn.max_send_buffer
                if transport.is_closing():
                    conn.closed = True
                elif size > limit:
                    if conn._write(frames, shared):
                        slow.append(conn)
                else:
                    transport.write(shared)
                    if transport.get_write_buffer_size() > limit:
                        slow.append(conn)
        self._frames = None
        # Closed only now: `close()` writes what is still queued for the socket, and while
        # `_frames` was set that would have been this pass's frames a second time.
        for conn in slow:
            conn.close_slow()


class Connection:
    """One subscriber socket, as the hubs see it."""

    __slots__ = (
        "_audience",
        "_on_slow",
        "_pending",
        "_pending_size",
        "_seen",
        "_transport",
        "_writes",
        "closed",
        "max_send_buffer",
        "organization_id",
        "roles",
        "session_id",
        "subscription",
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
        writes: WriteScheduler,
        subscription: Subscription = ALL,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.user_id = user_id
        self.organization_id = organization_id
        self.roles = roles
        #: Which tables and rows of them it asked for (`gateway.subscriptions`).
        self.subscription = subscription
        self.session_id = session_id
        self.max_send_buffer = max_send_buffer
        self._on_slow = on_slow
        self._writes = writes
        self._pending: list[bytes] | None = None  #: this socket's own frames, not yet written
        self._pending_size = 0  #: their bytes
        self._audience: Audience | None = None
        self._seen = 0  #: how many of its audience's queued frames are accounted for
        self.closed = False

    def write(self, frame: bytes) -> bool:
        """Queue one frame for this socket only; False if the socket is gone."""
        if self.closed:
            return False
        pending = self._pending
        if pending is None:
            if self._transport.is_closing():
                self.closed = True
                return False
            pending = self._pending = []
            self._writes.mark(self)
        unseen = self._unseen()
        if unseen:
            pending.extend(unseen)  # queued before this frame: sent before it
        pending.append(frame)
        self._pending_size += len(frame)
        return True

    @property
    def queued(self) -> int:
        """Bytes of this socket's own frames not yet handed to its transport."""
        return self._pending_size

    @property
    def buffered(self) -> int:
        """Bytes its transport holds: written, not yet taken by the kernel."""
        return self._transport.get_write_buffer_size()

    def flush(self) -> None:
        """Write what is queued for this socket now; close it (1013) if it is a slow consumer."""
        frames = self._take()
        if frames is not None and self._send(frames):
            self.close_slow()

    def write_now(self) -> None:
        """Hand what is queued for this socket to its transport now, without judging it: a
        replay queues at most half the limit (plus a frame) at a time, and waits for the
        socket to drain before it queues more."""
        frames = self._take()
        if frames is not None and not self.closed and not self._transport.is_closing():
            self._transport.write(_joined(frames))

    def _take(self) -> list[bytes] | None:
        """Everything queued for this socket, in order; it is then no longer queued."""
        pending, self._pending = self._pending, None
        self._pending_size = 0
        unseen = self._unseen()
        if unseen:
            pending = unseen if pending is None else pending + unseen
        return pending or None

    def _unseen(self) -> list[bytes] | None:
        """The audience frames queued this pass that this socket has not taken yet; now taken."""
        audience = self._audience
        frames = audience._frames if audience is not None else None
        if frames is None or self._seen >= len(frames):
            return None
        unseen = frames[self._seen :]
        self._seen = len(frames)
        return unseen

    def _send(self, frames: list[bytes], joined: bytes | None = None) -> bool:
        """Write `frames` (`joined`: the same, already joined); True if the socket's buffer is
        now past its limit."""
        if self.closed:
            return False
        if self._transport.is_closing():
            self.closed = True
            return False
        return self._write(frames, joined)

    def _write(self, frames: list[bytes], joined: bytes | None = None) -> bool:
        """Hand `frames` to the transport, at most the limit at once, and stop once its buffer
        is past the limit (True): what it holds stays about twice the limit at most."""
        transport, limit = self._transport, self.max_send_buffer
        size = len(joined) if joined is not None else sum(map(len, frames))
        if size <= limit:
            transport.write(joined if joined is not None else _joined(frames))
            return transport.get_write_buffer_size() > limit
        for piece in _pieces(frames, limit):
            transport.write(piece)
            if transport.get_write_buffer_size() > limit:
                return True
        return False

    def close_slow(self) -> None:
        """Close a socket whose buffer overflowed (1013) and count it."""
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")
        self._on_slow(self)

    def close(self, code: int, reason: str) -> None:
        """Write what is queued, stop writing, and close the socket in the background."""
        if self.closed:
            return
        frames = self._take()
        self.closed = True
        if frames is not None and not self._transport.is_closing():
            self._write(frames)
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
