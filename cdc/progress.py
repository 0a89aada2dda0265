"""The reader's exactly-once rules: what the slot may be told, with no I/O and no clock.

Rule 1: everything that decides what may be acknowledged lives here. `cdc.reader` moves bytes
and tells a `Progress` what happened (a stream started, a transaction began, a keepalive came,
the consumer asked past an item); `Progress` answers what to skip and what to acknowledge.
That keeps "nothing lost, nothing twice" testable as a table of inputs and acknowledgements
(tests/test_progress.py), without a server.

* **Flush target** (what the slot may forget). The candidate is the end LSN of the last
  transaction the consumer has handled or, between transactions, the WAL end of the latest
  keepalive. The consumer says what it still holds with `retain_from()` (the oldest commit LSN
  it still needs, e.g. the start of the oldest transaction in any history; None: nothing), so
  the target is `min(candidate, retained)`. What is acknowledged never moves back, and never
  lands inside a transaction the consumer has not fully handled.
* **Keepalives.** Reply when asked, always (`reply()`). When nothing read is still unhandled,
  a keepalive's WAL end becomes the candidate, so an idle database does not pin WAL.
  A reply is two status updates: the regular one, then one reporting everything received
  (written = the keepalive's WAL end) with an invalid flush position (0). The second lets a
  shutting-down walsender see that the client has received all it sent (`WalSndDone` compares
  the write position when the flush position is invalid), so `pg_ctl stop -m fast` completes
  while the slot stays where the first one put it: a logical slot only moves on a valid flush.
* **Duplicate skip after a reconnect.** A new stream re-sends from the slot's confirmed
  position. Until an item past the last one handed out arrives, items at or before it (by
  `(commit LSN, position)`) and whole transactions already handled are skipped; a skipped
  transaction end still counts as handled. Keys only grow within a stream, so the check stops
  at the first new item. A `TableColumns` item sorts between the change before it and the
  next, so one that a reconnect cut off from the rows it describes is handed out, and one the
  consumer already has is not.
* **Read-ahead accounting.** The reader may read messages before the consumer asks for their
  items. A transaction counts as open from its Begin being read until the consumer has asked
  past its end, and a keepalive moves the candidate only while none is open: a keepalive read
  behind transactions the consumer has not handled yet says nothing about them.
* **Read-ahead budget.** What is read ahead is bounded in bytes, not in transactions: one read
  takes the next message, then already-arrived ones while fewer than `read_ahead_bytes` bytes
  (pgoutput messages, as received) are held for the consumer. So a transaction of any size is
  consumed in slices of about that many bytes (at most one message more), never accumulated,
  and the rules above hold slice by slice: a slice may end, and a reconnect may come, anywhere
  inside a transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from cdc.changes import (
    Item,
    LogicalMessage,
    RowChange,
    TableColumns,
    TransactionEnd,
    TransactionStart,
)

__all__ = ["INVALID_LSN", "READ_AHEAD_BYTES", "Ack", "Progress"]

INVALID_LSN = 0
"""A flush position of 0 is "invalid": the server records the reply but does not move the slot."""

READ_AHEAD_BYTES = 64 * 1024
"""Default read-ahead budget: a few hundred rows of a typical table, a few ms of decoding."""

_END = 1 << 62  # a transaction end sorts after every item of its transaction


class Ack(NamedTuple):
    """One standby status update's positions (the applied position is reported as `flushed`)."""

    written: int  #: everything up to here has been received
    flushed: int  #: the slot may forget what precedes this; INVALID_LSN: no statement


def _key(item: Item) -> tuple[int, int]:
    """Where an item stands in commit order: (commit LSN, place). A start is place 0, change
    number n place 2n, a table's columns after n changes place 2n + 1, the end last."""
    if isinstance(item, RowChange | LogicalMessage):
        return item.commit_lsn, 2 * item.position
    if isinstance(item, TableColumns):
        return item.commit_lsn, 2 * item.position + 1
    if isinstance(item, TransactionStart):
        return item.commit_lsn, 0
    return item.commit_lsn, _END


class Progress:
    """Acknowledgement state of one reader across its streams (see the module docstring)."""

    def __init__(self, read_ahead_bytes: int = READ_AHEAD_BYTES) -> None:
        if read_ahead_bytes < 1:
            raise ValueError(f"read_ahead_bytes must be at least 1, not {read_ahead_bytes}")
        self.read_ahead_bytes = read_ahead_bytes
        self.read_ahead = 0  #: bytes of messages read whose items are not all handed out yet
        self.handled = 0  #: the candidate: end of the last handled transaction, or idle WAL end
        self.flushed = 0  #: the highest flush position acknowledged
        self._retain: int | None = None
        self._open = 0  # transactions whose Begin was read and whose end is not yet handled
        self._keepalive_end = 0  # WAL end of the latest keepalive on this stream
        self._last: tuple[int, int] | None = None  # key of the last item handed out
        self._done_commit = -1  # commit LSN of the last transaction handled whole
        self._resuming = False  # since the stream started, nothing past `_last` seen yet

    # -- inputs ------------------------------------------------------------------------------

    def start(self, confirmed: int) -> int:
        """A new stream; `confirmed` is the slot's confirmed position. Returns where to start."""
        self.flushed = max(self.flushed, confirmed)
        self._open = 0
        self._keepalive_end = 0
        self._resuming = True
        self.read_ahead = 0
        return self.flushed

    def read(self, size: int) -> None:
        """A message of `size` bytes was read (a keepalive too: it waited in the same buffer)."""
        self.read_ahead += size

    def drained(self) -> None:
        """The consumer has asked past every item read so far: nothing is held ahead."""
        self.read_ahead = 0

    def began(self) -> None:
        """A transaction's Begin was read (its items may not be handed out yet)."""
        self._open += 1

    def keepalive(self, wal_end: int) -> None:
        """A keepalive was read."""
        self._keepalive_end = max(self._keepalive_end, wal_end)
        if not self._open:
            self.handled = max(self.handled, wal_end)

    def retain_from(self, lsn: int | None) -> None:
        """The oldest commit LSN the consumer still needs (None: nothing)."""
        self._retain = lsn

    def skip(self, item: Item) -> bool:
        """Whether `item`, about to be handed out, was handed out before a reconnect.

        A skipped transaction end is handled at once: it was before the reconnect.
        """
        if not self._resuming:
            return False
        key = _key(item)
        if item.commit_lsn <= self._done_commit or (self._last is not None and key <= self._last):
            if type(item) is TransactionEnd:
                self._end(item)
            return True
        self._resuming = False
        return False

    @property
    def resuming(self) -> bool:
        """Whether items handed out before a reconnect may still come again (`skip` them)."""
        return self._resuming

    def handed_out(self, item: Item) -> None:
        """The consumer asked past `item`: it has been handled."""
        self._last = _key(item)
        if type(item) is TransactionEnd:
            self._end(item)

    def handed_out_batch(self, items: Sequence[Item]) -> None:
        """The consumer asked past every item of `items`, in order: `handed_out` for each."""
        for item in items:
            if type(item) is TransactionEnd:
                self._end(item)
        if items:
            self._last = _key(items[-1])

    # -- outputs -----------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """Bytes of already-arrived messages the reader may still take before the consumer
        asks past what it holds (the read-ahead budget); 0 or less: none."""
        return self.read_ahead_bytes - self.read_ahead

    @property
    def target(self) -> int:
        """What the slot may forget now: the candidate, capped by what the consumer retains."""
        if self._retain is None:
            return self.handled
        return min(self.handled, self._retain)

    def status(self, received: int) -> Ack:
        """The regular status update; `received` is the latest WAL position received."""
        self.flushed = max(self.flushed, self.target)
        return Ack(max(received, self.flushed), self.flushed)

    def reply(self, received: int) -> tuple[Ack, Ack]:
        """The answer to a keepalive that asked for one: the regular update, then "received
        everything sent" with an invalid flush position (see the module docstring)."""
        regular = self.status(received)
        return regular, Ack(max(regular.written, self._keepalive_end), INVALID_LSN)

    def _end(self, end: TransactionEnd) -> None:
        self._done_commit = max(self._done_commit, end.commit_lsn)
        self.handled = max(self.handled, end.end_lsn)
        self._open -= 1
