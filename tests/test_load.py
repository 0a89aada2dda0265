"""Load on loopback, with a verifier that checks every frame every socket received.

Shape: sockets spread over organizations, users and roles (owner, recruiter, hiring-manager,
and a `viewer` role that may not see `applications`); one writer commits INSERT/UPDATE/DELETE on
`applications` (masked `ssn` and `email`, `show.or = "owner"` on `createdBy`) and INSERTs on the
per-user `notifications` table at a fixed rate, each statement its own transaction; a second
task sends broadcasts (to everyone, to some roles, or to one user). At the end each organization
gets an `end` broadcast; once every socket has it, everything committed before it has arrived.

The verifier computes, from what was written, exactly which events each socket may see, and
checks: none lost, none duplicated, none out of order (ids strictly increasing), none from
another organization, none for a role or user it is not for, and no masked value raw.

`test_load_ci` is sized for CI (300 sockets, 200 changes/s for 10 s), walcast in-process.
`test_load_large` (marked slow, skipped unless WALCAST_LOAD_LARGE=1) is the big one, with
walcast (`walcast serve`) and the writer (`tests/load_writer.py`) each in their own process,
plus connect/disconnect churn with walcast's RSS (from /proc) checked before and after; its
numbers are in docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import random
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web

from gateway.config import MaskRule, Settings
from gateway.masking import mask_value
from gateway.state import STATE
from gateway.tickets import mint_ticket
from gateway.websocket import LIMITS
from tests.fix_gateway import (
    ACCESS_TOKEN,
    TEST_CONFIG,
    TEST_SCHEMA,
    Gateway,
    Socket,
    clean_env,
    free_port,
    running_gateway,
    walcast_command,
)
from walcast.cli import apply_migrations

pytestmark = pytest.mark.integration

ROOT = str(Path(__file__).resolve().parent.parent)
ROLES = ["owner", "recruiter", "hiring-manager", "viewer"]
APP_ROLES = {"owner", "recruiter", "hiring-manager"}
SSN_RULE = MaskRule(type="ssn")
EMAIL_RULE = MaskRule(type="email")


@dataclass(frozen=True)
class Shape:
    sockets: int
    orgs: int
    users_per_org: int
    changes_per_second: float
    seconds: float
    broadcasts_per_second: float
    churn: int = 0


@dataclass
class Client:
    org: str
    user: str
    roles: frozenset[str]
    sock: Socket


@dataclass
class Written:
    """What was committed, in commit order per stream, for the verifier."""

    changes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (org, change)
    broadcasts: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # app id -> raw values


def _org(index: int) -> str:
    return f"load-org-{index}"


def _user(org: int, index: int) -> str:
    return f"load-u{org}-{index}"


def _roles_of(index: int) -> str:
    return ROLES[index % len(ROLES)]


def _seed_members(gw: Gateway, shape: Shape) -> None:
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        for org in range(shape.orgs):
            conn.execute(
                "INSERT INTO organization (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (_org(org), _org(org)),
            )
            for index in range(shape.users_per_org):
                user = _user(org, index)
                conn.execute(
                    'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                    (user, user, f"{user}@example.com"),
                )
                conn.execute(
                    'INSERT INTO member (id, "organizationId", "userId", role)'
                    " VALUES (%s, %s, %s, %s)",
                    (f"m-{user}", _org(org), user, _roles_of(index)),
                )


async def _connect_all(gw: Gateway, shape: Shape) -> list[Client]:
    clients: list[Client] = []
    per_org = shape.sockets // shape.orgs

    async def one(org: int, slot: int) -> Client:
        index = slot % shape.users_per_org
        role = _roles_of(index)
        user = _user(org, index)
        ticket = mint_ticket(ACCESS_TOKEN, user_id=user, organization_id=_org(org), roles=[role])
        sock = await gw.connect_ticket(ticket, _org(org))
        return Client(_org(org), user, frozenset({role}), sock)

    for org in range(shape.orgs):
        for start in range(0, per_org, 100):
            batch = range(start, min(per_org, start + 100))
            clients += await asyncio.gather(*(one(org, slot) for slot in batch))
    return clients


async def _write(dsn: str, shape: Shape, written: Written, rng: random.Random) -> None:
    live: dict[str, list[str]] = defaultdict(list)
    total = int(shape.changes_per_second * shape.seconds)
    interval = 1.0 / shape.changes_per_second
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for seq in range(total):
            org_index = rng.randrange(shape.orgs)
            org = _org(org_index)
            creator = _user(org_index, rng.randrange(shape.users_per_org))
            roll = rng.random()
            if roll < 0.35 or (roll < 0.75 and not live[org]):
                row_id = f"a{seq}"
                raw = {"ssn": f"{seq:03d}-55-{seq % 10000:04d}", "email": f"p{seq}@corp{seq}.com"}
                written.rows[row_id] = {**raw, "createdBy": creator}
                await conn.execute(
                    'INSERT INTO applications (id, "organizationId", stage, ssn, email,'
                    ' "createdBy") VALUES (%s, %s, %s, %s, %s, %s)',
                    (row_id, org, f"s{seq}", raw["ssn"], raw["email"], creator),
                )
                live[org].append(row_id)
                change = {"table": "applications", "kind": "INSERT", "id": row_id, "tag": f"s{seq}"}
            elif roll < 0.6:
                row_id = rng.choice(live[org])
                await conn.execute(
                    "UPDATE applications SET stage = %s WHERE id = %s", (f"s{seq}", row_id)
                )
                change = {"table": "applications", "kind": "UPDATE", "id": row_id, "tag": f"s{seq}"}
            elif roll < 0.75:
                row_id = live[org].pop(rng.randrange(len(live[org])))
                await conn.execute("DELETE FROM applications WHERE id = %s", (row_id,))
                change = {"table": "applications", "kind": "DELETE", "id": row_id, "tag": row_id}
            else:
                user = _user(org_index, rng.randrange(shape.users_per_org))
                await conn.execute(
                    'INSERT INTO notifications ("organizationId", "userId", message)'
                    " VALUES (%s, %s, %s)",
                    (org, user, f"n{seq}"),
                )
                change = {"table": "notifications", "user": user, "tag": f"n{seq}"}
            written.changes.append((org, change))
            delay = started + (seq + 1) * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, not synchronization


async def _broadcast(
    send: Callable[[dict[str, Any]], Awaitable[int]],
    shape: Shape,
    written: Written,
    rng: random.Random,
) -> None:
    total = int(shape.broadcasts_per_second * shape.seconds)
    if not total:
        return
    interval = 1.0 / shape.broadcasts_per_second
    started = time.monotonic()
    for seq in range(total):
        org_index = rng.randrange(shape.orgs)
        body: dict[str, Any] = {
            "organizationId": _org(org_index),
            "event": "load",
            "payload": {"seq": seq, "org": _org(org_index)},
        }
        kind = rng.random()
        if kind < 0.3:
            body["targetRoles"] = rng.sample(ROLES, 2)
        elif kind < 0.5:
            body["targetUserId"] = _user(org_index, rng.randrange(shape.users_per_org))
        assert await send(body) == 202
        written.broadcasts.append(body)
        delay = started + (seq + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _sender(gw: Gateway) -> Callable[[dict[str, Any]], Awaitable[int]]:
    async def send(body: dict[str, Any]) -> int:
        return (await gw.broadcast(body)).status

    return send


def _expected(client: Client, written: Written) -> tuple[list[str], list[int]]:
    changes = []
    for org, change in written.changes:
        if org != client.org:
            continue
        if change["table"] == "applications":
            if client.roles & APP_ROLES:
                changes.append(change["tag"])
        elif change["user"] == client.user:
            changes.append(change["tag"])
    broadcasts = []
    for body in written.broadcasts:
        if body["organizationId"] != client.org:
            continue
        roles = body.get("targetRoles")
        if roles and not client.roles & set(roles):
            continue
        if body.get("targetUserId") not in (None, client.user):
            continue
        broadcasts.append(body["payload"]["seq"])
    return changes, broadcasts


def _check_masks(client: Client, row: dict[str, Any] | None, written: Written) -> list[str]:
    if row is None:
        return []
    raw = written.rows[row["id"]]
    problems = []
    if row.get("organizationId") != client.org:
        problems.append(f"cross-org row {row['id']}")
    owner = "owner" in client.roles
    ssn = raw["ssn"] if owner else mask_value(SSN_RULE, raw["ssn"])
    email = raw["email"] if owner or raw["createdBy"] == client.user else None
    email = email or mask_value(EMAIL_RULE, raw["email"])
    if row.get("ssn") != ssn:
        problems.append(f"ssn of {row['id']} not as masked for {sorted(client.roles)}")
    if row.get("email") != email:
        problems.append(f"email of {row['id']} not as masked for {client.user}")
    return problems


def verify(clients: list[Client], written: Written) -> dict[str, int]:
    """Check every frame of every socket; returns counts, raises with the first problems."""
    problems: list[str] = []
    frames = 0
    per_org: dict[str, Written] = defaultdict(lambda: Written(rows=written.rows))
    for org, change in written.changes:
        per_org[org].changes.append((org, change))
    for body in written.broadcasts:
        per_org[body["organizationId"]].broadcasts.append(body)
    for client in clients:
        want_changes, want_broadcasts = _expected(client, per_org[client.org])
        got_changes, got_broadcasts, ids = [], [], []
        for message in client.sock.messages:
            kind = message.get("type")
            if kind == "system":
                continue
            frames += 1
            ids.append(message.get("id", ""))
            if kind == "broadcast":
                if message["event"] == "end":
                    continue
                payload = message["payload"]
                if payload["org"] != client.org:
                    problems.append(f"cross-org broadcast to {client.user}")
                got_broadcasts.append(payload["seq"])
            elif message["table"] == "applications":
                for row in (message["new"], message["old"]):
                    problems += _check_masks(client, row, written)
                tag = message["new"]["stage"] if message["new"] else message["old"]["id"]
                got_changes.append(tag)
            else:
                row = message["new"]
                if row["organizationId"] != client.org or row["userId"] != client.user:
                    problems.append(f"notification for another user/org to {client.user}")
                got_changes.append(row["message"])
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            problems.append(f"{client.user}: ids not strictly increasing")
        if got_changes != want_changes:
            lost = len(set(want_changes) - set(got_changes))
            dup = len(got_changes) - len(set(got_changes))
            extra = len(set(got_changes) - set(want_changes))
            problems.append(f"{client.user}: changes lost={lost} dup={dup} extra={extra}")
        if got_broadcasts != want_broadcasts:
            problems.append(
                f"{client.user}: broadcasts {len(got_broadcasts)}/{len(want_broadcasts)}"
            )
    assert not problems, problems[:20]
    return {"frames": frames, "sockets": len(clients)}


def load_gateway(dsn: str, shape: Shape) -> contextlib.AbstractAsyncContextManager[Gateway]:
    return running_gateway(
        dsn,
        handshake_rate=0,  # every socket comes from 127.0.0.1
        max_connections_per_org=shape.sockets,
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _churn_rounds(gw: Gateway, org: str, start: int, stop: int) -> None:
    """Connect, wait for `ready` and close sockets `start`..`stop`, 100 at a time."""

    async def one(index: int) -> None:
        ticket = mint_ticket(
            ACCESS_TOKEN, user_id=f"churn-{index % 500}", organization_id=org, roles=["viewer"]
        )
        params = {"ws_ticket": ticket, "organizationId": org}
        ws = await gw.http.ws_connect(f"{gw.url}/realtime/v1/websocket", params=params)
        message = await ws.receive(timeout=10)
        assert b'"ready"' in message.data.encode()
        await ws.close()

    for base in range(start, stop, 100):
        await asyncio.gather(*(one(index) for index in range(base, min(stop, base + 100))))


async def _churn(gw: Gateway, count: int) -> dict[str, float]:
    """Open and close `count` sockets, 100 at a time; memory and bookkeeping must come back."""
    org = _org(0)

    state = gw.app[STATE]
    limits = gw.app[LIMITS]
    before_sockets = sum(1 for _ in state.registry.connections())
    warm = min(2000, count // 5)
    await _churn_rounds(gw, org, 0, warm)  # warm up allocator and caches before the baseline
    gc.collect()
    baseline = _rss_mb()
    started = time.monotonic()
    await _churn_rounds(gw, org, warm, count)
    elapsed = time.monotonic() - started
    gc.collect()
    after = _rss_mb()
    # A client's close returns when the server's close frame arrives; the server's handler
    # deregisters right after. Poll (bounded) for that bookkeeping to settle.
    deadline = time.monotonic() + 10
    while sum(1 for _ in state.registry.connections()) != before_sockets:
        assert time.monotonic() < deadline, "sockets left registered after churn"
        await asyncio.sleep(0.05)
    assert not any(user.startswith("churn-") for _, user in limits.connections._users)
    hub = state.registry.hubs.get(org)
    assert hub is None or not any(user.startswith("churn-") for user in hub.by_user)
    return {
        "churned": count - warm,
        "churn_seconds": round(elapsed, 1),
        "rss_before_mb": round(baseline, 1),
        "rss_after_mb": round(after, 1),
    }


async def run_load(dsn: str, shape: Shape, seed: int = 8) -> dict[str, Any]:
    rng = random.Random(seed)
    async with load_gateway(dsn, shape) as gw:
        _seed_members(gw, shape)
        clients = await _connect_all(gw, shape)
        connected = _rss_mb()
        written = Written()
        started = time.monotonic()
        await asyncio.gather(
            _write(gw.dsn, shape, written, rng),
            _broadcast(_sender(gw), shape, written, random.Random(seed)),
        )
        wrote = time.monotonic() - started
        for org in range(shape.orgs):
            assert (await gw.broadcast({"organizationId": _org(org), "event": "end"})).status == 202
        await asyncio.gather(
            *(c.sock.wait_for(lambda m: m.get("event") == "end", timeout=120) for c in clients)
        )
        drained = time.monotonic() - started
        counts = verify(clients, written)
        result: dict[str, Any] = {
            **counts,
            "changes": len(written.changes),
            "broadcasts": len(written.broadcasts),
            "write_seconds": round(wrote, 1),
            "all_delivered_seconds": round(drained, 1),
            "rss_connected_mb": round(connected, 1),
            "serializations": gw.metrics.serializations.value,
            "slow_consumers": gw.metrics.slow_consumers._value.get(),
        }
        assert result["slow_consumers"] == 0
        for client in clients:
            await client.sock.close()
        gw.sockets.clear()
        if shape.churn:
            result.update(await _churn(gw, shape.churn))
        return result


async def test_load_ci(database_url: str) -> None:
    shape = Shape(
        sockets=300,
        orgs=3,
        users_per_org=25,
        changes_per_second=200,
        seconds=10,
        broadcasts_per_second=10,
        churn=0,
    )
    result = await run_load(database_url, shape)
    assert result["changes"] == 2000 and result["broadcasts"] == 100
    assert result["frames"] > 50_000
    print("load_ci", orjson.dumps(result).decode())


def _proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def _metric(gw: Gateway, name: str) -> float:
    async with gw.http.get(f"{gw.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def _churn_remote(gw: Gateway, pid: int, count: int, warm: int) -> dict[str, float]:
    """`warm` then `count` connect/ready/close cycles, 100 at a time, against walcast `pid`."""
    org = _org(0)

    async def settled() -> None:
        # A client's close returns when the server's close frame arrives; the server's handler
        # deregisters right after. Poll (bounded) for the gauge to come back to zero.
        deadline = time.monotonic() + 10
        while await _metric(gw, "walcast_connections") != 0:
            assert time.monotonic() < deadline, "sockets left registered after churn"
            await asyncio.sleep(0.05)

    await settled()
    idle = _proc_rss_mb(pid)
    await _churn_rounds(
        gw, org, 0, warm
    )  # warm up walcast's allocator and caches before the baseline
    await settled()
    baseline = _proc_rss_mb(pid)
    started = time.monotonic()
    await _churn_rounds(gw, org, warm, warm + count)
    elapsed = time.monotonic() - started
    await settled()
    after = _proc_rss_mb(pid)
    return {
        "churn_warmup": warm,
        "churned": count,
        "churn_seconds": round(elapsed, 1),
        "walcast_rss_idle_mb": round(idle, 1),
        "walcast_rss_before_churn_mb": round(baseline, 1),
        "walcast_rss_after_churn_mb": round(after, 1),
    }


@contextlib.asynccontextmanager
async def walcast_process(
    dsn: str, shape: Shape, workdir: Path
) -> AsyncIterator[tuple[Gateway, int]]:
    """`walcast serve` as its own process, limits out of the way; yields a client and its pid."""
    apply_migrations(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TEST_SCHEMA.encode())
    config = workdir / "realtime.toml"
    config.write_text(TEST_CONFIG, encoding="utf-8")
    port = free_port()
    env = clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(config),
        WALCAST_PORT=str(port),
        WALCAST_SLOT=f"load_{uuid.uuid4().hex[:12]}",
        WALCAST_PUBLICATION=f"load_{uuid.uuid4().hex[:12]}",
        WALCAST_HANDSHAKE_RATE="0",  # every socket comes from 127.0.0.1
        WALCAST_MAX_CONNECTIONS_PER_ADDRESS="0",  # likewise
        WALCAST_MAX_CONNECTIONS_PER_ORG=str(10 * shape.sockets),
        WALCAST_MAX_CONNECTIONS_PER_USER=str(10 * shape.sockets),
    )
    log = (workdir / "walcast.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *walcast_command(),
        "--log-format",
        "text",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    settings = Settings(database_url=dsn, access_tokens=(ACCESS_TOKEN,), port=port)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    gw = Gateway(f"http://127.0.0.1:{port}", dsn, web.Application(), http, settings)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.returncode is None, (workdir / "walcast.log").read_text()
            assert time.monotonic() < deadline, "walcast not ready"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{gw.url}/readyz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        yield gw, process.pid
    finally:
        for sock in gw.sockets:
            if not sock.ws.closed:
                await sock.ws.close()
        await http.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


async def run_load_processes(
    dsn: str, shape: Shape, workdir: Path, seed: int = 8
) -> dict[str, Any]:
    """Like `run_load`, but walcast and the writer each run in their own process; the sockets
    and the verifier stay here."""
    async with walcast_process(dsn, shape, workdir) as (gw, pid):
        _seed_members(gw, shape)
        clients = await _connect_all(gw, shape)
        connected = _proc_rss_mb(pid)
        out = workdir / "written.json"
        spec = {"dsn": dsn, "url": gw.url, "shape": dataclasses.asdict(shape), "seed": seed}
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.load_writer",
            orjson.dumps(spec).decode(),
            str(out),
            cwd=ROOT,
        )
        budget = shape.seconds * 3 + 60
        assert await asyncio.wait_for(writer.wait(), budget) == 0
        # The writer sent one `end` broadcast per organization after its last commit: once
        # every socket has it, everything committed before it has arrived.
        await asyncio.gather(
            *(c.sock.wait_for(lambda m: m.get("event") == "end", timeout=120) for c in clients)
        )
        delivered = time.monotonic()
        record = orjson.loads(out.read_bytes())
        written = Written(
            changes=[(org, change) for org, change in record["changes"]],
            broadcasts=record["broadcasts"],
            rows=record["rows"],
        )
        wrote = record["finished"] - record["started"]
        counts = verify(clients, written)
        result: dict[str, Any] = {
            **counts,
            "changes": len(written.changes),
            "broadcasts": len(written.broadcasts),
            "write_seconds": round(wrote, 2),
            "changes_per_second": round(len(written.changes) / wrote, 1),
            "broadcasts_per_second": round(len(written.broadcasts) / wrote, 1),
            "end_lag_seconds": round(delivered - record["finished"], 2),
            "walcast_rss_connected_mb": round(connected, 1),
            "test_rss_mb": round(_rss_mb(), 1),
            "serializations": await _metric(gw, "walcast_serializations_total"),
            "slow_consumers": await _metric(gw, "walcast_slow_consumers_total"),
        }
        assert result["slow_consumers"] == 0
        for client in clients:
            await client.sock.close()
        gw.sockets.clear()
        del clients, written, record
        gc.collect()
        if shape.churn:
            result.update(
                await _churn_remote(gw, pid, shape.churn, warm=min(2000, shape.churn // 5))
            )
        return result


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WALCAST_LOAD_LARGE") != "1", reason="WALCAST_LOAD_LARGE=1")
async def test_load_large(database_url: str, tmp_path: Path) -> None:
    shape = Shape(
        sockets=int(os.environ.get("WALCAST_LOAD_SOCKETS", "5000")),
        orgs=int(os.environ.get("WALCAST_LOAD_ORGS", "50")),
        users_per_org=50,
        changes_per_second=float(os.environ.get("WALCAST_LOAD_RATE", "500")),
        seconds=float(os.environ.get("WALCAST_LOAD_SECONDS", "60")),
        broadcasts_per_second=float(os.environ.get("WALCAST_LOAD_BROADCASTS", "50")),
        churn=int(os.environ.get("WALCAST_LOAD_CHURN", "20000")),
    )
    result = await run_load_processes(database_url, shape, tmp_path)
    print("load_large", orjson.dumps(result).decode())
    if shape.churn:
        growth = result["walcast_rss_after_churn_mb"] - result["walcast_rss_before_churn_mb"]
        # flat: no per-connection leak (20,000 x 3 KB would be 60 MB)
        assert growth < 64, result


def test_verifier_catches_loss_duplicates_cross_org_and_raw_values() -> None:
    from types import SimpleNamespace

    written = Written()
    written.rows["a1"] = {"ssn": "123-45-6789", "email": "ann@bee.com", "createdBy": "u-x"}
    written.changes.append(
        ("o1", {"table": "applications", "kind": "INSERT", "id": "a1", "tag": "s1"})
    )
    written.broadcasts.append({"organizationId": "o1", "payload": {"seq": 0, "org": "o1"}})

    def frame(ssn: str, org: str = "o1", cursor: str = "2") -> dict[str, Any]:
        row = {"id": "a1", "organizationId": org, "stage": "s1", "ssn": ssn, "email": "a**@b**.com"}
        return {
            "type": "postgres_changes",
            "table": "applications",
            "new": row,
            "old": None,
            "id": cursor,
        }

    bc = {"type": "broadcast", "event": "load", "payload": {"seq": 0, "org": "o1"}, "id": "1"}

    def client(*messages: dict[str, Any]) -> Client:
        sock: Any = SimpleNamespace(messages=list(messages))
        return Client("o1", "u-r", frozenset({"recruiter"}), sock)

    assert verify([client(bc, frame("*****6789"))], written)["frames"] == 2
    for broken in (
        client(bc),  # lost
        client(bc, frame("*****6789"), frame("*****6789", cursor="3")),  # duplicated
        client(bc, frame("123-45-6789")),  # raw ssn to a recruiter
        client(bc, frame("*****6789", org="o2")),  # another organization's row
        client(bc, frame("*****6789", cursor="0")),  # out of order
    ):
        with pytest.raises(AssertionError):
            verify([broken], written)
