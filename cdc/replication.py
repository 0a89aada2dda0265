"""Sans-IO streaming replication protocol: CopyData in, standby status updates out.

Why it exists: once `START_REPLICATION` has put the connection in CopyBoth mode, every
CopyData message from the server is either a WAL chunk ('w', XLogData, carrying one pgoutput
message) or a keepalive ('k'), and the client must answer with standby status updates ('r')
saying how far it has received and what the server may forget. This module is that framing
and the LSN bookkeeping behind it, with no sockets and no clocks (see "Streaming Replication
Protocol" in the PostgreSQL manual), so the transport stays a thin I/O loop.

State kept by `ReplicationProtocol`:

* `received_lsn`: the highest `data_start` of any XLogData received (for a logical walsender
  `wal_end` equals `data_start`). Reported as "written".
* `server_wal_end`: the server's WAL end from the latest XLogData or keepalive, for lag.
* `flush_lsn`: what the consumer has confirmed with `confirm()`; it never moves backwards.
  Reported as "flushed" and "applied": for a logical slot the server takes it as the slot's
  confirmed position and may discard WAL before it. The "written" position reported is never
  below it.
* a pending reply: a keepalive asking for a reply makes `status_due()` true until the next
  `status_update()`, whatever the interval.

Deciding what to confirm (the end of a completed transaction, or a keepalive's WAL end when
nothing is pending) is the reader's job, not this module's.

Times: the protocol's timestamps are microseconds since 2000-01-01 00:00 UTC. `send_time` is
kept as that integer (it is parsed for every message); `pg_time_to_datetime` converts it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cdc.errors import ProtocolError

__all__ = [
    "PG_EPOCH",
    "CopyKind",
    "Keepalive",
    "ReplicationProtocol",
    "XLogData",
    "build_status_update",
    "datetime_to_pg_time",
    "parse_copy_data",
    "pg_time_to_datetime",
]

#: The instant PostgreSQL counts its timestamps from.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_XLOG_HEAD = struct.Struct("!QQq")  # data_start, wal_end, send_time
_KEEPALIVE = struct.Struct("!QqB")  # wal_end, send_time, reply_requested
_STATUS = struct.Struct("!BQQQqB")  # 'r', written, flushed, applied, client time, reply


class CopyKind(enum.IntEnum):
    """The first byte of a CopyData message in CopyBoth mode ("Streaming Replication Protocol")."""

    XLOG_DATA = ord("w")  #: server → client: XLogData, a chunk of WAL (one pgoutput message)
    KEEPALIVE = ord("k")  #: server → client: primary keepalive message
    STANDBY_STATUS = ord("r")  #: client → server: standby status update


class XLogData(NamedTuple):
    """One WAL chunk. A NamedTuple, not a frozen dataclass: there is one per row change, and
    a tuple is made in a third of the time (docs/benchmarks.md §1)."""

    data_start: int  #: WAL position of the data in this message
    wal_end: int  #: the server's current end of WAL
    send_time: int  #: server clock at transmission, µs since 2000-01-01 UTC
    payload: bytes  #: the pgoutput message


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int  #: the server's current end of WAL
    send_time: int  #: server clock at transmission, µs since 2000-01-01 UTC
    reply_requested: bool  #: the server wants a status update now (or it times us out)


def pg_time_to_datetime(micros: int) -> datetime:
    """Convert a protocol timestamp to an aware UTC datetime.

    Raises:
        ProtocolError: the value is outside what `datetime` can hold.
    """
    try:
        return PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ProtocolError(f"timestamp out of range: {micros}") from None


def datetime_to_pg_time(when: datetime) -> int:
    """Convert an aware datetime to microseconds since 2000-01-01 UTC.

    Raises:
        ValueError: `when` is naive.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("a naive datetime has no defined instant; pass an aware one")
    delta = when - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_copy_data(data: bytes | memoryview) -> XLogData | Keepalive:
    """Parse one server CopyData message ('w' or 'k').

    Raises:
        ProtocolError: empty, truncated, of another kind, or (keepalive) with extra bytes.
    """
    buf = data if type(data) is bytes else bytes(data)
    message = _xlog_data(buf, XLogData)
    if message is not None:
        return message
    if not buf:
        raise ProtocolError("empty CopyData message")
    kind = buf[0]
    if kind == CopyKind.XLOG_DATA:  # a whole one was read above
        raise ProtocolError(f"truncated XLogData: {len(buf)} bytes")
    if kind == CopyKind.KEEPALIVE:
        if len(buf) != 1 + _KEEPALIVE.size:
            raise ProtocolError(f"keepalive of {len(buf)} bytes, expected {1 + _KEEPALIVE.size}")
        wal_end, send_time, reply = _KEEPALIVE.unpack_from(buf, 1)
        return Keepalive(wal_end, send_time, bool(reply))
    raise ProtocolError(f"unexpected CopyData message kind {kind:#04x}")


def xlog_data_py(buf: object, cls: type[XLogData]) -> XLogData | None:
    """A whole XLogData message in `bytes`, or None for anything else: another kind, a short
    one, or another buffer type (which `parse_copy_data` then reads or reports).
    `cdc._speedups.xlog_data` is the same function in C."""
    if type(buf) is not bytes or len(buf) < 1 + _XLOG_HEAD.size or buf[0] != CopyKind.XLOG_DATA:
        return None
    data_start, wal_end, send_time = _XLOG_HEAD.unpack_from(buf, 1)
    return cls(data_start, wal_end, send_time, buf[1 + _XLOG_HEAD.size :])


_xlog_data: Callable[[object, type[XLogData]], XLogData | None]
try:
    from cdc._speedups import xlog_data as _xlog_data
except ImportError:  # built without a C compiler
    _xlog_data = xlog_data_py


def build_status_update(
    written: int, flushed: int, applied: int, now: int, reply_requested: bool = False
) -> bytes:
    """Build a standby status update ('r').

    Args:
        written: last WAL position received.
        flushed: last WAL position durably handled; the slot may forget what precedes it.
        applied: last WAL position applied.
        now: the client's clock, µs since 2000-01-01 UTC.
        reply_requested: ask the server to answer at once with a keepalive.
    """
    return _STATUS.pack(
        CopyKind.STANDBY_STATUS, written, flushed, applied, now, 1 if reply_requested else 0
    )


class ReplicationProtocol:
    """LSN bookkeeping for one replication stream (see the module docstring for the rules).

    Args:
        start_lsn: the position replication starts from (the slot's confirmed position);
            the initial `received_lsn` and `flush_lsn`.
    """

    def __init__(self, start_lsn: int = 0) -> None:
        self.received_lsn = start_lsn
        self.server_wal_end = 0
        self.flush_lsn = start_lsn
        self.reply_pending = False
        self._last_status_at: float | None = None

    def receive(self, data: bytes | memoryview) -> XLogData | Keepalive:
        """Parse one server CopyData message and update the LSN state.

        Raises:
            ProtocolError: as `parse_copy_data`.
        """
        message: XLogData | Keepalive | None = _xlog_data(data, XLogData)  # the common case
        if message is None:
            message = parse_copy_data(data)
        if isinstance(message, XLogData):
            self.received(message.data_start, message.wal_end)
        else:
            self.server_wal_end = message.wal_end
            if message.reply_requested:
                self.reply_pending = True
        return message

    def received(self, data_start: int, wal_end: int) -> None:
        """The LSN state after an XLogData message (data start, WAL end): `receive` parses
        one; `cdc.runs` reports the messages it took."""
        self.server_wal_end = wal_end
        if data_start > self.received_lsn:
            self.received_lsn = data_start

    def confirm(self, lsn: int) -> None:
        """Let the server forget WAL before `lsn`; an older position is ignored."""
        if lsn > self.flush_lsn:
            self.flush_lsn = lsn

    def status_due(self, now_monotonic: float, interval: float) -> bool:
        """Whether a status update should be sent now.

        True when a keepalive asked for a reply, when none has been sent yet, or when
        `interval` seconds have passed since the last one (by the caller's monotonic clock).
        """
        return (
            self.reply_pending
            or self._last_status_at is None
            or now_monotonic - self._last_status_at >= interval
        )

    def status_update(
        self,
        now: datetime | int,
        reply_requested: bool = False,
        *,
        now_monotonic: float | None = None,
    ) -> bytes:
        """Build the status update for the current state and clear any pending reply.

        Args:
            now: the client's wall clock: an aware datetime, or µs since 2000-01-01 UTC.
            reply_requested: ask the server to answer at once with a keepalive.
            now_monotonic: the caller's monotonic clock, remembered for `status_due`;
                leave it out for an extra update that should not reset the interval.

        Raises:
            ValueError: `now` is a naive datetime.
        """
        client_time = datetime_to_pg_time(now) if isinstance(now, datetime) else now
        self.reply_pending = False
        if now_monotonic is not None:
            self._last_status_at = now_monotonic
        written = max(self.received_lsn, self.flush_lsn)
        return build_status_update(
            written, self.flush_lsn, self.flush_lsn, client_time, reply_requested
        )
