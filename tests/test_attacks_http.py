"""Attacks on the HTTP API, each against a real walcast on a real PostgreSQL (and Redis):

- bad input or a dependency that is down must never get a 5xx other than 503 + Retry-After;
- no error body may echo request bytes (request line, headers, tickets, tokens);
- `targetRoles: []` must not widen a namespace's `requiredRoles`;
- ws-ticket and broadcast are rate limited per client address (and per access token).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from gateway.broadcasts import target_roles
from gateway.config import Settings
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway, add_member, running_gateway

pytestmark = pytest.mark.integration

TICKET_URL = "/realtime/v1/ws-ticket"
BROADCAST_URL = "/realtime/v1/broadcast"
AUTH = {"Authorization": f"Bearer {ACCESS_TOKEN}"}


def _port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


async def _assert_unavailable(response: aiohttp.ClientResponse) -> None:
    """503, a `Retry-After` in whole seconds, and a JSON error body without a traceback."""
    body = await response.read()
    assert response.status == 503, (response.status, body[:300])
    assert int(response.headers["Retry-After"]) >= 1
    assert response.content_type == "application/json"
    error = orjson.loads(body)
    assert set(error) == {"error", "detail"} and error["error"] == "unavailable"
    assert b"Traceback" not in body


# -- a dependency that goes away ---------------------------------------------------------------


class Forwarder:
    """A TCP forwarder on a free loopback port in front of a real server, on an event loop of
    its own thread (the gateway's set-up makes blocking connections through it). `cut()`
    closes the listener and every forwarded connection: the server behind it now refuses
    connections, as far as walcast can tell, while the server itself (shared with other tests)
    stays up."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Forwarder]:
        self._thread.start()
        try:
            await self._call(self._start())
            yield self
        finally:
            await self.cut()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    async def _call(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        await self._call(self._cut())

    async def _cut(self) -> None:
        if self._server is None or not self._server.is_serving():
            return
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


def _pg_address(dsn: str) -> tuple[str, int]:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


async def test_postgres_down_gets_503_with_retry_after_not_500(database_url: str) -> None:
    async with (
        Forwarder(*_pg_address(database_url)).running() as forwarder,
        running_gateway(
            psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=forwarder.port)
        ) as gw,
    ):
        token = add_member(database_url, "down-user", "org-down", "recruiter")
        await gw.ticket(token, "org-down")  # works while PostgreSQL answers
        await forwarder.cut()
        for _ in range(3):  # the pool's idle connection dies first, then connects are refused
            async with gw.http.post(
                f"{gw.url}{TICKET_URL}", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await _assert_unavailable(response)
            async with gw.http.post(
                f"{gw.url}{BROADCAST_URL}",
                json={"organizationId": "org-down", "event": "e"},
                headers=AUTH,
            ) as response:
                await _assert_unavailable(response)
        async with gw.http.get(f"{gw.url}/healthz") as response:
            assert response.status == 200


async def test_redis_down_gets_503_with_retry_after(
    database_url: str,
    redis: aioredis.Redis,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WALCAST_REDIS_PREFIX", redis_prefix)
    address = redis.connection_pool.connection_kwargs
    forwarder = Forwarder(address.get("host", "127.0.0.1"), address.get("port", 6379))
    async with (
        forwarder.running(),
        running_gateway(database_url, redis_url=f"redis://127.0.0.1:{forwarder.port}/0") as gw,
    ):
        token = gw.add_member("redis-down", "org-rd", "owner")
        ticket = await gw.ticket(token, "org-rd")
        await forwarder.cut()
        params = {"ws_ticket": ticket, "organizationId": "org-rd"}
        async with gw.http.get(
            f"{gw.url}/realtime/v1/websocket", params=params, headers=_upgrade_headers()
        ) as response:
            await _assert_unavailable(response)
        # What does not need Redis keeps working; what does says 503, never 500.
        async with gw.http.post(
            f"{gw.url}{TICKET_URL}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            if response.status >= 500:
                await _assert_unavailable(response)


def _upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }


# -- payload limits ----------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    """A broadcast body whose payload is `depth` arrays deep, written by hand: orjson refuses
    to write one past 254 levels."""
    payload = b"[" * depth + b"1" + b"]" * depth
    return b'{"organizationId": "o", "event": "e", "payload": ' + payload + b"}"


async def _post_broadcast(gw: Gateway, body: bytes) -> tuple[int, Any]:
    async with gw.http.post(f"{gw.url}{BROADCAST_URL}", data=body, headers=AUTH) as response:
        body = await response.read()
        assert response.status < 500, (response.status, body[:200])
        return response.status, orjson.loads(body)


async def test_deeply_nested_broadcast_payload_gets_400_naming_the_limit(gw: Gateway) -> None:
    for depth in (254, 1000, 65):  # 254: past orjson's own limit; 1000: still parses
        status, error = await _post_broadcast(gw, _nested(depth))
        assert status == 400, (depth, error)
        assert "payload nests deeper than 64 levels" in str(error["detail"])
    status, _ = await _post_broadcast(gw, _nested(64))
    assert status == 202
    status, error = await _post_broadcast(gw, _nested(2000))  # past orjson's parse limit
    assert status == 400 and error["error"] == "invalid JSON"
    big = {"organizationId": "o", "event": "e", "payload": "x" * (300 * 1024)}
    status, error = await _post_broadcast(gw, orjson.dumps(big))
    assert status == 413 and str(256 * 1024) in error["detail"]


# -- error bodies ------------------------------------------------------------------------------


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_malformed_requests_never_echo_tickets_or_tokens(gw: Gateway) -> None:
    ticket = mint_ticket(ACCESS_TOKEN, user_id="u-echo", organization_id="o", roles=["owner"])
    ws = f"/realtime/v1/websocket?ws_ticket={ticket}&organizationId=o"
    requests = [
        f"GET {ws}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",  # control character in the URL
        f"G@T {ws} HTTP/1.1\r\nHost: x\r\n\r\n",  # invalid method
        f"GET {ws} HTTP/9.9\r\nHost: x\r\n\r\n",  # invalid version
        f"GET {ws}&pad={'p' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
        # an oversized Authorization header, and one with a control character
        f"POST {BROADCAST_URL} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ACCESS_TOKEN}{'b' * 9000}\r\n\r\n",
        f"POST {BROADCAST_URL} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ACCESS_TOKEN}\x01\r\n\r\n",
        f"POST {TICKET_URL} HTTP/1.1\r\nHost: x\r\nX-Internal-Secret: {ACCESS_TOKEN}\x00\r\n\r\n",
        f"POST {TICKET_URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {ACCESS_TOKEN}\r\n\r\n",
        f"POST {TICKET_URL} HTTP/1.1\r\nHost: x\r\n{ACCESS_TOKEN}\x01: v\r\n\r\n",  # bad name
    ]
    secrets = [ticket, ticket.split(".")[1][:24], ticket.split(".")[2], ACCESS_TOKEN]
    for request in requests:
        answer = await _raw(_port(gw), request.encode("latin-1"))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", (request[:60], answer[:200])
        for secret in secrets:
            assert secret.encode() not in answer, (request[:60], answer[:400])
        error = orjson.loads(body)
        assert set(error) == {"error", "detail"} and error["error"] == "bad request"
    async with gw.http.get(f"{gw.url}/healthz") as response:  # the server is unharmed
        assert response.status == 200


# -- targetRoles and a namespace's requiredRoles -----------------------------------------------


def test_target_roles_are_bounded_by_the_namespace() -> None:
    required = ("recruiter", "hiring-manager")
    assert target_roles("ns", required, None) == required
    assert target_roles("ns", required, []) == required  # never "every member"
    assert target_roles("ns", required, ["owner", "recruiter", "recruiter"]) == ("recruiter",)
    refused = target_roles("ns", required, ["owner"])
    assert isinstance(refused, str) and "nobody" in refused
    assert target_roles("", (), []) == ()  # no namespace: no roles means every member
    assert target_roles("", (), ["owner"]) == ("owner",)


def _got(event: str) -> Any:
    return lambda message: message.get("type") == "broadcast" and message.get("event") == event


async def test_empty_target_roles_never_widen_a_namespace(gw: Gateway) -> None:
    # Namespace "screening" requires "recruiter" (tests.fix_gateway.TEST_CONFIG).
    recruiter = await gw.connect(gw.add_member("ns-rec", "org-ns", "recruiter"), "org-ns")
    owner = await gw.connect(gw.add_member("ns-owner", "org-ns", "owner"), "org-ns")
    for step, roles in enumerate(([], ["owner", "recruiter"], None)):
        body: dict[str, Any] = {
            "organizationId": "org-ns",
            "event": "screening:progress",
            "payload": {"step": step},
        }
        if roles is not None:
            body["targetRoles"] = roles
        assert (await gw.broadcast(body)).status == 202
        await recruiter.wait_for(lambda m, step=step: m.get("payload") == {"step": step})
    # The owner sees a later broadcast meant for everyone, so anything earlier has arrived.
    assert (await gw.broadcast({"organizationId": "org-ns", "event": "sentinel"})).status == 202
    await owner.wait_for(_got("sentinel"))
    assert not [m for m in owner.messages if m.get("event") == "screening:progress"]
    # A target that shares no role with the namespace would reach nobody: refused, not widened.
    body = {"organizationId": "org-ns", "event": "screening:progress", "targetRoles": ["owner"]}
    response = await gw.broadcast(body)
    assert response.status == 400


# -- rate limits -------------------------------------------------------------------------------


def test_settings_read_the_api_limits_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "WALCAST_TICKET_RATE": "2.5",
            "WALCAST_TICKET_BURST": "9",
            "WALCAST_BROADCAST_RATE": "0",
            "WALCAST_BROADCAST_BURST": "7",
        }
    )
    assert (settings.ticket_rate, settings.ticket_burst) == (2.5, 9)
    assert (settings.broadcast_rate, settings.broadcast_burst) == (0, 7)
    defaults = Settings()
    assert (defaults.ticket_rate, defaults.ticket_burst) == (20.0, 200)
    assert (defaults.broadcast_rate, defaults.broadcast_burst) == (200.0, 2000)


@contextlib.asynccontextmanager
async def _client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from `address` (any 127.x.y.z reaches the loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def test_ws_ticket_and_broadcast_bursts_get_429_per_address_and_token(
    database_url: str,
) -> None:
    limits = {"ticket_rate": 0.1, "ticket_burst": 5, "broadcast_rate": 0.1, "broadcast_burst": 5}
    async with running_gateway(database_url, **limits) as gw:
        token = gw.add_member("rl-user", "org-rl", "recruiter")
        # A burst of bad ws-ticket calls from one address: 401 while the bucket lasts, then 429.
        statuses = []
        for _ in range(8):
            async with gw.http.post(
                f"{gw.url}{TICKET_URL}", headers={"Authorization": "Bearer guessed"}
            ) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
                    assert (await response.json())["error"] == "too many requests"
        assert statuses == [401] * 5 + [429] * 3
        async with _client_from("127.0.0.2") as other:  # another address is not affected
            async with other.post(
                f"{gw.url}{TICKET_URL}", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 200
        # Broadcasts with a wrong token: limited per address before authentication.
        wrong = {"Authorization": "Bearer wrong-token"}
        body = {"organizationId": "org-rl", "event": "e"}
        statuses = []
        for _ in range(7):
            async with gw.http.post(f"{gw.url}{BROADCAST_URL}", json=body, headers=wrong) as r:
                statuses.append(r.status)
        assert statuses == [401] * 5 + [429] * 2
        # The access token itself has a bucket, whatever address presents it.
        async with _client_from("127.0.0.3") as other:
            statuses = []
            for _ in range(7):
                async with other.post(f"{gw.url}{BROADCAST_URL}", json=body, headers=AUTH) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1
            assert statuses == [202] * 5 + [429] * 2
        async with _client_from("127.0.0.4") as other:
            async with other.post(f"{gw.url}{BROADCAST_URL}", json=body, headers=AUTH) as r:
                assert r.status == 429
        async with gw.http.get(f"{gw.url}/healthz") as response:
            assert response.status == 200
