"""Attacks on live revocation and single-use tickets, against real walcast processes on a real
PostgreSQL (and a real Redis for the bus).

Each test is the attack a client holding an old ticket would try:

* a ticket whose roles were taken away, used while a restarted node is still rebuilding its
  view of revocations, or on a gateway node that started after the change;
* a ticket that already opened a socket, used again after a restart (kill -9 or SIGTERM) or
  after Redis lost its data;
* sockets and tickets that outlive ``TRUNCATE member`` / ``TRUNCATE "session"``;
* sockets and tickets of a session whose ``expiresAt`` moved into the past or whose token
  changed.

Whatever the refusal, no frame carries a value the old access would have shown: every test
commits a row with an SSN that only owners see raw, and checks it reaches no revoked socket.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from gateway.tickets import mint_ticket
from tests.fix_gateway import (
    ACCESS_TOKEN,
    TEST_CONFIG,
    TEST_SCHEMA,
    Gateway,
    Socket,
)
from tests.fix_redis import PrivateRedis
from tests.fix_serve import Cluster, Walcast, prepare_database, serve_env

pytestmark = pytest.mark.integration

INVALIDATED = "auth:token-invalidated"
SSN = "123-45-6789"
WEBSOCKET = "/realtime/v1/websocket"

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def config_file(database_url: str, tmp_path: Path) -> Path:
    return prepare_database(database_url, tmp_path, schema=TEST_SCHEMA, config=TEST_CONFIG)


@pytest.fixture
async def single(database_url: str, config_file: Path) -> AsyncIterator[Cluster]:
    """Plain `walcast serve` processes (the in-process bus), started by the test."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        cluster = Cluster(serve_env(database_url, config_file), database_url, http)
        try:
            yield cluster
        finally:
            await cluster.close()


@pytest.fixture
async def bus(
    database_url: str, config_file: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Cluster]:
    """Processes on the Redis bus, with a key prefix of this test's own (deleted afterwards)."""
    env = serve_env(
        database_url, config_file, REDIS_URL=redis_url, WALCAST_REDIS_PREFIX=redis_prefix
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        cluster = Cluster(env, database_url, http)
        try:
            yield cluster
        finally:
            await cluster.close()


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Refused:
    """The upgrade was answered with an HTTP status instead of 101."""

    status: int
    headers: dict[str, str]
    detail: str


class Opened:
    """A socket the server upgraded, read frame by frame (the handshake is done by hand so
    that a refusal's body can be read: aiohttp's client drops it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def message(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text frame (server frames are unmasked and, from walcast, unfragmented)."""
        while True:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            size = head[1] & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(size)
            opcode = head[0] & 0x0F
            if opcode == 0x8:
                raise AssertionError("closed by the server")
            if opcode == 0x1:
                return dict(orjson.loads(payload))

    async def wait_for(self, predicate: Any) -> dict[str, Any]:
        while not predicate(message := await self.message()):
            pass
        return message

    def close(self) -> None:
        self.writer.close()


async def _try(url: str, ticket: str, org: str) -> Opened | Refused:
    """One upgrade attempt: the opened socket, or the refusal with its body.

    Raises:
        OSError: the port is not open (yet).
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    query = urlencode({"ws_ticket": ticket, "organizationId": org})
    writer.write(
        (
            f"GET {WEBSOCKET}?{query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
    )
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    status = int(status_line.split()[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }
    if status == 101:
        return Opened(reader, writer)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    writer.close()
    return Refused(status, headers, body.decode())


async def _leak(cluster: Cluster, sock: Opened, org: str) -> str:
    """What an opened socket that should have been refused gets: its `ready`, then the row."""
    ready = await sock.wait_for(lambda m: m.get("event") == "ready")
    row_id = f"leak-{uuid.uuid4().hex[:6]}"
    cluster.sql(
        'INSERT INTO applications (id, "organizationId", ssn) VALUES (%s, %s, %s)',
        (row_id, org, SSN),
    )
    row = await sock.wait_for(lambda m: (m.get("new") or {}).get("id") == row_id)
    sock.close()
    return f"socket opened with roles {ready['payload']['roles']}; got ssn {row['new']['ssn']!r}"


async def _refused(cluster: Cluster, url: str, ticket: str, org: str) -> Refused:
    """Attempt the upgrade; fail the test (showing what leaks) if it opens."""
    answer = await _try(url, ticket, org)
    if isinstance(answer, Opened):
        pytest.fail("the stale ticket was accepted: " + await _leak(cluster, answer, org))
    return answer


async def _first_answers(cluster: Cluster, node: Walcast, ticket: str, org: str) -> list[Refused]:
    """Upgrade attempts from the moment the node's port opens until it is ready, and one more
    after: every answer, in order. Fails the test (showing what leaks) if a socket opens."""
    answers: list[Refused] = []
    deadline = time.monotonic() + 30
    ready = False
    while True:
        assert time.monotonic() < deadline, node.log()
        assert node.process.returncode is None, node.log()
        try:
            answer = await _try(node.url, ticket, org)
        except OSError:
            await asyncio.sleep(0.005)  # the port is not open yet
            continue
        if isinstance(answer, Opened):
            before = "after" if ready else "before"
            leak = await _leak(cluster, answer, org)
            pytest.fail(f"upgrade {before} /readyz said 200 was accepted: {leak}")
        answers.append(answer)
        if ready:
            return answers
        ready = await node.readyz(cluster.http) == 200
        await asyncio.sleep(0.02)


def _assert_503_then_401(answers: list[Refused]) -> None:
    """503 with Retry-After while the node is not ready, then 401 telling the client to fetch
    a new ticket: the ticket predates the node's view of revocations."""
    statuses = [answer.status for answer in answers]
    waiting = statuses.count(503)
    assert statuses == [503] * waiting + [401] * (len(statuses) - waiting), answers
    for answer in answers:
        if answer.status == 503:
            assert int(answer.headers["retry-after"]) >= 1
        else:
            assert "fetch a new ticket" in answer.detail


def _sees_invalidation_or(row_id: str) -> Any:
    """A notice, or the row: whichever comes first tells whether the revocation held."""

    def match(m: dict[str, Any]) -> bool:
        return m.get("event") == INVALIDATED or (m.get("new") or {}).get("id") == row_id

    return match


async def _assert_revoked(sock: Socket, reason: str, row_id: str) -> None:
    """`sock` gets the notice with `reason` and a 4403 close, and never the row `row_id`."""
    first = await sock.wait_for(_sees_invalidation_or(row_id))
    assert first.get("event") == INVALIDATED, f"still open, got the row: {first}"
    assert first["payload"] == {"reason": reason}
    assert await sock.wait_closed() == 4403
    assert not any((m.get("new") or {}).get("id") == row_id for m in sock.messages)
    assert SSN not in str(sock.messages)


def _insert_secret(row_id: str, org: str) -> str:
    return (
        f"INSERT INTO applications (id, \"organizationId\", ssn) VALUES ('{row_id}', '{org}',"
        f" '{SSN}');"
    )


# -- 1. stale roles across a restart, and on a node started after the change -------------------


async def _demoted_ticket(cluster: Cluster, node: Walcast) -> tuple[str, str]:
    """An owner's session token, and a ticket minted before the owner is demoted to recruiter;
    `node` has handled the demotion (a socket of the owner's was closed) and refuses it."""
    token = cluster.add_member("boss", "org-a", "owner")
    watched = await cluster.connect(node, token, "org-a")
    stale = await cluster.ticket(node, token, "org-a")
    cluster.sql("UPDATE member SET role = 'recruiter' WHERE \"userId\" = 'boss'")
    await _assert_revoked(watched, "role-changed", "none")
    refused = await _refused(cluster, node.url, stale, "org-a")
    assert refused.status == 401
    return token, stale


async def test_stale_role_ticket_is_refused_while_a_restarted_node_rebuilds(
    single: Cluster,
) -> None:
    """Restart, then use a demoted owner's ticket from the moment the port opens: 503 (with
    Retry-After) until the node has rebuilt its view of revocations, then 401; never 101."""
    node = await single.start("both")
    await node.wait_ready(single.http)
    token, stale = await _demoted_ticket(single, node)
    await node.stop()

    node = await single.start("both")
    answers = await _first_answers(single, node, stale, "org-a")
    _assert_503_then_401(answers)
    assert answers[0].status == 503  # the port opens well before the pipeline has caught up
    # A client that fetches a new ticket gets its current role.
    fresh = await single.connect(node, token, "org-a")
    assert fresh.messages[-1]["payload"]["roles"] == ["recruiter"]


async def test_not_ready_upgrades_get_503_and_keep_the_ticket(gw: Gateway) -> None:
    """In process: while a condition fails, a valid ticket gets 503 + Retry-After and is not
    used up; once ready it opens a socket."""
    from gateway.readiness import Condition
    from gateway.state import STATE

    readiness = gw.app[STATE].readiness
    ticket = await gw.ticket(gw.add_member("early", "org-n", "owner"), "org-n")
    readiness.fail(Condition.REPLICATION, "catching up")
    try:
        answer = await _try(gw.url, ticket, "org-n")
        if isinstance(answer, Opened):
            answer.close()
            pytest.fail("a node that is not ready accepted an upgrade")
        assert answer.status == 503
        assert int(answer.headers["retry-after"]) >= 1
    finally:
        readiness.clear(Condition.REPLICATION)
    sock = await gw.connect_ticket(ticket, "org-n")
    assert sock.messages[-1]["event"] == "ready"


async def test_node_started_after_a_demotion_refuses_the_stale_ticket(bus: Cluster) -> None:
    """Redis bus: a `--no-cdc` node started after the demotion never saw it on the control
    stream; it must still refuse the owner's old ticket (503 while starting, then 401)."""
    _, node_a = await bus.reader_and_node()
    _, stale = await _demoted_ticket(bus, node_a)

    node_b = await bus.start("node")
    _assert_503_then_401(await _first_answers(bus, node_b, stale, "org-a"))


# -- 2. single use across restarts and a loss of Redis data ------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_used_ticket_is_refused_after_a_restart(single: Cluster, how: signal.Signals) -> None:
    node = await single.start("both")
    await node.wait_ready(single.http)
    token = single.add_member("once", "org-u", "owner")
    ticket = await single.ticket(node, token, "org-u")
    first = await single.http.ws_connect(
        f"{node.url}{WEBSOCKET}", params={"ws_ticket": ticket, "organizationId": "org-u"}
    )
    ready = (await first.receive_json(timeout=10))["payload"]
    assert ready["roles"] == ["owner"]
    await first.close()
    node.process.send_signal(how)
    await node.process.wait()

    node = await single.start("both")
    await node.wait_ready(single.http)
    refused = await _refused(single, node.url, ticket, "org-u")
    assert refused.status == 401
    assert "new ticket" in refused.detail
    # Resuming with a fresh ticket and the cursor still works.
    again = await single.connect(node, token, "org-u", since=ready["cursor"])
    assert again.messages[-1]["event"] == "ready"


async def _used_ticket(cluster: Cluster, node: Walcast, token: str) -> str:
    ticket = await cluster.ticket(node, token, "org-u")
    first = await cluster.http.ws_connect(
        f"{node.url}{WEBSOCKET}", params={"ws_ticket": ticket, "organizationId": "org-u"}
    )
    assert (await first.receive_json(timeout=10))["event"] == "ready"
    await first.close()
    return ticket


async def test_used_ticket_is_refused_after_redis_restarts_empty(
    bus: Cluster, private_redis: PrivateRedis
) -> None:
    url = private_redis.url
    reader, node = await bus.reader_and_node(redis_url=url)
    token = bus.add_member("once", "org-u", "owner")
    ticket = await _used_ticket(bus, node, token)

    await private_redis.kill()  # no persistence: every jti key is gone
    await private_redis.start()
    await bus.wait_ready(reader, node)
    refused = await _refused(bus, node.url, ticket, "org-u")
    assert refused.status == 401
    assert "new ticket" in refused.detail
    fresh = await bus.connect(node, token, "org-u")
    assert fresh.messages[-1]["event"] == "ready"


async def test_used_ticket_is_refused_after_redis_is_flushed(
    bus: Cluster, private_redis: PrivateRedis
) -> None:
    """Data lost without a reconnect (FLUSHALL): the claim itself notices, atomically."""
    url = private_redis.url
    reader, node = await bus.reader_and_node(redis_url=url)
    token = bus.add_member("once", "org-u", "owner")
    ticket = await _used_ticket(bus, node, token)

    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    refused = await _refused(bus, node.url, ticket, "org-u")
    assert refused.status == 401
    assert "new ticket" in refused.detail
    await bus.wait_ready(reader, node)
    fresh = await bus.connect(node, token, "org-u")
    assert fresh.messages[-1]["event"] == "ready"


# -- 3. TRUNCATE of the session store's tables --------------------------------------------------


async def test_truncate_member_closes_every_socket_and_refuses_older_tickets(
    gw: Gateway,
) -> None:
    owner = gw.add_member("t-owner", "org-1", "owner")
    recruiter = gw.add_member("t-rec", "org-2", "recruiter")
    socks = [await gw.connect(owner, "org-1"), await gw.connect(recruiter, "org-2")]
    minted = await gw.ticket(owner, "org-1")
    direct = mint_ticket(ACCESS_TOKEN, user_id="t-x", organization_id="org-2", roles=["owner"])

    gw.sql("BEGIN; TRUNCATE member; " + _insert_secret("t1", "org-1") + " COMMIT;")
    for sock in socks:
        await _assert_revoked(sock, "member-removed", "t1")
    for ticket, org in ((minted, "org-1"), (direct, "org-2")):
        assert await gw.upgrade_status({"ws_ticket": ticket, "organizationId": org}) == 401


async def test_truncate_session_closes_every_socket_and_refuses_older_tickets(
    gw: Gateway,
) -> None:
    token = gw.add_member("s-user", "org-1", "owner")
    by_session = await gw.connect(token, "org-1")
    without_session = await gw.connect_ticket(
        mint_ticket(ACCESS_TOKEN, user_id="s-app", organization_id="org-2", roles=["owner"]),
        "org-2",
    )
    minted = await gw.ticket(token, "org-1")

    gw.sql('BEGIN; TRUNCATE "session"; ' + _insert_secret("t2", "org-2") + " COMMIT;")
    for sock in (by_session, without_session):
        await _assert_revoked(sock, "session-revoked", "t2")
    assert await gw.upgrade_status({"ws_ticket": minted, "organizationId": "org-1"}) == 401


async def test_truncate_member_on_the_redis_bus(bus: Cluster) -> None:
    _, node = await bus.reader_and_node()
    socks = [
        await bus.connect(node, bus.add_member("b-owner", "org-1", "owner"), "org-1"),
        await bus.connect(node, bus.add_member("b-rec", "org-2", "recruiter"), "org-2"),
    ]
    stale = await bus.ticket(node, bus.add_member("b-late", "org-1", "owner"), "org-1")
    bus.sql("BEGIN; TRUNCATE member; " + _insert_secret("t3", "org-1") + " COMMIT;")
    for sock in socks:
        await _assert_revoked(sock, "member-removed", "t3")
    assert (await _refused(bus, node.url, stale, "org-1")).status == 401


# -- 12. a session that expires or changes its token by UPDATE ----------------------------------


@pytest.mark.parametrize(
    "change",
    [
        "\"expiresAt\" = now() - interval '1 second'",
        "token = 'rotated-' || md5(random()::text)",
    ],
    ids=["expired", "token-changed"],
)
async def test_session_update_revokes_like_a_delete(gw: Gateway, change: str) -> None:
    token = gw.add_member("u-s", "org-1", "owner")
    other_token = gw.add_member("u-s", "org-2", "owner")  # another session of the same user
    sock = await gw.connect(token, "org-1")
    other = await gw.connect(other_token, "org-2")
    stale = await gw.ticket(token, "org-1")

    gw.sql(
        f"BEGIN; UPDATE \"session\" SET {change} WHERE token = '{token}'; "
        + _insert_secret("u1", "org-1")
        + " COMMIT;"
    )
    await _assert_revoked(sock, "session-revoked", "u1")
    assert await gw.upgrade_status({"ws_ticket": stale, "organizationId": "org-1"}) == 401
    # The user's other session keeps its socket.
    gw.sql(_insert_secret("u2", "org-2"))
    await other.wait_for(lambda m: (m.get("new") or {}).get("id") == "u2")
    assert not any(m.get("event") == INVALIDATED for m in other.messages)


async def test_session_refresh_keeps_its_sockets(gw: Gateway) -> None:
    """Moving `expiresAt` further into the future (a rolling session) revokes nothing."""
    token = gw.add_member("u-r", "org-1", "owner")
    sock = await gw.connect(token, "org-1")
    gw.sql(
        'UPDATE "session" SET "expiresAt" = now() + interval \'7 days\', "updatedAt" = now()'
        " WHERE token = %s",
        (token,),
    )
    gw.sql(_insert_secret("r1", "org-1"))
    row = await sock.wait_for(_sees_invalidation_or("r1"))
    assert row.get("event") != INVALIDATED
    assert row["new"]["ssn"] == SSN  # an owner: raw


# -- the session store's tables carry their old rows --------------------------------------------


async def test_session_store_tables_are_published_with_full_old_rows(gw: Gateway) -> None:
    """Revocation reads the old row of an UPDATE or DELETE: both tables are REPLICA IDENTITY
    FULL after the migration, and in walcast's publication."""
    with psycopg.connect(gw.dsn) as conn:
        identities: dict[str, str] = dict(
            conn.execute(
                "SELECT relname, relreplident FROM pg_class"
                " WHERE oid IN ('public.member'::regclass, 'public.\"session\"'::regclass)"
            ).fetchall()
        )
        published = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
                (gw.settings.publication,),
            )
        }
    assert identities == {"member": "f", "session": "f"}
    assert {"member", "session"} <= published
