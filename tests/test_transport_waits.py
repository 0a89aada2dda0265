"""How `ReplicationConnection.wait_readable` uses the event loop, on a socket pair.

The walsender's timing decides when a real stream's bytes arrive; here the test decides, so
each case is exact. Only the socket is stood in for: the waits never touch libpq.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any, cast

import pytest

from cdc.transport import ConnectionLost, ReplicationConnection


class _Socket:
    """What `wait_readable` and `close` use of a `PGconn`: its socket, and `finish`."""

    def __init__(self, fd: int) -> None:
        self.socket = fd

    def finish(self) -> None:
        return None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, server = socket.socketpair()
    ours.setblocking(False)
    yield ours, server
    ours.close()
    server.close()


def _counting(loop: asyncio.AbstractEventLoop, calls: list[str]) -> None:
    add_reader, remove_reader = loop.add_reader, loop.remove_reader

    def add(fd: Any, callback: Any, *args: Any) -> None:
        calls.append("add")
        add_reader(fd, callback, *args)

    def remove(fd: Any) -> bool:
        calls.append("remove")
        return remove_reader(fd)

    loop.add_reader, loop.remove_reader = add, remove  # type: ignore[method-assign]


async def _wait_for(
    conn: ReplicationConnection, server: socket.socket, ours: socket.socket
) -> None:
    """One wait that the server's bytes end, then the read, as the reader does them."""
    server.send(b"x")
    async with asyncio.timeout(5):
        await conn.wait_readable()
    assert ours.recv(16) == b"x"  # what read_copy_nowait would take


async def test_waits_in_a_row_register_the_socket_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, server = pair
    calls: list[str] = []
    _counting(asyncio.get_running_loop(), calls)
    conn = ReplicationConnection(cast(Any, _Socket(ours.fileno())))
    for _ in range(3):
        await _wait_for(conn, server, ours)
    assert calls == ["add"]  # the code before kept none: an add and a remove per wait
    conn.close()
    assert calls == ["add", "remove"]


async def test_data_while_nobody_waits_drops_the_registration(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Else the loop would find the socket readable on every turn until the next read."""
    ours, server = pair
    calls: list[str] = []
    _counting(asyncio.get_running_loop(), calls)
    conn = ReplicationConnection(cast(Any, _Socket(ours.fileno())))
    await _wait_for(conn, server, ours)
    server.send(b"y")  # nobody waits: the pipeline is busy with what it read
    for _ in range(3):
        await asyncio.sleep(0.01)
    assert calls == ["add", "remove"]
    async with asyncio.timeout(5):
        await conn.wait_readable()  # the bytes still wake the next wait
    assert ours.recv(16) == b"y"
    assert calls == ["add", "remove", "add"]
    conn.close()


async def test_close_ends_a_pending_wait_and_lets_go_of_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    calls: list[str] = []
    _counting(asyncio.get_running_loop(), calls)
    conn = ReplicationConnection(cast(Any, _Socket(ours.fileno())))
    waiting = asyncio.create_task(conn.wait_readable())
    await asyncio.sleep(0)
    conn.close()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(waiting, 5)
    assert calls == ["add", "remove"]


async def test_a_timed_out_wait_leaves_the_next_one_working(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The reader bounds each wait by the next status update: a cancelled wait must not leave
    a stale waiter that swallows the next wake-up."""
    ours, server = pair
    conn = ReplicationConnection(cast(Any, _Socket(ours.fileno())))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.wait_readable(), 0.05)
    await _wait_for(conn, server, ours)
    conn.close()
