"""The Redis bus: one reader, several gateway nodes, shared history and single-use tickets.

Everything here runs against the real PostgreSQL and a real Redis, and the multi-node tests run
every walcast as its own `walcast serve` process (`--no-gateway` readers, `--no-cdc` nodes),
configured by the environment, with a Redis key prefix of its own (`WALCAST_REDIS_PREFIX`).
The Redis restart test starts a private `redis-server` (never the machine's shared one).

The processes are tests/fix_serve.py's `Cluster` and `Walcast`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from cdc.cursors import format_cursor
from cdc.identity import Identity
from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent
from tests.fix_gateway import (
    ACCESS_TOKEN,
    TEST_CONFIG,
    TEST_SCHEMA,
    Socket,
    clean_env,
    walcast_command,
)
from tests.fix_redis import PrivateRedis
from tests.fix_serve import Cluster, Walcast, prepare_database, serve_env
from walcast.aio import cancel_and_wait
from walcast.bus import (
    BusKeys,
    HistoryLost,
    RedisSink,
    complete_after,
    decode_events,
    encode_events,
    parse_stream_id,
    prefix_from_env,
    reader_lock_key,
)

pytestmark = pytest.mark.integration

CONFIG = (
    TEST_CONFIG
    + """
[tables.ticks]
"""
)
SCHEMA = (
    TEST_SCHEMA
    + """
CREATE TABLE ticks (id bigserial PRIMARY KEY, "organizationId" text NOT NULL, n bigint NOT NULL,
                    amount numeric, doc jsonb);
ALTER TABLE ticks REPLICA IDENTITY FULL;
"""
)


#: The database the sink tests' histories belong to (none: they store made-up events).
IDENTITY = Identity("7300000000000000001", 1, "test", 16384, "walcast")
WAL_END = 1 << 40


def _config() -> Any:
    import tomllib

    return parse_realtime_config(tomllib.loads(CONFIG))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def schema(database_url: str, tmp_path: Path) -> Path:
    return prepare_database(database_url, tmp_path, schema=SCHEMA, config=CONFIG)


@pytest.fixture
async def cluster(
    database_url: str, schema: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Cluster]:
    env = serve_env(database_url, schema, REDIS_URL=redis_url, WALCAST_REDIS_PREFIX=redis_prefix)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        cluster = Cluster(env, database_url, http)
        try:
            yield cluster
        finally:
            await cluster.close()


def _is_change(table: str, row_id: str, event_type: str = "INSERT") -> Callable[..., bool]:
    def match(m: dict[str, Any]) -> bool:
        row = m.get("new") or m.get("old") or {}
        return (
            m.get("type") == "postgres_changes"
            and m.get("table") == table
            and m.get("eventType") == event_type
            and row.get("id") == row_id
        )

    return match


def _is_broadcast(name: str) -> Callable[..., bool]:
    return lambda m: m.get("type") == "broadcast" and m.get("event") == name


def _insert_app(cluster: Cluster, row_id: str, org: str) -> None:
    cluster.sql(
        "INSERT INTO applications VALUES (%s, %s, 'cnd', 'applied', '123-45-6789',"
        " 'paul@example.com', 'u-nobody', 'n', 'hidden')",
        (row_id, org),
    )


def _ids(sock: Socket) -> list[str]:
    return [m["id"] for m in sock.events()]


# -- several nodes -----------------------------------------------------------------------------


async def test_two_nodes_deliver_everything_and_resume_on_the_other_node(
    cluster: Cluster,
) -> None:
    reader = await cluster.start("reader")
    await reader.wait_ready(cluster.http)
    node_a, node_b = await cluster.start("node"), await cluster.start("node")
    await asyncio.gather(node_a.wait_ready(cluster.http), node_b.wait_ready(cluster.http))

    owner = cluster.add_member("u-owner", "org-1", "owner")
    recruiter = cluster.add_member("u-rec", "org-1", "recruiter")
    outsider = cluster.add_member("u-out", "org-2", "owner")
    on_a = await cluster.connect(node_a, owner, "org-1")
    on_b = await cluster.connect(node_b, recruiter, "org-1")
    other_org = await cluster.connect(node_b, outsider, "org-2")

    _insert_app(cluster, "app-1", "org-1")
    _insert_app(cluster, "app-2", "org-2")
    # The broadcast API works on a gateway-only node: it writes to the WAL, the reader delivers.
    assert await cluster.broadcast(node_b, {"organizationId": "org-1", "event": "hello"}) == 202
    raw = await on_a.wait_for(_is_change("applications", "app-1"))
    masked = await on_b.wait_for(_is_change("applications", "app-1"))
    assert raw["new"]["ssn"] == "123-45-6789"  # owner: raw
    assert masked["new"]["ssn"] == "*****6789"  # recruiter: masked on the node
    assert masked["new"]["email"] == "p***@e******.com"
    assert raw["id"] == masked["id"]
    await on_a.wait_for(_is_broadcast("hello"))
    await on_b.wait_for(_is_broadcast("hello"))
    await other_org.wait_for(_is_change("applications", "app-2"))
    assert await cluster.broadcast(node_a, {"organizationId": "org-2", "event": "sentinel"}) == 202
    await other_org.wait_for(_is_broadcast("sentinel"))
    assert [m["new"]["id"] for m in other_org.events() if m["type"] == "postgres_changes"] == [
        "app-2"
    ]

    # Move the recruiter from node B to node A: what it missed, then ready, no duplicates.
    last_seen = _ids(on_b)[-1]
    await on_b.close()
    for n in range(3, 6):
        _insert_app(cluster, f"app-{n}", "org-1")
    await on_a.wait_for(_is_change("applications", "app-5"))
    moved = await cluster.connect(node_a, recruiter, "org-1", since=last_seen)
    ready_at = [m.get("event") for m in moved.messages].index("ready")
    replayed = moved.messages[:ready_at]
    assert [m["new"]["id"] for m in replayed] == ["app-3", "app-4", "app-5"]
    assert all(m["new"]["ssn"] == "*****6789" for m in replayed)
    # Live after ready, exactly once.
    _insert_app(cluster, "app-6", "org-1")
    await moved.wait_for(_is_change("applications", "app-6"))
    ids = _ids(moved)
    assert len(ids) == len(set(ids)) == 4 and ids == sorted(ids)

    # The ready cursor is a resume point too (on the other node).
    cursor = moved.messages[ready_at]["payload"]["cursor"]
    again = await cluster.connect(node_b, recruiter, "org-1", since=cursor)
    assert [m.get("new", {}).get("id") for m in again.events()] == ["app-6"]

    # Cursors Redis cannot vouch for: resync_required first, never silence.
    for bad in ("nonsense", "FFFFFFFFFFFFFFFF-0001", "0000000000000001-0001"):
        sock = await cluster.connect(node_b, recruiter, "org-1", since=bad)
        assert sock.messages[0]["event"] == "resync_required", (bad, sock.messages)
        assert sock.messages[1]["event"] == "ready"

    # A ticket used on node A is refused on node B (and the other way round).
    ticket = await cluster.ticket(node_a, owner, "org-1")
    url = "/realtime/v1/websocket"
    params = {"ws_ticket": ticket, "organizationId": "org-1"}
    ws = await cluster.http.ws_connect(f"{node_a.url}{url}", params=params)
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await cluster.http.ws_connect(f"{node_b.url}{url}", params=params)
    assert refused.value.status == 401

    # A role change reaches every node through the control stream: the recruiter's sockets on
    # both nodes get auth:token-invalidated and 4403; the owner's stays open.
    cluster.sql("""UPDATE member SET role = 'viewer' WHERE "userId" = 'u-rec' """)
    for sock in (moved, again):
        await sock.wait_for(_is_broadcast("auth:token-invalidated"))
        assert await sock.wait_closed() == 4403
    _insert_app(cluster, "app-7", "org-1")
    await on_a.wait_for(_is_change("applications", "app-7"))
    assert not on_a.ws.closed
    assert reader.process.returncode is None


async def test_gateway_nodes_serve_every_organization_they_are_asked_for(
    cluster: Cluster,
) -> None:
    """A node follows a new organization's stream as soon as its first socket attaches."""
    reader = await cluster.start("reader")
    await reader.wait_ready(cluster.http)
    node = await cluster.start("node")
    await node.wait_ready(cluster.http)
    socks = []
    for i in range(5):
        token = cluster.add_member(f"u-{i}", f"org-{i}", "owner")
        socks.append(await cluster.connect(node, token, f"org-{i}"))
    for i in range(5):
        _insert_app(cluster, f"app-{i}", f"org-{i}")
    for i, sock in enumerate(socks):
        await sock.wait_for(_is_change("applications", f"app-{i}"))
        assert len(sock.events()) == 1
    cluster.sql("TRUNCATE applications")
    for sock in socks:
        await sock.wait_for(lambda m: m.get("eventType") == "TRUNCATE")


async def test_serve_with_redis_runs_a_node_and_a_reader_candidate(cluster: Cluster) -> None:
    """Plain `walcast serve` with REDIS_URL: each process is a node and a reader candidate;
    exactly one of them streams, and both deliver."""
    first, second = await cluster.start("both"), await cluster.start("both")
    await asyncio.gather(first.wait_ready(cluster.http), second.wait_ready(cluster.http))
    owner = cluster.add_member("u-owner", "org-1", "owner")
    socks = [await cluster.connect(node, owner, "org-1") for node in (first, second)]
    _insert_app(cluster, "app-1", "org-1")
    for sock in socks:
        await sock.wait_for(_is_change("applications", "app-1"))

    async def streaming(node: Walcast) -> float:
        async with cluster.http.get(f"{node.url}/metrics") as response:
            text = await response.text()
        line = next(x for x in text.splitlines() if x.startswith("walcast_reader_active "))
        return float(line.split()[1])

    assert sorted([await streaming(first), await streaming(second)]) == [0.0, 1.0]


# -- reader high availability ------------------------------------------------------------------


class Writer:
    """Commits ticks n = 1, 2, ... for one organization until stopped."""

    def __init__(self, dsn: str, org: str) -> None:
        self.dsn = dsn
        self.org = org
        self.n = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                n = self.n + 1
                await conn.execute(
                    'INSERT INTO ticks ("organizationId", n, amount, doc) VALUES (%s, %s, %s, %s)',
                    (self.org, n, f"{n}.50", orjson.dumps({"n": n}).decode()),
                )
                self.n = n
                await asyncio.sleep(0.005)

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.n

    async def wait_for_more(self, count: int) -> None:
        target = self.n + count
        while self.n < target:
            assert self._task is not None and not self._task.done()
            await asyncio.sleep(0.01)


def _ticks(sock: Socket) -> list[int]:
    return [m["new"]["n"] for m in sock.events() if m.get("table") == "ticks"]


def _committed(dsn: str, org: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT n FROM ticks WHERE "organizationId" = %s ORDER BY id', (org,)
        ).fetchall()
    return [row[0] for row in rows]


async def test_kill_the_active_reader_and_the_standby_takes_over(cluster: Cluster) -> None:
    first, second = await cluster.start("reader"), await cluster.start("reader")
    node = await cluster.start("node")

    async def active() -> Walcast:
        deadline = time.monotonic() + 30
        while True:
            for reader in (first, second):
                if reader.process.returncode is None and await reader.readyz(cluster.http) == 200:
                    return reader
            assert time.monotonic() < deadline, first.log() + "\n---\n" + second.log()
            await asyncio.sleep(0.05)

    leader = await active()
    standby = second if leader is first else first
    deadline = time.monotonic() + 30
    while (status := await standby.readyz(cluster.http)) == 0:  # still starting up
        assert time.monotonic() < deadline, standby.log()
        await asyncio.sleep(0.05)
    assert status == 503  # waiting quietly for the lock
    async with cluster.http.get(f"{standby.url}/readyz") as response:
        assert "standby" in (await response.json())["reason"]
    await node.wait_ready(cluster.http)
    token = cluster.add_member("u-1", "org-1", "owner")
    sock = await cluster.connect(node, token, "org-1")

    writer = Writer(cluster.dsn, "org-1")
    writer.start()
    await writer.wait_for_more(20)
    killed_at = time.monotonic()
    await leader.kill()  # kill -9: no goodbye, the lock goes with its connection
    assert await active() is standby
    took_over = time.monotonic() - killed_at
    await writer.wait_for_more(20)
    last = await writer.stop()
    await sock.wait_for(lambda m: m.get("table") == "ticks" and m["new"]["n"] == last, 30)
    committed = _committed(cluster.dsn, "org-1")
    assert committed == list(range(1, last + 1))
    assert _ticks(sock) == committed  # nothing lost, nothing twice, in order
    amounts = {m["new"]["amount"] for m in sock.events() if m.get("table") == "ticks"}
    assert "1.50" not in amounts and 1.5 in amounts  # numeric stays a JSON number
    assert took_over < 15, took_over
    print(f"standby took over in {took_over:.2f} s; {last} ticks, none lost")


# -- Redis restarts ------------------------------------------------------------------------------


async def test_redis_restart_under_load_loses_nothing(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    url = private_redis.url
    reader = await cluster.start("reader", redis_url=url)
    await reader.wait_ready(cluster.http)
    node_a = await cluster.start("node", redis_url=url)
    node_b = await cluster.start("node", redis_url=url)
    await asyncio.gather(node_a.wait_ready(cluster.http), node_b.wait_ready(cluster.http))
    live_token = cluster.add_member("u-live", "org-1", "owner")
    resume_token = cluster.add_member("u-resume", "org-1", "owner")
    live = await cluster.connect(node_a, live_token, "org-1")
    resuming = await cluster.connect(node_b, resume_token, "org-1")

    writer = Writer(cluster.dsn, "org-1")
    writer.start()
    await writer.wait_for_more(20)
    await resuming.wait_for(lambda m: m.get("table") == "ticks")
    await resuming.close()
    last_seen = _ids(resuming)[-1]

    await private_redis.kill()  # and with it every stream, the floor and the position
    for walcast in (reader, node_a, node_b):  # nobody is ready without Redis
        deadline = time.monotonic() + 20
        while await walcast.readyz(cluster.http) != 503:
            assert time.monotonic() < deadline, walcast.role + "\n" + walcast.log()
            await asyncio.sleep(0.05)
    await writer.wait_for_more(30)  # commits go on while Redis is down
    await private_redis.start()
    await cluster.wait_ready(reader, node_a, node_b)
    await writer.wait_for_more(20)
    last = await writer.stop()

    await live.wait_for(lambda m: m.get("table") == "ticks" and m["new"]["n"] == last, 30)
    committed = _committed(cluster.dsn, "org-1")
    assert committed == list(range(1, last + 1))
    assert _ticks(live) == committed  # the socket stayed open and missed nothing
    assert not any(m.get("event") == "resync_required" for m in live.messages)

    # A client that left before the restart resumes on the other node from its cursor: the
    # reader rebuilt the history from the slot's retained WAL.
    back = await cluster.connect(node_a, resume_token, "org-1", since=last_seen)
    assert back.messages[0].get("event") != "resync_required", back.messages[:2]
    await back.wait_for(lambda m: m.get("table") == "ticks" and m["new"]["n"] == last)
    before = [n for n in _ticks(resuming)]
    assert before + _ticks(back) == committed
    for walcast in (reader, node_a, node_b):
        assert walcast.process.returncode is None, walcast.log()


# -- the CLI -------------------------------------------------------------------------------------


async def test_split_roles_need_redis(database_url: str, schema: Path) -> None:
    env = clean_env(
        DATABASE_URL=database_url, ACCESS_TOKEN=ACCESS_TOKEN, WALCAST_CONFIG=str(schema)
    )
    for flag in ("--no-cdc", "--no-gateway"):
        process = await asyncio.create_subprocess_exec(
            *walcast_command(),
            "serve",
            flag,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 2, err
        assert f"{flag} needs the Redis bus" in err.decode()
        assert b"Traceback" not in err


# -- the pieces, in process --------------------------------------------------------------------


def _events() -> list[Any]:
    config = _config()
    table = config.table("public", "ticks")
    assert table is not None
    when = datetime(2026, 11, 28, 11, 46, 37, 123456, tzinfo=UTC)
    change = ChangeEvent(
        organization_id="org-1",
        key=(0x16B3748, 3),
        epoch="",
        commit_time=when,
        table=table,
        event_type="UPDATE",
        new={
            "n": 1,
            "amount": RawJson("1.50"),
            "doc": RawJson('{"a": [1, 2.0]}'),
            "tags": ["x", RawJson("3.0")],
            "text": "plain",
        },
        old={"n": 0, "amount": None},
        unchanged=("blob",),
        target_user="u-1",
        owner_id=None,
    )
    broadcast = BroadcastEvent(
        organization_id="org-1",
        key=(0x16B3748, 4),
        epoch="",
        event="screening:started",
        payload=orjson.Fragment(orjson.dumps({"s": "\u0000not raw", "f": 1.5})),
        target_roles=frozenset({"recruiter"}),
        target_user=None,
    )
    revoked = AccessRevoked("role-changed", "org-1", "u-1", None, 0x16B3748, 1.5)
    return [change, broadcast, revoked]


def test_entries_round_trip_with_raw_json_and_payloads() -> None:
    change, broadcast, revoked = _events()
    decoded = decode_events(encode_events([change, broadcast, revoked]), _config())
    assert decoded[0] == change
    assert type(decoded[0].new["amount"]) is RawJson
    assert type(decoded[0].new["tags"][1]) is RawJson
    assert type(decoded[0].new["text"]) is str
    assert decoded[2] == revoked
    got = decoded[1]
    assert isinstance(got, BroadcastEvent)
    assert orjson.loads(orjson.dumps(got.payload)) == {"s": "\u0000not raw", "f": 1.5}
    assert (got.event, got.target_roles, got.cursor) == (
        broadcast.event,
        broadcast.target_roles,
        broadcast.cursor,
    )


def test_lock_key_is_stable_and_per_slot() -> None:
    assert reader_lock_key("walcast") == reader_lock_key("walcast")
    assert reader_lock_key("walcast") != reader_lock_key("other")
    assert -(2**63) <= reader_lock_key("walcast") < 2**63


async def test_sink_stores_each_event_once_and_notices_a_lost_history(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    keys = BusKeys(redis_prefix)
    change, broadcast, revoked = _events()
    sink = RedisSink(redis, keys, history_seconds=120)
    await sink.start(0x16B3000, IDENTITY, WAL_END)
    assert await redis.get(keys.floor) == b"00000000016B3000-0000"
    async with _running(sink):
        sink.publish([change])
        sink.publish([broadcast])
        sink.publish([revoked])
        sink.publish([revoked])  # a second revocation in the same transaction: its own id
        await sink.flush()
    assert await redis.xlen(keys.org("org-1")) == 2
    assert await redis.xlen(keys.control) == 2
    assert await redis.get(keys.position) == b"00000000016B3748-0004"

    # A reader restarted with Redis intact skips what is there without a round trip; one that
    # re-reads the last transaction anyway gets its events refused as duplicates.
    again = RedisSink(redis, keys, history_seconds=120)
    await again.start(0x16B3000, IDENTITY, WAL_END)
    async with _running(again):
        for event in (change, broadcast, revoked):
            again.publish([event])
        await again.flush()
    assert again.published == 3 and again.duplicates == 3
    assert await redis.xlen(keys.org("org-1")) == 2
    assert await redis.xlen(keys.control) == 2

    # An idle database: the position follows the reader's progress.
    again.mark_position(0x16B4000)
    await again.upkeep()
    assert await redis.get(keys.position) == b"00000000016B4000-0000"

    await redis.delete(keys.floor)  # what a restart without persistence looks like
    with pytest.raises(HistoryLost):
        await again.upkeep()
    again.publish([change])
    with pytest.raises(HistoryLost):
        await asyncio.wait_for(again.run(), 5)


async def test_sink_batches_a_burst_and_counts_a_commit_only_once_stored(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    """500 one-row transactions queued at once reach Redis in a few round trips, in order,
    and each commit reaches the retention window only after its events are stored."""
    keys = BusKeys(redis_prefix)
    change = _events()[0]
    now = [0.0]
    sink = RedisSink(redis, keys, history_seconds=10, clock=lambda: now[0], max_queued=200)
    await sink.start(0x1000, IDENTITY, WAL_END)
    sent: list[int] = []
    send = sink._send

    async def counting_send(entries: list[Any], position: str) -> int:
        sent.append(len(entries))
        return await send(entries, position)

    sink._send = counting_send  # type: ignore[method-assign]
    lsns = [0x2000 + 0x100 * i for i in range(500)]
    async with _running(sink):
        for lsn in lsns:
            sink.publish([change._replace(key=(lsn, 1))])
            sink.mark_position(lsn + 0x10)
            assert sink._handled < lsn  # queued, not stored yet: the commit does not count
            await sink.wait_for_room()  # as the pipeline does between the reader's batches
        await sink.flush()
    assert sum(sent) == 500
    assert len(sent) <= 10, sent  # batches, not one round trip per row
    assert max(sent) <= 200  # the queue bound holds
    stored = await redis.xrange(keys.org("org-1"))
    assert [parse_stream_id(entry_id) for entry_id, _ in stored] == [(lsn, 1) for lsn in lsns]
    assert await redis.get(keys.position) == format_cursor(lsns[-1], 1).encode()
    assert sink._handled == lsns[-1] + 0x10
    now[0] = 100.0
    await sink.upkeep()  # the reader's tick: the window samples the newest position stored
    now[0] = 200.0  # and answers with it once the history window has passed
    assert sink._window is not None and sink._window.retained() == lsns[-1] + 0x10


async def test_sink_sends_one_round_trip_per_batch_and_reloads_a_forgotten_script(
    private_redis: PrivateRedis,
) -> None:
    redis = aioredis.Redis.from_url(private_redis.url)
    keys = BusKeys("walcast-test:")
    change = _events()[0]
    later = change._replace(key=(0x16B4000, 1))
    sink = RedisSink(redis, keys, history_seconds=120)
    try:
        await sink.start(0x16B3000, IDENTITY, WAL_END)
        async with _running(sink):
            sink.publish([change])
            await sink.flush()
            await redis.script_flush()  # what a Redis restart does to loaded scripts
            sink.publish([later])
            await sink.flush()
        stored = await redis.xrange(keys.org("org-1"))
        assert [parse_stream_id(i) for i, _ in stored] == [(0x16B3748, 3), (0x16B4000, 1)]
        assert sink.duplicates == 0
        stats = await redis.info("commandstats")
        assert "cmdstat_script|exists" not in stats  # no extra round trip before a batch
        assert stats["cmdstat_script|load"]["calls"] == 2  # registered, then reloaded once
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def _running(sink: RedisSink) -> AsyncIterator[None]:
    task = asyncio.create_task(sink.run())
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def test_trim_detection_from_stream_metadata(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}s"
    for lsn in (10, 20, 30):
        await redis.xadd(stream, {"e": b"[]"}, id=f"{lsn}-1")
    assert complete_after(await redis.xinfo_stream(stream), (5, 1))  # nothing trimmed yet
    await redis.xtrim(stream, minid="20-0", approximate=False)
    info = await redis.xinfo_stream(stream)
    assert not complete_after(info, (5, 1))  # 10-1 is gone
    # What was trimmed lies somewhere below the first entry left: conservatively, a cursor
    # must reach up to it.
    assert not complete_after(info, (19, 9))
    assert complete_after(info, (20, 0))
    assert complete_after(info, (25, 1))
    await redis.xtrim(stream, minid="40-0", approximate=False)  # emptied: a quiet organization
    info = await redis.xinfo_stream(stream)
    assert not complete_after(info, (20, 1))
    assert complete_after(info, (30, 1))
    assert complete_after(info, (99, 1))


def test_prefix_from_env() -> None:
    assert prefix_from_env({}) == "walcast:"
    assert prefix_from_env({"WALCAST_REDIS_PREFIX": "x:"}) == "x:"
    keys = BusKeys("x:")
    assert (keys.org("o"), keys.shared, keys.control, keys.jti) == (
        "x:org:o",
        "x:all",
        "x:control",
        "x:jti:",
    )
