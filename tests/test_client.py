"""walcast.client against a real walcast: events, restarts with a fresh ticket and `since`,
resync, permanent refusals, and `Realtime.broadcast` (the one broadcast client: refused,
unreachable)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import parse_realtime_config
from gateway.state import STATE
from gateway.tickets import verify_ticket
from tests.fix_gateway import ACCESS_TOKEN, TEST_CONFIG, Gateway, _toml, free_port, start_gateway
from walcast import mint_ticket
from walcast.app import make_app
from walcast.client import (
    AuthenticationError,
    BroadcastError,
    Realtime,
    RealtimeClient,
    RealtimeError,
    UnreachableError,
    broadcast_body,
)

pytestmark = pytest.mark.integration

ORG = "org_c"


class Inbox:
    """Collects what a client's handlers receive and lets a test await a condition."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def handle(self, message: dict[str, Any]) -> None:
        async with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] != "system"]

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(until(), timeout)


class TicketLog:
    """Records the client's real HTTP requests (aiohttp tracing): tickets asked, sockets opened."""

    def __init__(self) -> None:
        self.ticket_requests = 0
        self.socket_params: list[dict[str, str]] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)

    async def _start(self, session: Any, ctx: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if params.url.path == "/realtime/v1/ws-ticket":
            self.ticket_requests += 1
        elif params.url.path == "/realtime/v1/websocket":
            self.socket_params.append(dict(params.url.query))


def _rows(inbox: Inbox) -> list[str]:
    return [
        m["new"]["id"]
        for m in inbox.events()
        if m["type"] == "postgres_changes" and m["eventType"] == "INSERT"
    ]


def _insert(gw: Gateway, *ids: str) -> None:
    for row in ids:
        gw.sql(
            "INSERT INTO applications (id, \"organizationId\", stage) VALUES (%s, %s, 'new')",
            (row, ORG),
        )


async def _restart(gw: Gateway, runner: web.AppRunner, port: int) -> web.AppRunner:
    """Stop the gateway, commit while it is down, start a new one on the same port."""
    await runner.cleanup()
    _insert(gw, "down-1", "down-2", "down-3")
    config = parse_realtime_config(_toml(TEST_CONFIG))
    app = make_app(gw.settings, config)
    new_runner = web.AppRunner(app, shutdown_timeout=2.0)
    await new_runner.setup()
    await web.TCPSite(new_runner, "127.0.0.1", port).start()
    await asyncio.wait_for(app[STATE].readiness.wait(), 30)
    return new_runner


async def test_receives_events_and_resumes_after_a_restart_with_a_fresh_ticket(
    database_url: str,
) -> None:
    gw, runner = await start_gateway(database_url)
    token = gw.add_member("u_client", ORG, "recruiter")
    trace = TicketLog()
    inbox = Inbox()
    http = aiohttp.ClientSession(trace_configs=[trace.config])
    client = RealtimeClient(
        gw.url,
        token,
        ORG,
        on_change=inbox.handle,
        on_broadcast=inbox.handle,
        on_system=inbox.handle,
        backoff_base=0.05,
        backoff_cap=0.3,
        session=http,
    )
    try:
        async with client:
            await asyncio.wait_for(client.ready.wait(), 15)
            _insert(gw, "up-1", "up-2")
            await inbox.wait_for(lambda box: _rows(box) == ["up-1", "up-2"])
            before_restart = client.cursor
            assert before_restart == inbox.events()[-1]["id"]

            runner = await _restart(gw, runner, gw.settings.port)
            await inbox.wait_for(lambda box: len(_rows(box)) >= 5)
            _insert(gw, "after-1")
            await inbox.wait_for(lambda box: "after-1" in _rows(box))

            # Nothing lost, nothing twice, in commit order.
            assert _rows(inbox) == ["up-1", "up-2", "down-1", "down-2", "down-3", "after-1"]
            ids = [m["id"] for m in inbox.events()]
            assert ids == sorted(set(ids))
            # A second (and fresh) ticket, and the resume cursor on the new socket.
            assert trace.ticket_requests >= 2
            assert client.connections >= 2
            first, last = trace.socket_params[0], trace.socket_params[-1]
            assert "since" not in first
            assert last["since"] == before_restart
            assert first["ws_ticket"] != last["ws_ticket"]
            assert [m["event"] for m in inbox.messages if m["type"] == "system"].count("ready") >= 2
            assert not any(m.get("event") == "resync_required" for m in inbox.messages)
    finally:
        await http.close()
        await gw.http.close()
        await runner.cleanup()


async def test_resync_required_calls_the_handler_and_adopts_the_new_cursor(gw: Gateway) -> None:
    token = gw.add_member("u_resync", ORG, "owner")
    resyncs: list[dict[str, Any]] = []
    inbox = Inbox()
    future = "FFFFFFFFFFFFFFFE-0001"  # ahead of the stream: the server cannot resume from it
    async with RealtimeClient(
        gw.url, token, ORG, on_resync=resyncs.append, on_change=inbox.handle, since=future
    ) as client:
        await asyncio.wait_for(client.ready.wait(), 15)
        assert [r["event"] for r in resyncs] == ["resync_required"]
        assert resyncs[0]["payload"]["cursor"] == future
        _insert(gw, "r-1")
        await inbox.wait_for(lambda box: _rows(box) == ["r-1"])


async def test_sync_handlers_and_handler_errors_do_not_stop_the_client(gw: Gateway) -> None:
    token = gw.add_member("u_sync", ORG, "owner")
    seen: list[str] = []
    arrived = asyncio.Event()

    def on_change(message: dict[str, Any]) -> None:
        seen.append(message["new"]["id"])
        if len(seen) == 2:
            arrived.set()
        if len(seen) == 1:
            raise RuntimeError("handler bug")

    async with RealtimeClient(gw.url, token, ORG, on_change=on_change) as client:
        await asyncio.wait_for(client.ready.wait(), 15)
        _insert(gw, "s-1", "s-2")
        await asyncio.wait_for(arrived.wait(), 15)
    assert seen == ["s-1", "s-2"]


async def test_refused_session_raises_instead_of_retrying(gw: Gateway) -> None:
    client = RealtimeClient(gw.url, "no-such-session", ORG, backoff_base=0.01, backoff_cap=0.02)
    with pytest.raises(AuthenticationError) as refused:
        await asyncio.wait_for(client.run(), 10)
    assert refused.value.status == 401
    await client.close()

    token = gw.add_member("u_other", "org_other", "owner")
    client = RealtimeClient(gw.url, token, ORG)
    with pytest.raises(AuthenticationError) as forbidden:
        await asyncio.wait_for(client.run(), 10)
    assert forbidden.value.status == 403
    await client.close()


async def test_close_during_back_off_returns_promptly() -> None:
    from tests.fix_gateway import free_port

    failed = asyncio.Event()
    trace = aiohttp.TraceConfig()

    async def on_exception(session: Any, ctx: Any, params: Any) -> None:
        failed.set()

    trace.on_request_exception.append(on_exception)
    http = aiohttp.ClientSession(trace_configs=[trace])
    # Nothing listens on this port: the first attempt fails and the client backs off (long).
    client = RealtimeClient(
        f"http://127.0.0.1:{free_port()}", "t", ORG, backoff_base=30, backoff_cap=60, session=http
    )
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(failed.wait(), 5)
        started = time.monotonic()
        await asyncio.wait_for(client.close(), 5)
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 2
        assert client.connections == 0
    finally:
        await http.close()


async def test_access_change_reconnects_with_the_new_roles(gw: Gateway) -> None:
    token = gw.add_member("u_role", ORG, "recruiter")
    inbox = Inbox()
    async with RealtimeClient(
        gw.url,
        token,
        ORG,
        on_broadcast=inbox.handle,
        on_system=inbox.handle,
        backoff_base=0.02,
        backoff_cap=0.1,
    ) as client:
        await asyncio.wait_for(client.ready.wait(), 15)
        gw.sql("""UPDATE member SET role = 'owner' WHERE "userId" = 'u_role'""")

        def ready_as_owner(box: Inbox) -> bool:
            return any(
                m.get("event") == "ready" and m["payload"]["roles"] == ["owner"]
                for m in box.messages
            )

        await inbox.wait_for(ready_as_owner)
        invalidated = [m for m in inbox.messages if m.get("event") == "auth:token-invalidated"]
        assert invalidated[0]["payload"] == {"reason": "role-changed"}
        assert client.connections == 2


async def test_realtime_broadcast_returns_the_lsn_and_reaches_the_socket(gw: Gateway) -> None:
    token = gw.add_member("u_bc", ORG, "recruiter")
    sock = await gw.connect(token, ORG)
    async with Realtime(gw.url, ACCESS_TOKEN + ",older-secret") as realtime:
        lsn = await realtime.broadcast(
            ORG, "screening:complete", {"applicationId": "app_1"}, target_roles=["recruiter"]
        )
        assert "/" in lsn
        message = await sock.wait_for(lambda m: m["type"] == "broadcast")
        assert message["event"] == "screening:complete"
        assert message["payload"] == {"applicationId": "app_1"}

        with pytest.raises(BroadcastError) as undeclared:
            await realtime.broadcast(ORG, "screening:nope")
        assert undeclared.value.status == 400

    async with Realtime(gw.url, "wrong-token") as bad:
        with pytest.raises(BroadcastError) as refused:
            await bad.broadcast(ORG, "hello")
        assert refused.value.status == 401


def test_mint_ticket_is_exported_from_walcast() -> None:
    ticket = mint_ticket(ACCESS_TOKEN, user_id="u", organization_id="o", roles=["a"])
    claims = verify_ticket(ticket, [ACCESS_TOKEN], now=time.time())
    assert (claims.user_id, claims.organization_id, claims.roles) == ("u", "o", frozenset({"a"}))


async def test_realtime_says_when_walcast_cannot_be_reached() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Realtime(url, ACCESS_TOKEN) as realtime:
        with pytest.raises(UnreachableError) as unreachable:
            await realtime.broadcast(ORG, "hello")
    assert isinstance(unreachable.value, RealtimeError)
    assert str(unreachable.value).startswith(f"cannot reach walcast at {url} (")


async def test_a_refusal_that_is_not_json_keeps_its_status_and_text() -> None:
    """A proxy in front of walcast may answer in HTML; the error still says what came back."""

    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>" + "x" * 1000 + "</html>")

    app = web.Application()
    app.router.add_post("/realtime/v1/broadcast", bad_gateway)
    async with TestServer(app) as server, Realtime(str(server.make_url("/")), "t") as realtime:
        with pytest.raises(BroadcastError) as refused:
            await realtime.post(broadcast_body(ORG, "hello", target_roles=["a"]))
    assert refused.value.status == 502
    assert refused.value.body.startswith("<html>") and len(refused.value.body) == 200


def test_broadcast_body_leaves_unset_targets_out() -> None:
    assert broadcast_body("o", "e") == {"organizationId": "o", "event": "e", "payload": {}}
    assert broadcast_body("o", "e", {"n": 1}, ["a"], "u") == {
        "organizationId": "o",
        "event": "e",
        "payload": {"n": 1},
        "targetRoles": ["a"],
        "targetUserId": "u",
    }
