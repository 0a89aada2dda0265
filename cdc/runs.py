"""Runs of row changes, from CopyData message to `RowChange` in one C call: the catch-up fast path.

Why it exists: each row of a catch-up is one CopyData message, and each goes through framing
(`cdc.replication`), decoding (`cdc.decoder`) and typing (`cdc.changes`): five Python calls
around about a microsecond of C work. `ChangeRuns.take` hands a run of consecutive messages to
`cdc._speedups.change_run`, which does all three for each, and stops at the first message it
is not sure of: anything but an XLogData Insert, Update or Delete of a relation whose plan is
bound (the plan of its latest Relation message), inside a transaction, with every cell of its
tuples sent and readable (an unchanged TOAST cell is the general path's to merge). The
reader feeds that message through the general path, which defines every result and every
error: a run gives the same items and leaves the same state as feeding its messages one by one
(tests/test_runs.py feeds random streams both ways).

Without the C extension, `take` takes nothing and every message goes the general way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cdc.changes import ChangeBuilder, Item, RowChange
from cdc.decoder import Decoder
from cdc.render import RawJson
from cdc.replication import ReplicationProtocol

__all__ = ["ChangeRuns"]

_change_run: Callable[..., tuple[int, int, int, int]] | None
try:
    from cdc._speedups import change_run as _change_run
except ImportError:  # built without a C compiler
    _change_run = None

_NO_COLUMNS: tuple[str, ...] = ()
_KINDS = ("INSERT", "UPDATE", "DELETE")


class ChangeRuns:
    """Takes runs of row changes off a list of CopyData messages, for one stream's state."""

    def __init__(
        self, protocol: ReplicationProtocol, decoder: Decoder, builder: ChangeBuilder
    ) -> None:
        self._protocol = protocol
        self._decoder = decoder
        self._builder = builder

    def take(self, messages: list[Any], start: int, items: list[Item]) -> int:
        """Append the items of the run of row changes at `messages[start]` to `items`; returns the
        index of the first message not taken (`start` when none was)."""
        builder = self._builder
        commit_lsn = builder.commit_lsn
        if _change_run is None or commit_lsn is None:
            return start
        stop, position, received, wal_end = _change_run(
            messages,
            start,
            items,
            self._decoder.relations,
            builder.run_plans,
            RowChange,
            RawJson,
            commit_lsn,
            builder.position,
            _KINDS,
            _NO_COLUMNS,
        )
        if stop > start:
            builder.position = position
            self._protocol.received(received, wal_end)
        return stop
