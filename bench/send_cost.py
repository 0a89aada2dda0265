"""The cost of one loopback `send(2)`: the unit every fan-out and latency figure is made of.

    .venv/bin/python -m bench.send_cost --sockets 1000 --rounds 2000

Opens `sockets` loopback TCP connections to a separate process that drains them, then writes
one frame to every socket per round, interleaving the two ways of writing: asyncio's
`transport.write` (what walcast's write pass and aiohttp use) and a bare `socket.send` on the
same sockets (the system call alone). Reports CPU µs per write for each, for a small frame and
for the 50 frames a busy write pass joins. A pass over N sockets costs about N times this, so
this is the floor for a pass in `docs/benchmarks.md` §3.

It also times the wall clock of a whole pass of bare `socket.send`s made by one thread and by
two threads with half the sockets each (`send(2)` releases the GIL): whether a second core
would shorten a pass, with the draining peer on the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import selectors
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import add_common_args, emit, median, raise_nofile

FRAME = b"\x81\x7e\x01\x2c" + b"x" * 300  #: a ≈300-byte text frame, as in bench.fanout


def _drain(port: int, sockets: int) -> None:
    """The peer process: connect, then read and discard until every socket is closed."""
    raise_nofile(sockets + 100)
    selector = selectors.DefaultSelector()
    for _ in range(sockets):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_sockets = sockets
    while open_sockets:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if not sock.recv(1 << 16):
                    selector.unregister(sock)
                    sock.close()
                    open_sockets -= 1
            except BlockingIOError:
                continue


async def run(sockets: int, rounds: int, repeats: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    all_connected = loop.create_future()

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transports.append(transport)
            if len(transports) == sockets and not all_connected.done():
                all_connected.set_result(None)

    server = await loop.create_server(Accepted, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    peer = multiprocessing.get_context("spawn").Process(target=_drain, args=(port, sockets))
    peer.start()
    await asyncio.wait_for(all_connected, 60)
    # The same sockets as plain `socket.socket`s (asyncio's wrapper has no `send`).
    raw = [
        socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, fileno=os.dup(t.get_extra_info("socket").fileno())
        )
        for t in transports
    ]
    would_block = 0

    def write_transport(data: bytes) -> None:
        for transport in transports:
            transport.write(data)

    def send_all(socks: list[socket.socket], data: bytes) -> int:
        """Send `data` on each socket; returns how many would have blocked."""
        blocked = 0
        for sock in socks:
            try:
                sock.send(data)
            except BlockingIOError:  # the peer fell behind: not a fair sample, counted
                blocked += 1
        return blocked

    def write_raw(data: bytes) -> None:
        nonlocal would_block
        would_block += send_all(raw, data)

    threads = ThreadPoolExecutor(2)
    halves = (raw[: len(raw) // 2], raw[len(raw) // 2 :])

    def write_two_threads(data: bytes) -> None:
        nonlocal would_block
        would_block += sum(f.result() for f in [threads.submit(send_all, h, data) for h in halves])

    async def drained() -> None:
        """Between rounds, untimed: every buffer empty, so each write is a real send(2)."""
        # asyncio signals "buffer empty" to no one, so look: a bench, not a hot path.
        while any(t.get_write_buffer_size() for t in transports):  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    async def timed(
        write: Callable[[bytes], None], data: bytes, clock: Callable[[], float]
    ) -> float:
        """`rounds` passes of `write(data)`, each on drained buffers; the `clock` time they took."""
        spent = 0.0
        for _ in range(rounds):
            await drained()
            started = clock()
            write(data)
            spent += clock() - started
        return spent

    samples: dict[str, list[float]] = {}
    for size, data in (("300B", FRAME), ("15KB", FRAME * 50)):
        for _ in range(repeats):  # A B A B: the machine's noise hits both alike
            for name, write in (("transport", write_transport), ("send", write_raw)):
                per_write = await timed(write, data, time.process_time) / (rounds * sockets) * 1e6
                samples.setdefault(f"{name}_{size}_us", []).append(per_write)
    for _ in range(repeats):  # a whole pass, wall clock: one thread, then two
        for name, write in (("one_thread", write_raw), ("two_threads", write_two_threads)):
            per_pass = await timed(write, FRAME, time.perf_counter) / rounds * 1e3
            samples.setdefault(f"pass_wall_ms_{name}", []).append(per_pass)
    threads.shutdown()
    for sock in raw:
        sock.close()
    for transport in transports:
        transport.close()
    server.close()
    await server.wait_closed()
    await asyncio.to_thread(peer.join, 30)
    result: dict[str, Any] = {k: round(median(v), 2) for k, v in samples.items()}
    result["pass_ms_at_1000_sockets"] = round(result["transport_300B_us"], 1)
    result["raw_sends_that_would_block"] = would_block
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200, help="writes per socket per sample")
    parser.add_argument("--repeats", type=int, default=3, help="A B rounds of each size")
    add_common_args(parser)
    args = parser.parse_args(argv)
    raise_nofile(args.sockets + 100)
    result = asyncio.run(run(args.sockets, args.rounds, args.repeats))
    result.update(sockets=args.sockets, rounds=args.rounds)
    emit(
        "send_cost",
        result,
        [
            f"One loopback write, CPU µs, {args.sockets} sockets (median of {args.repeats}):",
            f"  300 B: transport.write {result['transport_300B_us']}, "
            f"socket.send {result['send_300B_us']}",
            f"  15 KB: transport.write {result['transport_15KB_us']}, "
            f"socket.send {result['send_15KB_us']}",
            f"  => a write pass over 1,000 sockets costs at least "
            f"{result['pass_ms_at_1000_sockets']} ms",
            f"  a whole pass of bare sends, wall clock: one thread "
            f"{result['pass_wall_ms_one_thread']} ms, two threads "
            f"{result['pass_wall_ms_two_threads']} ms",
        ],
        json_only=args.json_only,
    )
    return result


if __name__ == "__main__":
    main()
