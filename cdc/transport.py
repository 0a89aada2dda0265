"""A `replication=database` connection driven by asyncio: the only module touching `psycopg.pq`.

Why it exists: psycopg's high-level connections cannot enter COPY BOTH, the mode in which the
server streams WAL and the client answers with standby status updates. This module drives a bare
libpq connection (`psycopg.pq.PGconn`) in non-blocking mode and does its waiting with
`loop.add_reader` / `loop.add_writer` on the libpq socket: no threads, no polling timers, no busy
loops. Everything above it (`cdc.replication`, `cdc.reader`) deals in bytes and rows.

The session is started with fixed settings so the text the server sends is the same everywhere:

    DateStyle=ISO  TimeZone=UTC  IntervalStyle=postgres  extra_float_digits=1  bytea_output=hex

(A walsender accepts these as startup options; `extra_float_digits=1` keeps floats exact.)

Errors are translated here, once: a server error becomes `ServerError` (a `ReplicationError`
carrying the SQLSTATE and the server's own message); a failed connect, a broken socket or the end
of the COPY stream becomes `ConnectionLost`, which callers treat as "reconnect".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.errors import ReplicationError
from cdc.lsn import format_lsn

__all__ = [
    "APPLICATION_NAME",
    "SESSION_OPTIONS",
    "ConnectionLost",
    "ReplicationConnection",
    "ServerError",
]

logger = logging.getLogger(__name__)

SESSION_OPTIONS = (
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres"
    " -c extra_float_digits=1 -c bytea_output=hex"
)
"""Startup options of every replication session (see the module docstring)."""

APPLICATION_NAME = "walcast"
"""The `application_name` of replication sessions, unless the DSN sets one: it shows in
`pg_stat_activity` and `pg_stat_replication`, and names the holder of a busy slot."""


class ServerError(ReplicationError):
    """The server answered a command with an error.

    Args:
        message: the server's primary message (with its detail and hint, when sent).
        sqlstate: the five-character SQLSTATE, e.g. ``55006`` for "replication slot is active".
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ConnectionLost(ReplicationError):
    """The connection could not be made, broke, or the server ended the COPY stream."""


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _result_error(result: pq.abc.PGresult) -> ServerError:
    field = pq.DiagnosticField
    message = _decode(result.error_field(field.MESSAGE_PRIMARY)) or _decode(result.error_message)
    detail = _decode(result.error_field(field.MESSAGE_DETAIL))
    hint = _decode(result.error_field(field.MESSAGE_HINT))
    text = (message or "unknown server error").strip()
    if detail:
        text += f" (detail: {detail.strip()})"
    if hint:
        text += f" (hint: {hint.strip()})"
    return ServerError(text, sqlstate=_decode(result.error_field(field.SQLSTATE)))


def _replication_conninfo(dsn: str) -> bytes:
    params = conninfo_to_dict(dsn)
    params.setdefault("application_name", APPLICATION_NAME)
    user_options = str(params.pop("options", "") or "").strip()
    options = f"{user_options} {SESSION_OPTIONS}".strip()
    params.pop("replication", None)
    return make_conninfo("", **params, replication="database", options=options).encode()


class ReplicationConnection:
    """One walsender session: simple queries, then `START_REPLICATION` and COPY BOTH traffic.

    Use `await ReplicationConnection.connect(dsn)`; close with `close()` (or `async with`).
    One task at a time may use a connection: the methods are not meant to run concurrently,
    except `close()`, which wakes any pending wait with `ConnectionLost`.
    """

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._pgconn = pgconn
        self._waiter: asyncio.Future[None] | None = None
        self._waiting: tuple[int, bool, bool] = (-1, False, False)
        self._copying = False

    # -- connecting --------------------------------------------------------------------------

    @classmethod
    async def connect(cls, dsn: str) -> ReplicationConnection:
        """Open a replication connection without blocking the event loop.

        Raises:
            ConnectionLost: the server is unreachable, refused us, or is starting up.
        """
        pgconn = pq.PGconn.connect_start(_replication_conninfo(dsn))
        self = cls(pgconn)
        try:
            if pgconn.status == pq.ConnStatus.BAD:
                raise ConnectionLost(self._error_message("connection failed"))
            while True:
                state = pgconn.connect_poll()
                if state == pq.PollingStatus.OK:
                    break
                if state == pq.PollingStatus.FAILED:
                    raise ConnectionLost(self._error_message("connection failed"))
                # The socket may change between polls (multiple hosts, SSL retry): re-read it.
                await self._wait(
                    read=state == pq.PollingStatus.READING,
                    write=state == pq.PollingStatus.WRITING,
                )
            pgconn.nonblocking = 1
        except BaseException:
            pgconn.finish()
            raise
        logger.debug("replication connection open", extra={"backend_pid": pgconn.backend_pid})
        return self

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._pgconn.status == pq.ConnStatus.BAD

    @property
    def server_version(self) -> int:
        return self._pgconn.server_version

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    def parameter_status(self, name: str) -> str | None:
        """A run-time parameter the server reported at startup (e.g. ``TimeZone``)."""
        return _decode(self._pgconn.parameter_status(name.encode()))

    # -- simple queries ----------------------------------------------------------------------

    async def simple_query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run one replication command or SQL statement; return its rows as text tuples.

        Raises:
            ServerError: the server refused the command (its message is in the error).
            ConnectionLost: the connection broke.
        """
        if self._copying:
            raise ReplicationError("cannot run a query while streaming")
        rows: list[tuple[str | None, ...]] = []
        error: ServerError | None = None
        await self._send_query(sql)
        while (result := await self._next_result()) is not None:
            status = result.status
            if status == pq.ExecStatus.TUPLES_OK:
                rows.extend(
                    tuple(_decode(result.get_value(r, c)) for c in range(result.nfields))
                    for r in range(result.ntuples)
                )
            elif status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
                error = error or _result_error(result)
            elif status == pq.ExecStatus.COPY_BOTH:
                self._copying = True
                raise ReplicationError(f"unexpected COPY BOTH from {sql!r}")
        if error is not None:
            raise error
        return rows

    async def start_replication(
        self, slot: str, start_lsn: int = 0, options: Mapping[str, str] | None = None
    ) -> None:
        """Send `START_REPLICATION SLOT <slot> LOGICAL <lsn> (options)` and enter COPY BOTH.

        Raises:
            ServerError: e.g. the slot does not exist or is active for another process.
            ConnectionLost: the connection broke.
        """
        if self._copying:
            raise ReplicationError("already streaming")
        sql = f"START_REPLICATION SLOT {_identifier(slot)} LOGICAL {format_lsn(start_lsn)}"
        if options:
            sql += " (" + ", ".join(f"{_identifier(k)} {_literal(v)}" for k, v in options.items())
            sql += ")"
        await self._send_query(sql)
        result = await self._next_result()
        if result is None:
            raise ConnectionLost("no answer to START_REPLICATION")
        if result.status == pq.ExecStatus.COPY_BOTH:
            self._copying = True
            return
        error = (
            _result_error(result)
            if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE)
            else ReplicationError(f"unexpected answer to START_REPLICATION: {result.status}")
        )
        while await self._next_result() is not None:
            pass
        raise error

    # -- COPY BOTH ---------------------------------------------------------------------------

    async def read_copy(self) -> bytes:
        """Return the next CopyData message from the server, waiting for it as long as needed.

        Raises:
            ServerError: the server ended the stream with an error.
            ConnectionLost: the stream ended or the connection broke.
        """
        while (data := self.read_copy_nowait()) is None:
            await self._wait(read=True)
        return data

    def read_copy_nowait(self) -> bytes | None:
        """Return the next CopyData message if it has already arrived, else None (never waits).

        Raises:
            ServerError: the server ended the stream with an error.
            ConnectionLost: the stream ended or the connection broke.
        """
        taken = self.read_copies_nowait(1)
        return taken[0] if taken else None

    def read_copies_nowait(self, budget: int) -> list[bytes]:
        """The CopyData messages that have already arrived, taken while fewer than `budget`
        bytes are (the last may cross it); never waits. One call per batch rather than one
        per message: a catch-up reads hundreds of messages per batch.

        Raises:
            ServerError: the server ended the stream with an error.
            ConnectionLost: the stream ended or the connection broke.
        """
        messages: list[bytes] = []
        get_copy_data = self._pgconn.get_copy_data
        consumed = False  #: the socket was read since the last message: it holds no more
        while budget > 0:
            try:
                size, data = get_copy_data(1)
            except psycopg.OperationalError as exc:
                raise self._lost(str(exc)) from None
            if size > 0:
                messages.append(bytes(data))
                budget -= size
                consumed = False
            elif size < 0:
                self._copying = False
                raise self._end_of_copy()
            elif consumed:
                break
            else:
                self._consume()  # take whatever the socket already holds, without waiting
                consumed = True
        return messages

    async def send_copy(self, data: bytes) -> None:
        """Queue one CopyData message to the server and flush it."""
        pgconn = self._pgconn
        while True:
            try:
                queued = pgconn.put_copy_data(data)
            except psycopg.OperationalError as exc:
                raise self._lost(str(exc)) from None
            if queued == 1:
                break
            await self._wait(write=True)  # 0: libpq's buffer is full (non-blocking mode)
        await self._flush()

    def send_copy_nowait(self, data: bytes) -> bool:
        """Queue one CopyData message and try once to flush it, never waiting.

        For last words at shutdown. Returns True when the message left libpq's buffer; never
        raises (a broken connection just returns False).
        """
        try:
            return self._pgconn.put_copy_data(data) == 1 and self._pgconn.flush() == 0
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        """Close the connection; a pending wait (in another task) ends with `ConnectionLost`."""
        self._cancel_waiter(ConnectionLost("connection closed"))
        self._copying = False
        self._pgconn.finish()

    async def __aenter__(self) -> ReplicationConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    async def _send_query(self, sql: str) -> None:
        try:
            self._pgconn.send_query(sql.encode())
        except psycopg.OperationalError as exc:
            raise self._lost(str(exc)) from None
        await self._flush()

    async def _flush(self) -> None:
        # libpq: when PQflush returns 1, wait for read- or write-readiness; on read-readiness
        # consume input (the server may be blocked writing to us), then flush again.
        while True:
            try:
                pending = self._pgconn.flush()
            except psycopg.OperationalError as exc:
                raise self._lost(str(exc)) from None
            if not pending:
                return
            await self._wait(read=True, write=True)
            self._consume()

    async def _next_result(self) -> pq.abc.PGresult | None:
        pgconn = self._pgconn
        self._consume()
        while pgconn.is_busy():
            await self._wait(read=True)
            self._consume()
        return pgconn.get_result()

    def _end_of_copy(self) -> ReplicationError:
        # get_copy_data returned -1: the server ended COPY (error or shutdown) or the socket died.
        if self.closed:
            return self._lost("replication stream ended")
        result = self._pgconn.get_result()
        error: ReplicationError | None = None
        while result is not None:
            if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
                error = error or _result_error(result)
            if result.status == pq.ExecStatus.COPY_BOTH:
                break
            result = self._pgconn.get_result()
        if error is None:
            return self._lost("replication stream ended")
        # No SQLSTATE: libpq's own report (the server hung up, e.g. after ending the stream
        # for a clean shutdown); 57P/08: the server is going away. Both mean "reconnect".
        if isinstance(error, ServerError) and (
            error.sqlstate is None or error.sqlstate.startswith(("57P", "08"))
        ):
            return ConnectionLost(str(error))
        return error

    def _consume(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise self._lost(str(exc)) from None

    def _lost(self, fallback: str) -> ConnectionLost:
        return ConnectionLost(self._error_message(fallback))

    def _error_message(self, fallback: str) -> str:
        message = self._pgconn.get_error_message().strip()
        return message or fallback

    async def _wait(self, *, read: bool = False, write: bool = False) -> None:
        """Wait until the libpq socket is readable (read) or writable (write), whichever first."""
        try:
            fd = self._pgconn.socket
        except psycopg.OperationalError as exc:
            raise self._lost(str(exc)) from None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if read:
            loop.add_reader(fd, wake)
        if write:
            loop.add_writer(fd, wake)
        self._waiter = waiter
        self._waiting = (fd, read, write)
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # else close() already unregistered the socket
                self._unregister()

    def _unregister(self) -> None:
        fd, read, write = self._waiting
        waiter, self._waiter, self._waiting = self._waiter, None, (-1, False, False)
        if waiter is None:
            return
        loop = waiter.get_loop()
        if read:
            loop.remove_reader(fd)
        if write:
            loop.remove_writer(fd)

    def _cancel_waiter(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._unregister()  # before the socket closes: its number may be reused at once
        if not waiter.done():
            waiter.set_exception(exc)


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
