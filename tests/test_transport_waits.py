"""How `ReplicationConnection.wait_readable` uses the event loop, on a socket pair.

The walsender's timing decides when a real stream's bytes arrive; here the test decides, so
each case is exact. Only the socket is stood in for: the waits never touch libpq.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from cdc.transport import ConnectionLost, ReplicationConnection


class _Socket:
    """What `wait_readable` and `close` use of a `PGconn`: its socket, and `finish`."""

    def __init__(self, fd: int) -> None:
        self.socket = fd

    def finish(self) -> None:
        return None


@dataclass
class Watched:
    conn: ReplicationConnection
    ours: socket.socket
    server: socket.socket
    calls: list[str] = field(default_factory=list)  #: the loop's add_reader/remove_reader

    async def wait_for(self, data: bytes) -> None:
        """The server sends `data`; one wait, then the read, as the reader does them."""
        self.server.send(data)
        async with asyncio.timeout(5):
            await self.conn.wait_readable()
        assert self.ours.recv(16) == data  # what read_copy_nowait would take


@pytest.fixture
async def watched() -> AsyncIterator[Watched]:
    ours, server = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    add_reader, remove_reader = loop.add_reader, loop.remove_reader
    it = Watched(ReplicationConnection(cast(Any, _Socket(ours.fileno()))), ours, server)

    def add(fd: Any, callback: Any, *args: Any) -> None:
        it.calls.append("add")
        add_reader(fd, callback, *args)

    def remove(fd: Any) -> bool:
        it.calls.append("remove")
        return remove_reader(fd)

    loop.add_reader, loop.remove_reader = add, remove  # type: ignore[method-assign]
    try:
        yield it
    finally:
        it.conn.close()
        loop.add_reader, loop.remove_reader = add_reader, remove_reader  # type: ignore[method-assign]
        ours.close()
        server.close()


async def test_waits_in_a_row_register_the_socket_once(watched: Watched) -> None:
    for _ in range(3):
        await watched.wait_for(b"x")
    assert watched.calls == ["add"]  # the code before: an add and a remove per wait
    watched.conn.close()
    assert watched.calls == ["add", "remove"]


async def test_data_while_nobody_waits_drops_the_registration(watched: Watched) -> None:
    """Else the loop would find the socket readable on every turn until the next read."""
    await watched.wait_for(b"x")
    watched.server.send(b"y")  # nobody waits: the pipeline is busy with what it read
    for _ in range(3):
        await asyncio.sleep(0.01)
    assert watched.calls == ["add", "remove"]
    async with asyncio.timeout(5):
        await watched.conn.wait_readable()  # the bytes still wake the next wait
    assert watched.ours.recv(16) == b"y"
    assert watched.calls == ["add", "remove", "add"]


async def test_close_ends_a_pending_wait_and_lets_go_of_the_socket(watched: Watched) -> None:
    waiting = asyncio.create_task(watched.conn.wait_readable())
    await asyncio.sleep(0)
    watched.conn.close()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(waiting, 5)
    assert watched.calls == ["add", "remove"]


async def test_a_timed_out_wait_leaves_the_next_one_working(watched: Watched) -> None:
    """The reader bounds each wait by the next status update: a cancelled wait must not leave
    a stale waiter that swallows the next wake-up."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watched.conn.wait_readable(), 0.05)
    await watched.wait_for(b"x")
