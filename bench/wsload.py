"""The WebSocket load harness the gateway benchmarks share: a real gateway, real client sockets.

Server side (the measuring process): `start_server()` runs walcast's own app
(`walcast.app.make_app`, without the CDC pipeline: events are handed to the hub registry the
way the pipeline's sink does) on a loopback port, plus a `/bare` route: a plain aiohttp
WebSocket handler, the baseline. Events are published in process, so what is timed is the
fan-out itself: hub → frames → sockets.

Client side: `ClientProcess` is a separate process (so reading is not done by the process being
measured) that opens sockets with a minimal RFC 6455 handshake and drains them with
`asyncio.Protocol` callbacks (on uvloop when installed), counting bytes and spotting an end
marker in each socket's stream. It is driven over a pipe: connect N sockets, wait until every
socket has seen the marker, close them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection as Pipe
from typing import Any

import orjson
from aiohttp import web

from bench.common import raise_nofile
from gateway.config import Settings, parse_realtime_config
from gateway.events import BroadcastEvent, ChangeEvent
from gateway.hubs import HubRegistry
from gateway.state import STATE
from gateway.tickets import mint_ticket
from walcast.app import make_app

__all__ = [
    "CLASSES",
    "END_MARKER",
    "ClientProcess",
    "Server",
    "change_event",
    "end_event",
    "start_server",
]

ACCESS_TOKEN = "bench-access-token-0123456789-abcdefghij"
ORG = "org_bench"
END_MARKER = b"bench-end"
READY_MARKER = b'"ready"'
HELLO_MARKER = b"hello"

#: The three visibility classes: owner sees ssn and email raw, admin sees email raw,
#: member sees both masked. Masks keep the length here, so every class's frame is as long.
CLASSES = (("owner",), ("admin",), ("member",))

CONFIG = """
[tables."public.orders"]
requiredRoles = ["owner", "admin", "member"]
[tables."public.orders".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
email = { type = "email", show = { roles = ["owner", "admin"] } }
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    app: web.Application
    runner: web.AppRunner
    port: int
    registry: HubRegistry
    bare: set[web.WebSocketResponse] = field(default_factory=set)
    bare_classes: dict[web.WebSocketResponse, int] = field(default_factory=dict)
    _lsn: int = 0x1000_0000

    @property
    def metrics(self) -> Any:
        return self.app[STATE].metrics

    def next_lsn(self) -> int:
        self._lsn += 0x100
        return self._lsn

    def walcast_paths(self, count: int, *, prefix: str = "u") -> list[str]:
        """Ticketed WebSocket paths for `count` sockets, spread round-robin over `CLASSES`."""
        now = time.time()
        paths = []
        for i in range(count):
            ticket = mint_ticket(
                ACCESS_TOKEN,
                user_id=f"{prefix}{i}",
                organization_id=ORG,
                roles=CLASSES[i % len(CLASSES)],
                now=now,
            )
            paths.append(f"/realtime/v1/websocket?ws_ticket={ticket}&organizationId={ORG}")
        return paths

    def bare_paths(self, count: int) -> list[str]:
        return [f"/bare?c={i % len(CLASSES)}" for i in range(count)]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(**settings: Any) -> Server:
    """walcast's gateway app (no pipeline) plus the bare baseline route, on a free port."""
    config = parse_realtime_config(tomllib.loads(CONFIG))
    port = _free_port()
    defaults: dict[str, Any] = {
        "access_tokens": (ACCESS_TOKEN,),
        "port": port,
        "max_connections_per_user": 0,
        "max_connections_per_org": 0,
        "handshake_rate": 0,
        "handshake_burst": 0,
    }
    app = make_app(Settings(**{**defaults, **settings}), config, run_pipeline=False)
    bare: set[web.WebSocketResponse] = set()
    bare_classes: dict[web.WebSocketResponse, int] = {}

    async def bare_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        bare.add(ws)
        bare_classes[ws] = int(request.query.get("c", "0"))
        try:
            await ws.send_str("hello")
            async for _ in ws:
                pass
        finally:
            bare.discard(ws)
            bare_classes.pop(ws, None)
        return ws

    app.router.add_get("/bare", bare_handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    server = Server(app, runner, port, app[STATE].registry)
    server.bare, server.bare_classes = bare, bare_classes
    return server


def row(i: int, pad: int = 60) -> dict[str, Any]:
    """A row whose event frame is about 300 bytes."""
    return {
        "id": i,
        "organizationId": ORG,
        "customer": "Ada Lovelace",
        "ssn": "123456789",
        "email": "paul@example.com",
        "status": "shipped",
        "note": "x" * pad,
    }


def change_event(server: Server, i: int, *, new: dict[str, Any] | None = None) -> ChangeEvent:
    lsn = server.next_lsn()
    table = server.app[STATE].config.tables["public.orders"]
    return ChangeEvent(
        organization_id=ORG,
        key=(lsn, 1),
        epoch="",
        commit_time=datetime.now(UTC),
        table=table,
        event_type="INSERT",
        new=new if new is not None else row(i),
        old=None,
        unchanged=(),
        target_user=None,
        owner_id=None,
    )


def end_event(server: Server) -> BroadcastEvent:
    lsn = server.next_lsn()
    return BroadcastEvent(
        organization_id=ORG,
        key=(lsn, 1),
        epoch="",
        event=END_MARKER.decode(),
        payload=orjson.Fragment(b"{}"),
        target_roles=frozenset(),
        target_user=None,
    )


# --- the client process ------------------------------------------------------------------------

_HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []  #: probes: receive time - commitTimestamp, seconds
        self.bytes = 0
        self.ready = 0
        self.ended = 0
        self.lost = 0
        self.changed = asyncio.Event()


class _Sink(asyncio.Protocol):
    """One client socket: counts bytes, notices the ready marker, then the end marker."""

    def __init__(self, stats: _Stats, request: bytes, ready_marker: bytes) -> None:
        self.stats = stats
        self.request = request
        self.ready_marker = ready_marker
        self.ready = False
        self.ended = False
        self.head = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.bytes += len(data)
        if not self.ready:
            self.head += data
            if self.ready_marker not in self.head:
                return
            self.ready = True
            stats.ready += 1
            stats.changed.set()
            data, self.head = self.head[self.head.index(self.ready_marker) :], b""
        if not self.ended and (
            END_MARKER in data or END_MARKER in self.tail + data[: len(END_MARKER)]
        ):
            self.ended = True
            stats.ended += 1
            stats.changed.set()
        self.tail = data[-len(END_MARKER) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.lost += 1
        self.stats.changed.set()


class _Probe(_Sink):
    """A socket that also parses its frames (RFC 6455 §5.2, unmasked server frames) and records,
    for each change event, receive time minus the event's `commitTimestamp`."""

    def __init__(self, stats: _Stats, request: bytes, ready_marker: bytes) -> None:
        super().__init__(stats, request, ready_marker)
        self.handshake = b""
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        now = time.time()
        was_ready = self.ready
        if not was_ready:
            self.handshake += data
        super().data_received(data)
        if not self.ready:
            return
        if not was_ready:  # frames start after the HTTP response's blank line
            data = self.handshake[self.handshake.index(b"\r\n\r\n") + 4 :]
            self.handshake = b""
        buffer = self.buffer + data
        while len(buffer) >= 2:
            size, start = buffer[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(buffer[2:4]), 4
            elif size == 127:
                size, start = int.from_bytes(buffer[2:10]), 10
            if len(buffer) < start + size:
                break
            payload = buffer[start : start + size]
            buffer = buffer[start + size :]
            at = payload.find(b'"commitTimestamp":"')
            if at >= 0:
                stamp = payload[at + 19 : payload.index(b'"', at + 19)].decode()
                self.stats.latencies.append(now - datetime.fromisoformat(stamp).timestamp())
        self.buffer = buffer


async def _client_main(port: int, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    stats = _Stats()
    sinks: list[_Sink] = []
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        os.set_blocking(pipe.fileno(), True)  # uvloop makes watched fds non-blocking
        commands.put_nowait(pipe.recv())

    loop.add_reader(pipe.fileno(), readable)

    async def wait_until(predicate: Any, seconds: float) -> bool:
        deadline = loop.time() + seconds
        while not predicate():
            stats.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stats.changed.wait(), remaining)
        return True

    while True:
        command, *args = await commands.get()
        os.set_blocking(pipe.fileno(), True)  # for the answer (uvloop made it non-blocking)
        if command == "connect":
            paths, ready_marker, seconds, probe = args
            kind = _Probe if probe else _Sink
            target = stats.ready + len(paths)
            limit = asyncio.Semaphore(200)

            async def open_one(
                path: str,
                limit: asyncio.Semaphore = limit,
                ready_marker: bytes = ready_marker,
                kind: type[_Sink] = kind,
            ) -> None:
                async with limit:
                    request = _HANDSHAKE.format(path=path).encode()
                    sink = kind(stats, request, ready_marker)
                    await loop.create_connection(lambda s=sink: s, "127.0.0.1", port)
                    sinks.append(sink)
                    await wait_until(lambda s=sink: s.ready or s.transport is None, 30)

            await asyncio.gather(*(open_one(p) for p in paths), return_exceptions=True)
            ok = await wait_until(lambda t=target: stats.ready >= t, seconds)
            pipe.send(("connected", stats.ready, ok))
        elif command == "await_end":
            (seconds,) = args
            total = len(sinks)
            ok = await wait_until(lambda t=total: stats.ended + stats.lost >= t, seconds)
            pipe.send(("ended", stats.ended, stats.lost, ok, stats.bytes))
        elif command == "close":
            for sink in sinks:
                if sink.transport is not None:
                    sink.transport.close()
            sinks.clear()
            await asyncio.sleep(0.2)  # let the close callbacks run (not a synchronization)
            stats.ready = stats.ended = stats.lost = 0
            pipe.send(("closed",))
        elif command == "latencies":
            pipe.send(("latencies", stats.latencies))
            stats.latencies = []
        elif command == "cpu":
            pipe.send(("cpu", time.process_time()))
        elif command == "quit":
            pipe.send(("bye",))
            return


def _client_entry(port: int, pipe: Pipe) -> None:
    raise_nofile(1 << 20)
    try:
        import uvloop

        uvloop.run(_client_main(port, pipe))
    except ImportError:
        asyncio.run(_client_main(port, pipe))


class ClientProcess:
    """The client sockets, in a process of their own, driven over a pipe."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.process = context.Process(target=_client_entry, args=(port, child), daemon=True)
        self.process.start()
        child.close()

    async def call(self, *command: Any) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        fd = self._pipe.fileno()

        def readable() -> None:
            os.set_blocking(fd, True)  # uvloop makes watched fds non-blocking
            if not answer.done():
                answer.set_result(self._pipe.recv())

        os.set_blocking(fd, True)
        loop.add_reader(fd, readable)
        try:
            os.set_blocking(fd, True)  # uvloop's add_reader made it non-blocking again
            self._pipe.send(command)
            return tuple(await answer)
        finally:
            loop.remove_reader(fd)

    async def connect(
        self,
        paths: Sequence[str],
        ready_marker: bytes,
        seconds: float = 120,
        *,
        probe: bool = False,
    ) -> int:
        """Open sockets (probes also time each change event) and wait until all are ready."""
        _, ready, ok = await self.call("connect", list(paths), ready_marker, seconds, probe)
        if not ok:
            raise RuntimeError(f"only {ready} of the sockets became ready")
        return int(ready)

    async def await_end(self, seconds: float = 120) -> tuple[int, int, bool, int]:
        _, ended, lost, ok, total = await self.call("await_end", seconds)
        return int(ended), int(lost), bool(ok), int(total)

    async def latencies(self) -> list[float]:
        """The probes' latencies since the last call (seconds), and start a new list."""
        _, values = await self.call("latencies")
        return list(values)

    async def cpu_seconds(self) -> float:
        """CPU time the client process has used so far: is the measuring side saturated?"""
        _, seconds = await self.call("cpu")
        return float(seconds)

    async def close_sockets(self) -> None:
        await self.call("close")

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("quit"), 10)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
