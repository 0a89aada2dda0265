"""Server-level connection limits: what aiohttp's server does not bound on its own.

One client must not be able to hold the process's file descriptors, and a connection that sends
nothing useful must not stay open. `ConnectionGuard.for_app(app)` is the one hook: its
`handler_args` go to `web.AppRunner`, and `guard.site(runner, host, port)` replaces
`web.TCPSite`. The rules, in the order a connection meets them:

1. Per address: at most `max_connections_per_address` open connections (WebSockets included)
   per client IPv4 address or IPv6 /64. One more is answered 429 and closed at once, before a
   byte of it is parsed. Behind a reverse proxy every client has the proxy's address: raise the
   cap there, or set 0 (no cap).
2. Idle: a new connection that sends no byte within `idle_timeout_seconds` is closed.
3. Headers: from its first byte, the first request's headers must be complete within
   `header_timeout_seconds`, so a trickle (slowloris) is closed.
4. Keep-alive: after a response, aiohttp closes a connection that has not sent its next
   complete request within `keepalive_timeout_seconds` (aiohttp arms that timer at accept too).
   A WebSocket, once upgraded, is the heartbeat's business.
5. File descriptors: at start the soft `RLIMIT_NOFILE` is raised to the hard limit. When
   accept() fails for lack of descriptors, one reserved descriptor is freed to accept and close
   the connections waiting in the backlog (refused at once, not left hanging), and asyncio's
   log line per failed accept becomes one line per `LOG_INTERVAL` plus a counter
   (`walcast_accept_errors_total`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.state import STATE

__all__ = [
    "ConnectionGuard",
    "ConnectionLimits",
    "LimitedSite",
    "Throttle",
    "address_key",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)

#: Seconds between two log lines about the same kind of refusal.
LOG_INTERVAL = 60.0
#: At most this many waiting connections are refused per failed accept.
MAX_REFUSED_PER_ACCEPT = 1024
#: asyncio retries a failed accept this many seconds later (asyncio.constants).
_ACCEPT_RETRY_DELAY = 1.0

#: accept() errors that mean "out of a resource", with what to call them in the log.
_RESOURCE_ERRORS = {
    errno.EMFILE: "out of file descriptors (the process limit)",
    errno.ENFILE: "out of file descriptors (the system-wide limit)",
    errno.ENOBUFS: "out of kernel memory for sockets",
    errno.ENOMEM: "out of kernel memory for sockets",
}

_BODY = b"too many connections from this address\n"
_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 5\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    idle_timeout: float
    header_timeout: float
    keepalive_timeout: float
    #: 0: no cap.
    max_per_address: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            idle_timeout=settings.idle_timeout_seconds,
            header_timeout=settings.header_timeout_seconds,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            max_per_address=settings.max_connections_per_address,
        )


def address_key(peername: Any) -> str | None:
    """The client a connection counts against: its IPv4 address, or its IPv6 /64 (one host
    usually holds a whole /64); None when there is no IP peer (a Unix socket)."""
    if not isinstance(peername, tuple) or not peername:
        return None
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def raise_fd_limit() -> int:
    """Raise the soft `RLIMIT_NOFILE` to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        log.info("file descriptor limit: %s", "unlimited" if soft < 0 else soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("file descriptor limit: %d (raising it to %d failed: %s)", soft, hard, exc)
        return soft
    log.info("file descriptor limit: %d (raised from %d to the hard limit)", hard, soft)
    return hard


class Throttle:
    """`due()` is true at most once per `interval`, the first time at once."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = -math.inf

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True


class ConnectionGuard:
    """Counts connections per address, times out silent ones, and degrades on fd exhaustion."""

    def __init__(
        self,
        limits: ConnectionLimits,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._open: dict[str, int] = {}
        self._cap_log = Throttle(LOG_INTERVAL, clock)
        self._cap_refused = 0
        self._fd_log = Throttle(LOG_INTERVAL, clock)
        self._fd_errors = 0
        self._fd_refused = 0
        self._fd_limit = -1
        self._fd_last_error = errno.EMFILE
        self._last_accept_error = -math.inf
        self._listening: set[int] = set()
        self._reserve: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None

    @classmethod
    def for_app(cls, app: web.Application) -> ConnectionGuard:
        state = app[STATE]
        return cls(ConnectionLimits.from_settings(state.settings), state.metrics)

    @property
    def handler_args(self) -> dict[str, Any]:
        """Keyword arguments for `web.AppRunner` (passed on to aiohttp's request handler)."""
        return {"keepalive_timeout": self.limits.keepalive_timeout}

    def site(self, runner: web.BaseRunner, host: str, port: int) -> LimitedSite:
        return LimitedSite(runner, host, port, self)

    # -- per connection --------------------------------------------------------------------

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose connections obey the limits, around aiohttp's `factory`."""

        def make() -> asyncio.Protocol:
            return _GuardedConnection(self, factory)

        return make

    def admit(self, key: str | None) -> bool:
        """Count a new connection from `key` in, unless that address is at its cap."""
        cap = self.limits.max_per_address
        if key is None or not cap:
            return True
        count = self._open.get(key, 0)
        if count < cap:
            self._open[key] = count + 1
            return True
        self._cap_refused += 1
        self.count_refused("per_address")
        if self._cap_log.due():
            log.warning(
                "refused %d connection(s) over the cap of %d per client address, the last from "
                "%s (WALCAST_MAX_CONNECTIONS_PER_ADDRESS; behind a proxy, raise it or set 0)",
                self._cap_refused,
                cap,
                key,
            )
            self._cap_refused = 0
        return False

    def release(self, key: str | None) -> None:
        if key is None or not self.limits.max_per_address:
            return
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count_refused(self, reason: str, amount: int = 1) -> None:
        if self._metrics is not None and amount:
            self._metrics.connections_refused.labels(reason).inc(amount)

    # -- per listener: file descriptors and asyncio's accept errors --------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Raise the fd limit, reserve one descriptor, and take over asyncio's accept errors."""
        if self._loop is not None:
            return
        self._fd_limit = raise_fd_limit()
        self._reserve = _open_reserve()
        self._loop = loop
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_exception)

    def listen_on(self, fds: set[int]) -> None:
        self._listening |= fds

    def accept_retries_pending(self) -> float:
        """Seconds until asyncio's retries of the last failed accept have run (0: none)."""
        if self._loop is None:
            return 0.0
        return max(0.0, self._last_accept_error + _ACCEPT_RETRY_DELAY + 0.05 - self._loop.time())

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._fd_errors:  # what the throttle held back
            self._report_fd_errors()
        if self._loop.get_exception_handler() == self._on_loop_exception:
            self._loop.set_exception_handler(self._previous_handler)
        self._loop = None
        self._listening.clear()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        if (
            isinstance(exc, OSError)
            and exc.errno in _RESOURCE_ERRORS
            and sock is not None
            and sock.fileno() in self._listening
        ):
            self._accept_failed(exc.errno, sock.fileno())
        elif self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def _accept_failed(self, code: int, listener: int) -> None:
        """asyncio stops accepting on `listener` for a second; refuse who waits meanwhile."""
        refused = self._refuse_waiting(listener) if code in (errno.EMFILE, errno.ENFILE) else 0
        self._fd_errors += 1
        self._fd_refused += refused
        if self._loop is not None:
            self._last_accept_error = self._loop.time()
        if self._metrics is not None:
            self._metrics.accept_errors.labels(errno.errorcode[code]).inc()
        self.count_refused("out_of_fds", refused)
        self._fd_last_error = code
        if self._fd_log.due():
            self._report_fd_errors()

    def _report_fd_errors(self) -> None:
        log.error(
            "%s: %d accept error(s), %d waiting connection(s) refused since the last report "
            "(fd limit %d)",
            _RESOURCE_ERRORS[self._fd_last_error],
            self._fd_errors,
            self._fd_refused,
            self._fd_limit,
        )
        self._fd_errors = self._fd_refused = 0

    def _refuse_waiting(self, listener: int) -> int:
        """Accept and close what waits on `listener`, using the reserved descriptor's slot."""
        if self._reserve is None:
            return 0
        os.close(self._reserve)
        self._reserve = None
        refused = 0
        sock = socket.socket(fileno=listener)  # borrowed: detached below, never closed
        try:
            for _ in range(MAX_REFUSED_PER_ACCEPT):
                try:
                    conn, _ = sock.accept()
                except OSError:  # the backlog is empty (or the slot was taken meanwhile)
                    break
                conn.close()
                refused += 1
        finally:
            sock.detach()
            self._reserve = _open_reserve()
        return refused


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _GuardedConnection(asyncio.Protocol):
    """One accepted connection: the cap and the pre-request timers, then aiohttp's handler.

    Until the first request's headers are complete, a timer runs: `idle_timeout` until the first
    byte, then `header_timeout`. The end of the headers is an empty line (`\\n\\n` or
    `\\n\\r\\n`); a false positive only hands the connection to aiohttp's keep-alive timer early.
    """

    __slots__ = ("_factory", "_guard", "_inner", "_key", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._key: str | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: None until the first byte; then the last bytes seen, to find the empty line.
        self._tail: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        key = address_key(transport.get_extra_info("peername"))
        if not guard.admit(key):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._key = key
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(guard.limits.idle_timeout, self._expire, "idle_timeout")
        self._inner = inner = self._factory()
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        if self._timer is not None:
            self._watch(data)
        inner.data_received(data)

    def _watch(self, data: bytes) -> None:
        assert self._timer is not None
        if self._tail is None:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(
                self._guard.limits.header_timeout, self._expire, "header_timeout"
            )
            self._tail = b""
        seen = self._tail + data
        if b"\n\n" in seen or b"\n\r\n" in seen:
            self._timer.cancel()
            self._timer = None
        else:
            self._tail = seen[-2:]

    def _expire(self, reason: str) -> None:
        self._timer = None
        self._guard.count_refused(reason)
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._transport = None
        self._guard.release(self._key)
        inner.connection_lost(exc)


class LimitedSite(web.BaseSite):
    """`web.TCPSite`, with every accepted connection under a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._guard.start(loop)
        self._server = await loop.create_server(
            self._guard.wrap(server), self._host, self._port, backlog=self._backlog
        )
        self._guard.listen_on({sock.fileno() for sock in self._server.sockets})

    async def stop(self) -> None:
        # asyncio retries a failed accept on this socket a second later (older Pythons schedule
        # it once per accept attempt): closing the socket first makes each retry log a traceback.
        await asyncio.sleep(self._guard.accept_retries_pending())
        await super().stop()
        self._guard.stop()
