"""A real walcast (pipeline + gateway) on a free port, against the test PostgreSQL, plus a small
client to drive it: users and sessions, tickets, sockets that record what they receive.

Negative checks ("X receives nothing") never sleep: the test commits a sentinel event that X
may see after the event under test; commit order is delivery order, so once the sentinel has
arrived, anything that was going to arrive before it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web

from gateway.broadcasts import BroadcastSigner
from gateway.config import RealtimeConfig, Settings, parse_realtime_config
from gateway.state import STATE
from walcast.app import make_app
from walcast.cli import apply_migrations

ACCESS_TOKEN = "test-access-token-0123456789-abcdefgh"

TEST_CONFIG = """
historySeconds = 120

[tables."public.applications"]
requiredRoles = ["hiring-manager", "recruiter", "owner"]
ownerColumn = "createdBy"
fields = ["id", "organizationId", "candidateId", "stage", "ssn", "email", "createdBy", "notes"]

[tables."public.applications".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
email = { type = "email", show = { roles = ["owner"], or = "owner" } }

[tables.notifications]
userColumn = "userId"

[namespaces.screening]
events = ["started", "progress", "complete"]
requiredRoles = ["recruiter"]
"""

TEST_SCHEMA = """
CREATE TABLE applications (
    id text PRIMARY KEY,
    "organizationId" text,
    "candidateId" text,
    stage text,
    ssn text,
    email text,
    "createdBy" text,
    notes text,
    secret text
);
ALTER TABLE applications REPLICA IDENTITY FULL;
CREATE TABLE notifications (
    id serial PRIMARY KEY,
    "organizationId" text NOT NULL,
    "userId" text NOT NULL,
    message text NOT NULL
);
ALTER TABLE notifications REPLICA IDENTITY FULL;
"""


def signed_broadcast(body: dict[str, Any], secret: str = ACCESS_TOKEN) -> str:
    """The content walcast's broadcast API would write for `body`, signed with `secret`: for
    tests that write broadcasts straight into the WAL with pg_logical_emit_message."""
    return BroadcastSigner([secret]).sign(orjson.dumps(body)).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_member(dsn: str, user: str, org: str, roles: str) -> str:
    """Create (if needed) the user, org and membership; return a new session token."""
    token = secrets.token_urlsafe(24)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING',
            (user, user, f"{user}@example.com"),
        )
        conn.execute(
            "INSERT INTO organization (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (org, org),
        )
        conn.execute(
            'INSERT INTO member (id, "organizationId", "userId", role) VALUES (%s, %s, %s, %s)',
            (uuid.uuid4().hex, org, user, roles),
        )
        conn.execute(
            'INSERT INTO "session" (id, token, "userId", "expiresAt", "activeOrganizationId")'
            " VALUES (%s, %s, %s, now() + interval '1 hour', %s)",
            (uuid.uuid4().hex, token, user, org),
        )
    return token


def walcast_command() -> list[str]:
    """How to run the `walcast` CLI from this virtualenv, as a subprocess."""
    script = Path(sys.executable).with_name("walcast")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from walcast.cli import main; main()"]


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment without any walcast or libpq settings, plus `values`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "ACCESS_TOKEN", "REDIS_URL")
        and not key.startswith(("WALCAST_", "PG"))
    }
    env.update(values)
    return env


@dataclass
class Socket:
    """A connected client socket that records every message it receives."""

    ws: aiohttp.ClientWebSocketResponse
    messages: list[dict[str, Any]] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None
    close_code: int | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                try:
                    parsed = orjson.loads(message.data)
                except orjson.JSONDecodeError:
                    parsed = {"type": "text", "data": message.data}
                async with self._arrived:
                    self.messages.append(parsed)
                    self._arrived.notify_all()
        self.close_code = self.ws.close_code
        async with self._arrived:
            self._arrived.notify_all()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        async def match() -> dict[str, Any]:
            async with self._arrived:
                while True:
                    for message in self.messages:
                        if predicate(message):
                            return message
                    if self.ws.closed and self._reader is not None and self._reader.done():
                        raise AssertionError(f"socket closed ({self.close_code}) before a match")
                    await self._arrived.wait()

        return await asyncio.wait_for(match(), timeout)

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["type"] not in ("system", "text") and (kind is None or m["type"] == kind)
        ]

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await self._reader


@dataclass
class Gateway:
    url: str
    dsn: str
    app: web.Application
    http: aiohttp.ClientSession
    settings: Settings
    sockets: list[Socket] = field(default_factory=list)

    def sql(self, query: str, params: Any = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)

    def add_member(self, user: str, org: str, roles: str) -> str:
        return add_member(self.dsn, user, org, roles)

    async def ticket(self, token: str, org: str | None = None) -> str:
        body = {"organizationId": org} if org else None
        async with self.http.post(
            f"{self.url}/realtime/v1/ws-ticket",
            headers={"Authorization": f"Bearer {token}"},
            json=body,
        ) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["expiresIn"] == 60
        return str(answer["wsTicket"])

    async def connect(
        self,
        token: str,
        org: str,
        *,
        since: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> Socket:
        ticket = await self.ticket(token, org)
        return await self.connect_ticket(ticket, org, since=since, extra=extra)

    async def connect_ticket(
        self,
        ticket: str,
        org: str,
        *,
        since: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> Socket:
        """A socket that has been told `ready`; `extra` are more query parameters (a name may
        repeat)."""
        params = [("ws_ticket", ticket), ("organizationId", org)]
        if since is not None:
            params.append(("since", since))
        params.extend(extra)
        ws = await self.http.ws_connect(f"{self.url}/realtime/v1/websocket", params=params)
        sock = Socket(ws)
        sock.start()
        self.sockets.append(sock)
        await sock.wait_for(lambda m: m.get("event") == "ready")
        return sock

    async def upgrade_status(self, params: dict[str, str]) -> int:
        """The handshake's HTTP status: 101 when the socket opened (it is closed again)."""
        try:
            ws = await self.http.ws_connect(f"{self.url}/realtime/v1/websocket", params=params)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101

    async def broadcast(self, body: dict[str, Any], **headers: str) -> aiohttp.ClientResponse:
        headers = headers or {"Authorization": f"Bearer {ACCESS_TOKEN}"}
        async with self.http.post(
            f"{self.url}/realtime/v1/broadcast", data=orjson.dumps(body), headers=headers
        ) as response:
            await response.read()
            return response

    @property
    def metrics(self) -> Any:
        return self.app[STATE].metrics


async def start_gateway(
    dsn: str,
    *,
    config: RealtimeConfig | None = None,
    schema: str = TEST_SCHEMA,
    **settings: Any,
) -> tuple[Gateway, web.AppRunner]:
    apply_migrations(dsn)
    if schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(schema.encode())
    config = config or parse_realtime_config(_toml(TEST_CONFIG))
    port = free_port()
    # Tests open hundreds of sockets from one address; the per-address ticket rate limit has its
    # own attack tests (tests/test_attacks_http.py), which set it explicitly.
    settings.setdefault("ticket_rate", 0)
    values = {"database_url": dsn, "access_tokens": (ACCESS_TOKEN,), "port": port, **settings}
    cfg = Settings(**values)
    app = make_app(cfg, config)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.wait_for(app[STATE].readiness.wait(), 30)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    return Gateway(f"http://127.0.0.1:{port}", dsn, app, http, cfg), runner


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


@contextlib.asynccontextmanager
async def running_gateway(dsn: str, **options: Any) -> AsyncIterator[Gateway]:
    """`start_gateway`, then close its sockets, client session and app on the way out."""
    gw, runner = await start_gateway(dsn, **options)
    try:
        yield gw
    finally:
        for sock in gw.sockets:
            if not sock.ws.closed:
                await sock.ws.close()
        await gw.http.close()
        await runner.cleanup()


@pytest.fixture
async def gw(database_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(database_url) as running:
        yield running
