"""The replication reader: committed changes from a logical slot, as a pull-based async iterator.

Why it exists: this is where the sans-IO pieces (`replication`, `decoder`, `changes`,
`progress`) meet the I/O ones (`transport`, `catalog`, `setup`). It is the I/O loop only; the
rules that make "nothing lost, nothing twice" true (the flush target, the keepalive rule, the
duplicate skip after a reconnect, read-ahead accounting) are `cdc.progress`'s, and what the
database must provide is `cdc.setup`'s.

* **Pull-based.** `batches()` reads the socket only when the consumer asks for the next batch,
  so a batch the consumer has asked past has been handled (`Progress.handed_out_batch`). Items
  are yielded as their messages arrive; a transaction is never buffered (proto_version 1: the
  server sends it at commit). `items()` hands out the same items one at a time.
* **Read-ahead, by bytes.** One read takes a message, then whatever messages have already
  arrived in libpq's buffer, across transactions, up to `read_ahead_bytes` (`cdc.progress`'s
  budget). Nothing more is read until the consumer has asked past all of it, so a transaction
  of any size passes through in slices of about that many bytes, and the socket's back-pressure
  holds the rest in the server. A read is decoded and handed out `DECODE_SLICE` messages at a
  time, so few rows are in flight at once (no young garbage collection for them).
* **Coalesced reads when busy.** A read that emptied the socket after taking a lot that
  arrived fast (`COALESCE_BYTES` or more, at `COALESCE_RATE` or faster since the read before)
  means the server streams quickly but no faster than walcast reads: left alone, the reader
  would wake for every few kilobytes, and each small read costs a system call and a TCP
  acknowledgement. So the next read, once its first message is there, waits
  `COALESCE_SECONDS` for more to arrive (`coalesce_delay`). A live stream (thousands of
  changes a second, even the backlog of a brief stall) is read at once, so its latency is
  untouched; a catch-up's reads wait at most that long.
* **Status updates**: at once for a keepalive that asks for a reply (`Progress.reply`), and
  every `status_interval` seconds while streaming (a timeout on the read, no timer task).
* **Reconnects** on connection loss, server restart or "slot is active" (another process holds
  it; the log names it), with capped exponential back-off and full jitter, reset once a stream
  has started. Set-up problems (wal_level, privileges, tables, replica identity) raise
  `SetupError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg

from cdc import catalog, setup
from cdc.backoff import full_jitter
from cdc.changes import ChangeBuilder, Item, TypeDescription
from cdc.decoder import Decoder
from cdc.lsn import format_lsn
from cdc.messages import Begin, PgOutputMessage, Relation, UnknownMessage
from cdc.progress import READ_AHEAD_BYTES, Progress
from cdc.replication import (
    Keepalive,
    ReplicationProtocol,
    build_status_update,
    datetime_to_pg_time,
)
from cdc.runs import ChangeRuns
from cdc.setup import ReplicaIdentityMode, Requirements
from cdc.transport import ConnectionLost, ReplicationConnection, ServerError

__all__ = ["ReplicationReader"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DECODE_SLICE = 64
"""Most messages decoded into items at a time. A read may take hundreds (the read-ahead
budget), but their rows are decoded and handed out a slice at a time: rows in flight are young
objects, and a whole read's worth of them (two or three per row) would set off a young
collection nearly every read, walking them all and promoting them towards costly full ones.
A slice stays well under Python's threshold (700)."""

COALESCE_BYTES = 8 * 1024
COALESCE_RATE = 16 * 1024 * 1024
"""A read that took at least `COALESCE_BYTES`, at this many bytes a second or more since the
read before (some 70,000 changes a second), and emptied the socket makes the next one wait."""

COALESCE_SECONDS = 0.001
"""How long that next read waits for more to arrive: at a catch-up's pace a millisecond brings
tens of kilobytes, and the wait adds at most this much to the latency of so fast a stream."""


def coalesce_delay(taken: int, budget: int, seconds: float) -> float:
    """How long the next read waits for more once its first message is there. A read that
    took `taken` bytes of a `budget` (the read-ahead room it had), `seconds` after the read
    before, found a busy stream when it took at least `COALESCE_BYTES`, at `COALESCE_RATE` or
    faster, and stopped short of the budget, the socket empty (one stopped by the budget left
    more waiting, so the next read has no reason to wait)."""
    busy = COALESCE_BYTES <= taken < budget and taken >= COALESCE_RATE * seconds
    return COALESCE_SECONDS if busy else 0.0


_BOOKKEEPING = frozenset({Begin, UnknownMessage})
"""Decoder messages that move the reader's transaction state or are skipped."""

# SQLSTATE classes/codes that mean "try again later", not "fix your setup".
_OBJECT_IN_USE = "55006"  # e.g. the slot is active for another process
_INVALIDATED = "55000"  # e.g. "can no longer get changes from replication slot"
_RETRY_SQLSTATES = ("08", "53", "57P", "40001", "40P01", _OBJECT_IN_USE, "55P03")


class SlotInUse(ServerError):
    """`START_REPLICATION` found the slot streaming to another process (retried)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionLost | OSError):
        return True
    if isinstance(exc, ServerError):
        return (exc.sqlstate or "").startswith(_RETRY_SQLSTATES)
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        if sqlstate is None:  # no server answer: the connection itself failed
            return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        return sqlstate.startswith(_RETRY_SQLSTATES)
    return False


class ReplicationReader:
    """Streams `Item`s from a logical replication slot, reconnecting as needed.

    Args:
        dsn: libpq connection string or URL of the database.
        slot: the logical slot (created if missing).
        publication: the publication (created if missing, its table list kept in step).
        tables: qualified table names ("schema.table") to publish; the session store's
            tables are added when they exist. None: the publication is managed elsewhere (by
            `walcast.pipeline`, once, at start-up) and used as it is.
        status_interval: seconds between standby status updates while streaming.
        backoff_base: first reconnect delay cap, in seconds (doubled per failed attempt).
        backoff_cap: largest reconnect delay cap, in seconds.
        replica_identity: for `tables` not `REPLICA IDENTITY FULL`: "check" refuses to start
            (naming the `ALTER TABLE` to run), "manage" sets it, "ignore" accepts them.
        connect_timeout: seconds one connection attempt (both connections, set-up and
            `START_REPLICATION`) may take before it counts as failed and is retried.
        read_ahead_bytes: most bytes of pgoutput messages read before the consumer has asked
            for their items (one message more than that at most: a message is never split).
    """

    def __init__(
        self,
        dsn: str,
        *,
        slot: str = "walcast",
        publication: str = "walcast",
        tables: Sequence[str] | None = None,
        status_interval: float = 10.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        replica_identity: ReplicaIdentityMode = "ignore",
        connect_timeout: float = 30.0,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.tables = None if tables is None else tuple(tables)
        self.status_interval = status_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.replica_identity = replica_identity
        self.connect_timeout = connect_timeout
        self._requirements = Requirements(
            slot=slot,
            publication=publication,
            tables=self.tables,
            replica_identity=replica_identity,
        )

        self._conn: ReplicationConnection | None = None
        self._catalog: psycopg.AsyncConnection[Any] | None = None
        self._protocol = ReplicationProtocol()
        self._decoder = Decoder()
        self._builder = ChangeBuilder()
        self._runs = ChangeRuns(self._protocol, self._decoder, self._builder)
        self._types: dict[int, TypeDescription] = {}
        self._streaming = False
        self._status_sent_at = 0.0

        # What may be acknowledged, what to skip, and how much may be read ahead.
        self._progress = Progress(read_ahead_bytes)
        self._coalesce = 0.0  #: how long the next read waits for more (`coalesce_delay`)
        self._read_at = 0.0  #: when the last read ended (time.monotonic)
        self._unknown_kinds: set[int] = set()
        self._gen: AsyncGenerator[Any, None] | None = None
        self._closing = False
        self._close_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stream_ok = False

    # -- what the consumer and the metrics see ---------------------------------------------------

    @property
    def received_lsn(self) -> int:
        return self._protocol.received_lsn

    @property
    def flushed_lsn(self) -> int:
        return self._progress.flushed

    @property
    def server_wal_end(self) -> int:
        return self._protocol.server_wal_end

    @property
    def handled_lsn(self) -> int:
        """Everything committed before this position has been handed out and handled: the end of
        the last handled transaction or, between transactions, the last keepalive's WAL end."""
        return self._progress.handled

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def streaming(self) -> bool:
        return self._streaming and self.connected

    def retain_from(self, lsn: int | None) -> None:
        """Say the oldest commit LSN still needed (None: nothing); caps the flush position."""
        self._progress.retain_from(lsn)

    def batches(self) -> AsyncIterator[list[Item]]:
        """Connect, set up, and yield items in commit order, a read's worth at a time, until
        `aclose()` or cancellation.

        Use as `async for batch in reader.batches()`. A batch is the items of up to
        `DECODE_SLICE` messages of one read (a message and those already arrived, within the
        read-ahead budget): the consumer handles it without an await per item, and it counts as
        handled once the consumer asks for the next batch. One iteration (of `batches` or
        `items`) at a time per reader.

        Raises:
            SetupError: a set-up problem retrying cannot fix (its message says what to do).
            ProtocolError: the stream is malformed.
        """
        return self._start(self._batches)

    def items(self) -> AsyncIterator[Item]:
        """`batches()`, one item at a time (a batch counts as handled once the consumer asks
        past its last item)."""
        return self._start(self._items)

    def _start(self, iterate: Callable[[], AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
        if self._gen is not None:
            raise RuntimeError("ReplicationReader is already being iterated")
        self._closing = False
        self._close_requested.clear()
        self._stopped.clear()
        self._gen = gen = iterate()
        return gen

    async def aclose(self) -> None:
        """Stop streaming: send a last status update, close the connections, end the iteration.

        Safe to call from another task while the consumer is waiting for an item: its
        iteration then ends normally.
        """
        self._closing = True
        self._close_requested.set()
        gen = self._gen
        if gen is not None and not getattr(gen, "ag_running", False):
            await gen.aclose()  # suspended at a yield (or never started): run its cleanup here
        elif gen is not None:
            self._final_status()
            if self._conn is not None:
                self._conn.close()  # wakes the read pending in the consumer's task
            with suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._stopped.wait()
        self._gen = None
        await self._disconnect()

    # -- the stream ------------------------------------------------------------------------------

    async def _items(self) -> AsyncGenerator[Item, None]:
        batches = self._batches()
        try:
            async for batch in batches:
                for item in batch:
                    yield item
        finally:
            await batches.aclose()

    async def _batches(self) -> AsyncGenerator[list[Item], None]:
        failures = 0
        progress = self._progress
        try:
            while not self._closing:
                self._stream_ok = False
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await self._connect()
                    while not self._closing:
                        messages = await self._next_messages()
                        for start in range(0, len(messages), DECODE_SLICE):
                            batch = await self._items_of(messages[start : start + DECODE_SLICE])
                            if progress.resuming:  # drop what was handed out before a reconnect
                                batch = [item for item in batch if not progress.skip(item)]
                            if batch:
                                yield batch
                                progress.handed_out_batch(batch)  # the consumer asked past it
                except Exception as exc:
                    if self._closing:
                        return
                    if not _retryable(exc):
                        raise
                    self._final_status()
                    await self._disconnect()
                    if self._stream_ok:
                        failures = 0
                    delay = full_jitter(failures, self.backoff_base, self.backoff_cap)
                    failures += 1
                    logger.warning(
                        "replication slot in use; retrying"
                        if isinstance(exc, SlotInUse)
                        else "replication stream interrupted; reconnecting",
                        extra={
                            "slot": self.slot,
                            "attempt": failures,
                            "delay": round(delay, 3),
                            "error": f"{type(exc).__name__}: {exc}",
                        },
                    )
                    with suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._close_requested.wait()
        finally:
            try:
                self._final_status()
                await self._disconnect()
            finally:
                self._stopped.set()
                self._gen = None

    async def _connect(self) -> None:
        """Open both connections, check and set up (`cdc.setup`), and start streaming."""
        self._catalog = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        report = await setup.ensure(self._catalog, self._requirements)
        if report.slot_created and self._progress.flushed:
            why = "PostgreSQL had invalidated it" if report.slot_invalidated else "it was dropped"
            raise setup.SlotRecreated(
                f'replication slot "{self.slot}" was created anew while walcast streamed from'
                f" it ({why}): what it held since {format_lsn(self._progress.flushed)} is gone"
            )
        confirmed = report.slot.confirmed_flush_lsn if report.slot else None

        self._conn = conn = await ReplicationConnection.connect(self.dsn)
        start = self._progress.start(confirmed or 0)
        self._protocol = ReplicationProtocol(start)
        self._decoder = Decoder()
        self._builder = ChangeBuilder()
        self._runs = ChangeRuns(self._protocol, self._decoder, self._builder)
        if self._types:
            self._builder.register_types(list(self._types.values()))
        try:
            await conn.start_replication(self.slot, 0, setup.start_options(self.publication))
        except ServerError as exc:
            if exc.sqlstate == _INVALIDATED:  # since `ensure`: its next run re-creates the slot
                status = await catalog.slot_status(self._catalog, self.slot)
                if status is not None and status.invalidated:
                    raise ConnectionLost(str(exc)) from None
            if exc.sqlstate != _OBJECT_IN_USE:
                raise
            message = await setup.slot_in_use(self._catalog, self.slot)
            raise SlotInUse(message, sqlstate=exc.sqlstate) from None
        self._streaming = True
        self._status_sent_at = 0.0
        logger.info(
            "replication streaming",
            extra={"slot": self.slot, "publication": self.publication, "from": format_lsn(start)},
        )

    async def _next_messages(self) -> list[bytes]:
        """Read one CopyData message, and those already arrived within the read-ahead budget.
        Called when the consumer has asked past every item read before."""
        conn = self._conn
        assert conn is not None
        progress = self._progress
        progress.drained()
        budget = progress.room
        first = await self._read()
        if self._coalesce:  # the last read found a busy stream: let more arrive first
            await asyncio.sleep(self._coalesce)
        progress.read(len(first))
        messages = [first]
        if progress.room > 0:
            ahead = conn.read_copies_nowait(progress.room)
            progress.read(sum(map(len, ahead)))
            messages += ahead
        now = time.monotonic()
        self._coalesce = coalesce_delay(budget - progress.room, budget, now - self._read_at)
        self._read_at = now
        return messages

    async def _items_of(self, messages: list[bytes]) -> list[Item]:
        """Decode `messages` into items.

        Decoding is synchronous; the loop awaits only to describe a Relation's types and to
        answer a keepalive that asks for a reply, so a slice costs no await per message.
        """
        feed, take = self._builder.feed, self._runs.take
        items: list[Item] = []
        i, count = 0, len(messages)
        while i < count:
            taken = take(messages, i, items)  # a run of row changes, in one call
            if taken > i:
                self._stream_ok = True
                i = taken
                if i == count:
                    break
            decoded = self._decode(messages[i])  # anything else, one by one
            i += 1
            if decoded is not None:
                if isinstance(decoded, Relation):
                    await self._resolve_types(decoded)
                items += feed(decoded)
        if self._protocol.reply_pending:
            await self._send_status()
        return items

    def _decode(self, data: bytes) -> PgOutputMessage | None:
        """One CopyData message as a decoder message to feed, or None (keepalive, unknown)."""
        message = self._protocol.receive(data)
        self._stream_ok = True
        if isinstance(message, Keepalive):
            self._progress.keepalive(message.wal_end)
            return None
        decoded = self._decoder.decode(message.payload, message.data_start)
        if type(decoded) not in _BOOKKEEPING:
            return decoded  # a row change: the common case, no bookkeeping
        if isinstance(decoded, Begin):
            self._progress.began()
        elif isinstance(decoded, UnknownMessage):
            if decoded.kind not in self._unknown_kinds:
                self._unknown_kinds.add(decoded.kind)
                logger.warning(
                    "skipping unknown pgoutput message kind",
                    extra={"kind": decoded.kind, "lsn": format_lsn(message.data_start)},
                )
            return None
        return decoded

    async def _read(self) -> bytes:
        """The next CopyData message; sends status updates when due while waiting."""
        conn = self._conn
        assert conn is not None
        while True:
            now = time.monotonic()
            if self._protocol.status_due(now, self.status_interval):
                await self._send_status()
            data = conn.read_copy_nowait()
            if data is not None:
                return data
            wait = max(0.0, self._status_sent_at + self.status_interval - time.monotonic())
            with suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    return await conn.read_copy()

    async def _resolve_types(self, relation: Relation) -> None:
        """Describe the user-defined types a relation's columns need, before it is fed."""
        assert self._catalog is not None
        while missing := self._builder.missing_types(relation):
            found = await catalog.fetch_types(self._catalog, missing)
            self._types.update((description.oid, description) for description in found)
            self._builder.register_types(found)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("resolved column types", extra={"oids": [d.oid for d in found]})
            if not {d.oid for d in found} & set(missing):
                break  # unknown to the catalog (dropped meanwhile): it loads as text

    # -- status updates (what they say is `Progress`'s) ----------------------------------------

    async def _send_status(self) -> None:
        conn = self._conn
        if conn is None:
            return
        protocol = self._protocol
        if protocol.reply_pending:
            regular, received = self._progress.reply(protocol.received_lsn)
        else:
            regular, received = self._progress.status(protocol.received_lsn), None
        protocol.confirm(regular.flushed)
        now = time.monotonic()
        when = datetime.now(UTC)
        update = protocol.status_update(when, now_monotonic=now)
        self._status_sent_at = now
        await conn.send_copy(update)
        if received is not None:
            client_time = datetime_to_pg_time(when)
            await conn.send_copy(
                build_status_update(
                    received.written, received.flushed, received.flushed, client_time
                )
            )

    def _final_status(self) -> None:
        """Last words before closing: a status update, sent only if it needs no waiting."""
        conn = self._conn
        if conn is None or not self._streaming or conn.closed:
            return
        self._protocol.confirm(self._progress.status(self._protocol.received_lsn).flushed)
        conn.send_copy_nowait(self._protocol.status_update(datetime.now(UTC)))

    async def _disconnect(self) -> None:
        self._streaming = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        cat, self._catalog = self._catalog, None
        if cat is not None:
            with suppress(Exception):
                await cat.close()
