"""cdc.progress as a table: what the reader reads and hands out → what it acknowledges.

Each case is a script of reader events, with the output of every event that has one: where a
stream starts, which items reach the consumer, and the positions of each status update
(`Ack(written, flushed)`; flushed 0 is the invalid position that does not move the slot).
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Any

import pytest

from cdc.changes import Item, RowChange, TableColumns, TransactionEnd, TransactionStart
from cdc.progress import INVALID_LSN, Ack, Progress

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def tx(commit: int, end: int, rows: int = 1) -> list[Item]:
    """One transaction as the reader reads it: start, `rows` inserts, end."""
    body: list[Item] = [
        RowChange(commit, n, "public", "t", "INSERT", {"id": n}, None, ())
        for n in range(1, rows + 1)
    ]
    return [TransactionStart(7, commit, WHEN), *body, TransactionEnd(commit, end, WHEN)]


def described(transaction: list[Item], *afters: int) -> list[Item]:
    """`transaction` with the table's columns (a Relation) after each count of its changes."""
    commit = transaction[0].commit_lsn
    items: list[Item] = []
    for index, item in enumerate(transaction):
        if index in (after + 1 for after in afters):  # after the start and `after` changes
            items.append(TableColumns(commit, index - 1, "public", "t", ("id",)))
        items.append(item)
    return items


def name(item: Item) -> str:
    if isinstance(item, TableColumns):
        return f"columns {item.commit_lsn:x}.{item.position}"
    if isinstance(item, TransactionStart):
        return f"start {item.commit_lsn:x}"
    if isinstance(item, TransactionEnd):
        return f"end {item.commit_lsn:x}"
    return f"row {item.commit_lsn:x}.{item.position}"


# Events: ("start", confirmed), ("read", items), ("keepalive", wal_end), ("hand", n),
# ("retain", lsn | None), ("status", received), ("reply", received).
def start(confirmed: int) -> tuple[str, Any]:
    return ("start", confirmed)


def read(*transactions: list[Item]) -> tuple[str, Any]:
    return ("read", [item for items in transactions for item in items])


def keepalive(wal_end: int) -> tuple[str, Any]:
    return ("keepalive", wal_end)


def hand(count: int) -> tuple[str, Any]:
    """The consumer asks for `count` items (skipped duplicates do not count)."""
    return ("hand", count)


def retain(lsn: int | None) -> tuple[str, Any]:
    return ("retain", lsn)


def status(received: int) -> tuple[str, Any]:
    return ("status", received)


def reply(received: int) -> tuple[str, Any]:
    return ("reply", received)


def budget(size: int) -> tuple[str, Any]:
    """The read-ahead budget, in bytes (first event of a case; default otherwise)."""
    return ("budget", size)


def arrive(size: int) -> tuple[str, Any]:
    """The reader reads one message of `size` bytes; output: whether it may read another."""
    return ("arrive", size)


def drained() -> tuple[str, Any]:
    """The consumer has asked past everything read: the reader is about to read again."""
    return ("drained", None)


def run(events: list[tuple[str, Any]], *, batched: bool = False) -> list[Any]:
    """Drive a `Progress` the way `cdc.reader` does; return the outputs. `batched`: each
    "hand" hands its items out as one batch (`handed_out_batch`), as `batches()` does."""
    if events and events[0][0] == "budget":
        progress = Progress(read_ahead_bytes=events[0][1])
        events = events[1:]
    else:
        progress = Progress()
    queue: deque[Item] = deque()
    outputs: list[Any] = []
    for kind, arg in events:
        if kind == "start":  # a (re)connect: what was read and not handed out is dropped
            queue.clear()
            outputs.append(progress.start(arg))
        elif kind == "arrive":
            progress.read(arg)
            outputs.append(progress.room > 0)
        elif kind == "drained":
            progress.drained()
        elif kind == "read":
            for item in arg:
                if isinstance(item, TransactionStart):
                    progress.began()
                queue.append(item)
        elif kind == "keepalive":
            progress.keepalive(arg)
        elif kind == "hand":
            handed: list[Item] = []
            while queue and len(handed) < arg:
                item = queue.popleft()
                if progress.skip(item):
                    continue
                if not batched:
                    progress.handed_out(item)
                handed.append(item)
            if batched:
                progress.handed_out_batch(handed)
            outputs.append([name(item) for item in handed])
        elif kind == "retain":
            progress.retain_from(arg)
        elif kind == "status":
            outputs.append(progress.status(arg))
        elif kind == "reply":
            outputs.append(progress.reply(arg))
    return outputs


CASES: list[tuple[str, list[tuple[str, Any]], list[Any]]] = [
    (
        "idle keepalive: acknowledge up to its WAL end",
        [start(0x10), keepalive(0x100), status(0x10)],
        [0x10, Ack(0x100, 0x100)],
    ),
    (
        "a handled transaction: acknowledge its end",
        [start(0), read(tx(0x10, 0x20)), hand(3), status(0x10)],
        [0, ["start 10", "row 10.1", "end 10"], Ack(0x20, 0x20)],
    ),
    (
        "never inside a transaction the consumer has not fully handled",
        [start(0), read(tx(0x10, 0x20), tx(0x30, 0x40, rows=2)), hand(5), status(0x30)],
        [0, ["start 10", "row 10.1", "end 10", "start 30", "row 30.1"], Ack(0x30, 0x20)],
    ),
    (
        "read ahead: a keepalive behind unhandled transactions moves nothing",
        [
            start(0),
            read(tx(0x10, 0x20), tx(0x30, 0x40)),
            keepalive(0x100),
            hand(3),
            status(0x30),
            hand(3),
            status(0x30),
            keepalive(0x120),  # read once everything before it was handled
            status(0x30),
        ],
        [
            0,
            ["start 10", "row 10.1", "end 10"],
            Ack(0x30, 0x20),
            ["start 30", "row 30.1", "end 30"],
            Ack(0x40, 0x40),
            Ack(0x120, 0x120),
        ],
    ),
    (
        "the consumer holds history: the target is capped by what it retains",
        [
            start(0),
            read(tx(0x10, 0x20), tx(0x30, 0x40)),
            hand(6),
            retain(0x30),
            status(0x30),
            keepalive(0x100),
            status(0x30),
            retain(None),
            status(0x30),
        ],
        [
            0,
            ["start 10", "row 10.1", "end 10", "start 30", "row 30.1", "end 30"],
            Ack(0x30, 0x30),
            Ack(0x30, 0x30),
            Ack(0x100, 0x100),
        ],
    ),
    (
        "never backwards: not below the slot, not below an earlier acknowledgement",
        [
            start(0x50),
            keepalive(0x40),
            status(0),
            keepalive(0x60),
            status(0),
            retain(0x10),
            status(0),
        ],
        [0x50, Ack(0x50, 0x50), Ack(0x60, 0x60), Ack(0x60, 0x60)],
    ),
    (
        "a reconnect starts at the slot or at what was acknowledged, whichever is later",
        [start(0), keepalive(0x20), status(0), start(0x10), start(0x30)],
        [0, Ack(0x20, 0x20), 0x20, 0x30],
    ),
    (
        "reconnect mid-transaction: what was handed out is skipped, the rest follows",
        [
            start(0),
            read(tx(0x10, 0x20, rows=3)),
            hand(2),
            status(0x10),
            start(0),
            read(tx(0x10, 0x20, rows=3), tx(0x30, 0x40)),
            hand(10),
            status(0x30),
        ],
        [
            0,
            ["start 10", "row 10.1"],
            Ack(0x10, 0),
            0,
            ["row 10.2", "row 10.3", "end 10", "start 30", "row 30.1", "end 30"],
            Ack(0x40, 0x40),
        ],
    ),
    (
        "a whole transaction sent again is skipped, and still counts as handled",
        [
            start(0),
            read(tx(0x10, 0x20)),
            hand(3),
            start(0),  # the session died before the acknowledgement
            read(tx(0x10, 0x20)),
            hand(3),
            keepalive(0x100),  # idle after the skipped transaction: it moves
            status(0x10),
        ],
        [0, ["start 10", "row 10.1", "end 10"], 0, [], Ack(0x100, 0x100)],
    ),
    (
        "the skip ends at the first new item",
        [start(0), read(tx(0x10, 0x20)), hand(3), start(0x20), read(tx(0x30, 0x40)), hand(3)],
        [0, ["start 10", "row 10.1", "end 10"], 0x20, ["start 30", "row 30.1", "end 30"]],
    ),
    (
        "a table's columns cut off from their rows by a reconnect are handed out, once",
        [
            start(0),
            read(described(tx(0x10, 0x20, rows=2), 0, 1)),
            hand(3),  # the session dies between row 1 and the columns that precede row 2
            start(0),  # the new session describes the table before row 1 and again before 2
            read(described(tx(0x10, 0x20, rows=2), 0, 1)),
            hand(10),
            start(0x20),
            read(described(tx(0x30, 0x40), 0)),
            hand(10),
        ],
        [
            0,
            ["start 10", "columns 10.0", "row 10.1"],
            0,
            ["columns 10.1", "row 10.2", "end 10"],
            0x20,
            ["start 30", "columns 30.0", "row 30.1", "end 30"],
        ],
    ),
    (
        "a keepalive reply: the regular update, then everything received with no flush",
        [
            start(0),
            read(tx(0x10, 0x20)),
            hand(3),
            retain(0x10),  # history holds the slot back ...
            keepalive(0x500),
            reply(0x10),  # ... and the walsender still learns that all it sent arrived
        ],
        [0, ["start 10", "row 10.1", "end 10"], (Ack(0x10, 0x10), Ack(0x500, INVALID_LSN))],
    ),
    (
        "a reply while a transaction is unhandled: flush held, everything received",
        [start(0), read(tx(0x10, 0x20), tx(0x30, 0x40)), hand(4), keepalive(0x90), reply(0x30)],
        [0, ["start 10", "row 10.1", "end 10", "start 30"], (Ack(0x30, 0x20), Ack(0x90, 0))],
    ),
    (
        "read-ahead budget: reading stops at the budget; a message is never split",
        [
            budget(1000),
            start(0),
            arrive(400),
            arrive(400),
            arrive(400),  # 1,200 bytes held: stop until the consumer asks past them
            drained(),
            arrive(5000),  # larger than the whole budget: read alone, one at a time
            drained(),
            arrive(10),
        ],
        [0, True, True, False, False, True],
    ),
    (
        "read-ahead budget: a reconnect drops what was read ahead",
        [budget(1000), start(0), arrive(900), arrive(200), start(0), arrive(100)],
        [0, True, False, 0, True],
    ),
    (
        "a transaction in slices: keepalives inside it move nothing, a reconnect mid-way "
        "skips what was handed out",
        [
            budget(1000),
            start(0),
            read(tx(0x10, 0x20, rows=6)[:3]),  # one slice: start, rows 1-2
            hand(3),
            keepalive(0x100),  # read between two slices of the open transaction
            status(0x10),
            drained(),
            read(tx(0x10, 0x20, rows=6)[3:6]),  # rows 3-5
            hand(3),
            status(0x10),
            start(0),  # the session dies before row 6: the server sends it all again
            read(tx(0x10, 0x20, rows=6), tx(0x30, 0x40)),
            hand(20),
            status(0x30),
        ],
        [
            0,
            ["start 10", "row 10.1", "row 10.2"],
            Ack(0x10, 0),
            ["row 10.3", "row 10.4", "row 10.5"],
            Ack(0x10, 0),
            0,
            ["row 10.6", "end 10", "start 30", "row 30.1", "end 30"],
            Ack(0x40, 0x40),
        ],
    ),
    (
        "a reply never reports less received than the stream brought",
        [start(0x10), reply(0x80)],
        [0x10, (Ack(0x80, 0x10), Ack(0x80, INVALID_LSN))],
    ),
]


@pytest.mark.parametrize(("events", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_progress_cases(events: list[tuple[str, Any]], expected: list[Any]) -> None:
    assert run(events) == expected


@pytest.mark.parametrize(("events", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_handing_out_a_batch_is_handing_out_each_item(
    events: list[tuple[str, Any]], expected: list[Any]
) -> None:
    assert run(events, batched=True) == expected


def test_the_flushed_position_only_follows_status_updates() -> None:
    """`handled` moves as the consumer asks past items; `flushed` only when acknowledged."""
    progress = Progress()
    progress.start(0)
    progress.began()
    for item in tx(0x10, 0x20):
        progress.handed_out(item)
    assert (progress.handled, progress.target, progress.flushed) == (0x20, 0x20, 0)
    progress.status(0x10)
    assert progress.flushed == 0x20


def test_the_read_ahead_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="read_ahead_bytes"):
        Progress(read_ahead_bytes=0)
