"""DoS limits (docs/security.md): handshake rate per address, sockets per user and per
organization, body and frame sizes, and slow consumers (closed with 1013, counted, while the
others keep receiving everything).
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import pytest

from gateway.config import Settings
from gateway.limits import ConnectionLimiter, HandshakeRateLimiter
from gateway.protocol import CloseCode
from tests.fix_gateway import Gateway
from tests.fix_gateway import running_gateway as gateway
from tests.fix_rawws import close_codes, read_to_end, stalled_socket

WS = "/realtime/v1/websocket"

# -- pure limiters ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = HandshakeRateLimiter(2.0, 3, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [None, None, None]
    refused = limiter.allow("a")
    assert refused is not None and refused.retry_after == 1
    assert limiter.allow("b") is None  # per address
    clock.now += 0.5  # one token back
    assert limiter.allow("a") is None
    assert limiter.allow("a") is not None
    clock.now += 100  # refills to the burst, no further
    assert [limiter.allow("a") is None for _ in range(4)] == [True, True, True, False]


def test_token_bucket_memory_is_bounded_and_zero_disables() -> None:
    limiter = HandshakeRateLimiter(1.0, 1, max_keys=10, clock=Clock())
    for index in range(1000):
        limiter.allow(f"10.0.{index // 256}.{index % 256}")
    assert len(limiter) == 10
    off = HandshakeRateLimiter(0, 0)
    assert all(off.allow("a") is None for _ in range(10_000)) and len(off) == 0


def test_connection_limiter_counts_per_user_and_per_org() -> None:
    limiter = ConnectionLimiter(per_user=2, per_org=3)
    assert limiter.reserve("o", "u") is None and limiter.reserve("o", "u") is None
    refused = limiter.reserve("o", "u")
    assert refused is not None and "user" in refused.reason
    assert limiter.reserve("o", "v") is None
    refused = limiter.reserve("o", "w")
    assert refused is not None and "organization" in refused.reason
    assert limiter.reserve("p", "u") is None  # other organizations are not affected
    limiter.release("o", "u")
    assert limiter.count("o") == 2 and limiter.count("o", "u") == 1
    assert limiter.reserve("o", "w") is None
    for org, user in [("o", "u"), ("o", "v"), ("o", "w"), ("p", "u")]:
        limiter.release(org, user)
    assert limiter.count("o") == 0 and limiter.count("p") == 0
    assert limiter._users == {} and limiter._orgs == {}  # nothing left behind


def test_settings_read_the_limits_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "WALCAST_MAX_CONNECTIONS_PER_USER": "7",
            "WALCAST_MAX_CONNECTIONS_PER_ORG": "70",
            "WALCAST_HANDSHAKE_RATE": "2.5",
            "WALCAST_HANDSHAKE_BURST": "9",
        }
    )
    assert (settings.max_connections_per_user, settings.max_connections_per_org) == (7, 70)
    assert (settings.handshake_rate, settings.handshake_burst) == (2.5, 9)
    defaults = Settings()
    assert defaults.max_connections_per_user == 100
    assert defaults.max_connections_per_org == 10_000
    assert (defaults.handshake_rate, defaults.handshake_burst) == (50.0, 500)
    assert defaults.max_broadcast_bytes == 256 * 1024


# -- live ------------------------------------------------------------------------------------


async def _refused(gw: Gateway, ticket: str, org: str) -> tuple[int, str | None, Any]:
    async with gw.http.get(
        f"{gw.url}{WS}",
        params={"ws_ticket": ticket, "organizationId": org},
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        },
    ) as response:
        return response.status, response.headers.get("Retry-After"), await response.json()


@pytest.mark.integration
async def test_connections_per_user_and_per_org_get_429_before_the_upgrade(
    database_url: str,
) -> None:
    async with gateway(database_url, max_connections_per_user=2, max_connections_per_org=3) as gw:
        ann = gw.add_member("ann", "org-l", "owner")
        bob = gw.add_member("bob", "org-l", "owner")
        first = [await gw.connect(ann, "org-l"), await gw.connect(ann, "org-l")]
        ticket = await gw.ticket(ann, "org-l")
        status, retry, body = await _refused(gw, ticket, "org-l")
        assert (status, body["error"]) == (429, "too many requests")
        assert "user" in body["detail"] and retry is not None and int(retry) >= 1
        # The refused ticket was not spent: once a socket closes, the same ticket gets in.
        await first[0].close()
        again = await gw.connect_ticket(ticket, "org-l")
        third = await gw.connect(bob, "org-l")
        status, _, body = await _refused(gw, await gw.ticket(bob, "org-l"), "org-l")
        assert status == 429 and "organization" in body["detail"]
        # Other organizations are not affected, and the sockets inside keep working.
        other = await gw.connect(gw.add_member("cy", "org-m", "owner"), "org-m")
        assert (await gw.broadcast({"organizationId": "org-l", "event": "e"})).status == 202
        for sock in (first[1], again, third):
            await sock.wait_for(lambda m: m.get("event") == "e")
        assert gw.metrics.connections._value.get() == 4
        await other.close()


@pytest.mark.integration
async def test_handshake_rate_per_address_gets_429(database_url: str) -> None:
    async with gateway(database_url, handshake_rate=0.5, handshake_burst=3) as gw:
        statuses = []
        for _ in range(5):  # even bad tickets spend a token: the bucket is checked first
            async with gw.http.get(f"{gw.url}{WS}", params={"ws_ticket": "x"}) as response:
                statuses.append((response.status, response.headers.get("Retry-After")))
        assert statuses[:3] == [(401, None)] * 3
        assert [status for status, _ in statuses[3:]] == [429, 429]
        assert all(int(retry) >= 1 for _, retry in statuses[3:] if retry)
        async with gw.http.get(f"{gw.url}/healthz") as response:  # only the upgrade is limited
            assert response.status == 200


@pytest.mark.integration
async def test_body_over_the_limit_gets_413(gw: Gateway) -> None:
    body = {"organizationId": "o", "event": "big", "payload": "x" * (256 * 1024)}
    response = await gw.broadcast(body)
    assert response.status == 413
    async with gw.http.post(
        f"{gw.url}/realtime/v1/ws-ticket",
        data=b"{" + b" " * (300 * 1024) + b"}",
        headers={"Authorization": "Bearer whatever"},
    ) as answer:
        assert answer.status == 413


# -- slow consumers --------------------------------------------------------------------------


async def _close_code(sock: socket.socket) -> int | None:
    """Drain a raw socket to its end; the close code of the server's close frame, if any."""
    codes = close_codes(await read_to_end(sock, 10))
    return codes[-1] if codes else None


@pytest.mark.integration
async def test_slow_consumer_is_closed_with_1013_and_others_get_everything(
    database_url: str,
) -> None:
    async with gateway(database_url, max_send_buffer=256 * 1024) as gw:
        token = gw.add_member("sc-owner", "org-sc", "owner")
        normal = await gw.connect(token, "org-sc")
        port = int(gw.url.rsplit(":", 1)[1])
        stalled = await stalled_socket(port, await gw.ticket(token, "org-sc"), "org-sc")
        slow = gw.metrics.slow_consumers
        assert slow._value.get() == 0
        sent = 0
        # One 100 KB row per transaction, in step with the normal reader: its buffer never
        # holds more than one event, while the stalled socket's only grows.
        while slow._value.get() == 0:
            assert sent < 300, "the stalled socket was never closed"
            gw.sql(
                'INSERT INTO applications (id, "organizationId", notes)'
                " VALUES (%s, 'org-sc', repeat(md5(%s), 3200))",
                (f"sc{sent}", str(sent)),
            )
            name = f"sc{sent}"
            await normal.wait_for(lambda m, name=name: (m.get("new") or {}).get("id") == name)
            sent += 1
        for extra in range(sent, sent + 5):  # the others keep receiving after the close
            gw.sql(
                "INSERT INTO applications (id, \"organizationId\") VALUES (%s, 'org-sc')",
                (f"sc{extra}",),
            )
        last = f"sc{sent + 4}"
        await normal.wait_for(lambda m: (m.get("new") or {}).get("id") == last)
        ids = [e["new"]["id"] for e in normal.events("postgres_changes")]
        assert ids == [f"sc{index}" for index in range(sent + 5)]  # all, once, in order
        assert slow._value.get() == 1
        assert await _close_code(stalled) == CloseCode.TRY_AGAIN_LATER
        stalled.close()
        async with gw.http.get(f"{gw.url}/metrics") as response:
            assert "walcast_slow_consumers_total 1.0" in await response.text()
        assert gw.metrics.connections._value.get() == 1
        assert not normal.ws.closed
