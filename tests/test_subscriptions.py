"""Subscriptions end to end (real PostgreSQL, the real gateway): the 400/403 refusals at the
upgrade, a masked column that cannot be probed, filtered resumes, and snapshots under
concurrent writes checked against a `to_jsonb` oracle."""

from __future__ import annotations

import asyncio
import random
import tomllib
from typing import Any

import orjson
import psycopg
import pytest

from gateway.config import parse_realtime_config
from gateway.masking import mask_value
from tests.fix_gateway import Gateway, Socket, running_gateway

ORDERS_CONFIG = """
[tables."public.orders"]
requiredRoles = ["staff", "owner"]
fields = ["id", "organizationId", "amount", "status", "placedAt", "ssn"]
[tables."public.orders".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
"""

ORDERS_SCHEMA = """
CREATE TABLE orders (
    id int PRIMARY KEY,
    "organizationId" text NOT NULL,
    amount numeric(10, 2) NOT NULL,
    status text NOT NULL,
    "placedAt" timestamptz NOT NULL DEFAULT now(),
    ssn text,
    secret text DEFAULT 'never sent'
);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""

FILTERS = ["orders:amount=gt.50", "orders:status=in.(open,paid)"]
ORACLE_WHERE = "amount > 50 AND status IN ('open', 'paid')"


async def _connect(gw: Gateway, token: str, org: str, **params: str) -> Socket:
    """A socket with more query parameters; a value's lines repeat its name."""
    extra = [(key, item) for key, value in params.items() for item in value.split("\n")]
    return await gw.connect(token, org, extra=extra)


async def _detail(
    gw: Gateway, token: str, org: str, params: list[tuple[str, str]]
) -> tuple[int, dict[str, Any]]:
    """The refusal as a plain GET with the upgrade headers: status and JSON body."""
    ticket = await gw.ticket(token, org)
    query = [("ws_ticket", ticket), ("organizationId", org), *params]
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with gw.http.get(f"{gw.url}/realtime/v1/websocket", params=query, headers=headers) as r:
        body = await r.read()
        return r.status, orjson.loads(body) if r.status != 101 else {}


REFUSALS = [
    # (roles, params, status, words in the detail)
    ("recruiter", [("tables", "nowhere")], 400, "not configured"),
    ("viewer", [("tables", "applications")], 403, "may not see table"),
    ("viewer", [("filter", "applications:stage=eq.x")], 403, "may not see table"),
    ("recruiter", [("filter", "applications:ssn=eq.123-45-6789")], 403, "masked for your roles"),
    ("recruiter", [("filter", "applications:email=is.null")], 403, "masked"),
    ("recruiter", [("filter", "applications:secret=eq.x")], 400, "not among the table's fields"),
    ("recruiter", [("filter", "applications:stage=like.x")], 400, "unknown operator"),
    ("recruiter", [("filter", "applications")], 400, "expected <table>:<column>"),
    ("recruiter", [("filter", "notifications:nope=eq.1")], 400, "has no column 'nope'"),
    ("recruiter", [("filter", "notifications:id=eq.one")], 400, "not a valid integer"),
    (
        "recruiter",
        [("tables", "notifications"), ("filter", "applications:stage=eq.x")],
        400,
        "not in tables=",
    ),
    ("recruiter", [("snapshot", "maybe")], 400, "snapshot"),
    ("recruiter", [("tables", "a"), ("tables", "b")], 400, "once"),
]


@pytest.mark.parametrize(("roles", "params", "status", "words"), REFUSALS)
async def test_refused_at_the_upgrade(
    gw: Gateway, roles: str, params: list[tuple[str, str]], status: int, words: str
) -> None:
    token = gw.add_member(f"u-{roles}", "org1", roles)
    got, body = await _detail(gw, token, "org1", params)
    assert got == status, body
    assert words in body["detail"]


async def test_a_masked_role_can_neither_see_nor_probe_the_value(gw: Gateway) -> None:
    recruiter = gw.add_member("rec", "org1", "recruiter")
    # The probe: is this applicant's ssn 123-45-6789? Refused, whatever the answer.
    for probe in ("applications:ssn=eq.123-45-6789", "applications:ssn=eq.000-00-0000"):
        status, body = await _detail(gw, recruiter, "org1", [("filter", probe)])
        assert status == 403 and "masked" in body["detail"]
    sock = await _connect(gw, recruiter, "org1", filter="applications:stage=eq.interview")
    gw.sql(
        'INSERT INTO applications (id, "organizationId", stage, ssn, email) VALUES'
        " ('a1', 'org1', 'interview', '123-45-6789', 'paul@example.com'),"
        " ('a2', 'org1', 'screening', '123-45-6789', 'x@example.com')"
    )
    got = await sock.wait_for(lambda m: m.get("type") == "postgres_changes")
    assert got["new"]["id"] == "a1"
    assert got["new"]["ssn"] == "*****6789" and got["new"]["email"] == "p***@e******.com"
    # a2 is outside the filter: a sentinel inside it arrives, a2 never did
    gw.sql(
        'INSERT INTO applications (id, "organizationId", stage)'
        " VALUES ('a3', 'org1', 'interview')"
    )
    await sock.wait_for(lambda m: (m.get("new") or {}).get("id") == "a3")
    assert [m["new"]["id"] for m in sock.events("postgres_changes")] == ["a1", "a3"]
    assert b"123-45-6789" not in orjson.dumps(sock.messages)


async def test_resume_with_since_is_filtered_the_same_way(gw: Gateway) -> None:
    owner = gw.add_member("own", "org1", "owner")
    gw.sql(
        'INSERT INTO applications (id, "organizationId", stage) VALUES'
        " ('in', 'org1', 'interview'), ('out', 'org1', 'screening'), ('x', 'org1', 'screening')"
    )
    first = await _connect(
        gw, owner, "org1", filter="applications:stage=eq.interview", tables="applications"
    )
    cursor = first.messages[0]["payload"]["cursor"]
    await first.close()
    gw.sql("UPDATE applications SET stage = 'screening' WHERE id = 'in'")  # leaves: DELETE
    gw.sql("UPDATE applications SET stage = 'interview' WHERE id = 'out'")  # enters: INSERT
    gw.sql("UPDATE applications SET notes = 'n' WHERE id = 'x'")  # outside, stays out: nothing
    gw.sql("UPDATE applications SET notes = 'n' WHERE id = 'out'")  # inside: UPDATE
    await asyncio.sleep(0.5)  # committed and in the history before the resume
    again = await _connect(
        gw,
        owner,
        "org1",
        filter="applications:stage=eq.interview",
        tables="applications",
        since=cursor,
    )
    seen = [
        (m["eventType"], (m["new"] or m["old"])["id"]) for m in again.events("postgres_changes")
    ]
    assert seen == [("DELETE", "in"), ("INSERT", "out"), ("UPDATE", "out")]
    deleted = again.events("postgres_changes")[0]
    assert deleted["new"] is None and deleted["old"]["stage"] == "interview"


# --- snapshots under concurrent writes ---------------------------------------------------------


def _oracle(dsn: str, org: str, where: str, raw_ssn: bool) -> dict[int, dict[str, Any]]:
    config = parse_realtime_config(tomllib.loads(ORDERS_CONFIG))
    table = config.tables["public.orders"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        texts = conn.execute(
            f'SELECT to_jsonb(t)::text FROM orders t WHERE "organizationId" = %s AND {where}',
            (org,),
        ).fetchall()
    rows = {}
    for (text,) in texts:
        row = orjson.loads(text)
        shaped = {name: row[name] for name in table.fields or ()}
        if not raw_ssn:
            shaped["ssn"] = mask_value(table.masking["ssn"], shaped["ssn"])
        rows[shaped["id"]] = shaped
    return rows


def _replay(sock: Socket) -> dict[int, dict[str, Any]]:
    """Apply the socket's snapshot, then its events, strictly: an INSERT of a row it has, or an
    UPDATE/DELETE of one it lacks, is a double or a gap."""
    state: dict[int, dict[str, Any]] = {}
    complete = False
    for message in sock.messages:
        kind = message.get("type")
        if kind == "snapshot":
            assert not complete
            for row in message["rows"]:
                assert row["id"] not in state, f"row {row['id']} twice in the snapshot"
                state[row["id"]] = row
        elif message.get("event") == "snapshot-complete":
            complete = True
        elif kind == "postgres_changes":
            assert complete, "a live event before snapshot-complete"
            event, new, old = message["eventType"], message["new"], message["old"]
            if event == "INSERT":
                assert new["id"] not in state, f"INSERT of {new['id']}, which it has: doubled"
                state[new["id"]] = new
            elif event == "UPDATE":
                assert new["id"] in state, f"UPDATE of {new['id']}, which it lacks: missing"
                state[new["id"]] = new
            elif event == "DELETE":
                assert old["id"] in state, f"DELETE of {old['id']}, which it lacks: missing"
                del state[old["id"]]
        elif message.get("event") == "error":
            raise AssertionError(message)
    assert complete
    return state


async def _writer(dsn: str, org: str, stop: asyncio.Event, seed: int) -> int:
    rng = random.Random(seed)
    writes = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        next_id = 100_000 * (seed + 1)
        while not stop.is_set():
            action = rng.random()
            async with conn.transaction():
                if action < 0.35:
                    next_id += 1
                    await conn.execute(
                        'INSERT INTO orders (id, "organizationId", amount, status, ssn)'
                        " VALUES (%s, %s, %s, %s, %s)",
                        (
                            next_id,
                            org,
                            rng.randint(0, 100),
                            rng.choice(["open", "paid", "void"]),
                            "123-45-6789",
                        ),
                    )
                elif action < 0.8:  # moves rows in and out of the filters
                    await conn.execute(
                        "UPDATE orders SET amount = %s, status = %s WHERE id IN"
                        ' (SELECT id FROM orders WHERE "organizationId" = %s'
                        " ORDER BY random() LIMIT 2)",
                        (rng.randint(0, 100), rng.choice(["open", "paid", "void"]), org),
                    )
                else:
                    await conn.execute(
                        "DELETE FROM orders WHERE id IN (SELECT id FROM orders WHERE"
                        ' "organizationId" = %s ORDER BY random() LIMIT 1)',
                        (org,),
                    )
            writes += 1
            await asyncio.sleep(rng.random() * 0.004)
    return writes


async def test_snapshot_then_events_reproduce_the_table_under_concurrent_writes(
    database_url: str,
) -> None:
    config = parse_realtime_config(tomllib.loads(ORDERS_CONFIG))
    async with running_gateway(database_url, config=config, schema=ORDERS_SCHEMA) as gw:
        gw.sql(
            'INSERT INTO orders (id, "organizationId", amount, status, ssn)'
            " SELECT i, 'org1', i % 101, (ARRAY['open','paid','void'])[1 + i % 3], '123-45-6789'"
            " FROM generate_series(1, 600) AS i"
        )
        gw.sql(
            'INSERT INTO orders (id, "organizationId", amount, status)'
            " VALUES (99999, 'org2', 99, 'open')"
        )
        staff = gw.add_member("staff", "org1", "staff")
        owner = gw.add_member("boss", "org1", "owner")
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(_writer(database_url, "org1", stop, seed)) for seed in range(3)
        ]
        sockets: list[tuple[Socket, bool, bool]] = []  # (socket, filtered, raw ssn)
        for index in range(16):
            filtered, as_owner = index % 2 == 0, index % 4 < 2
            params = {"snapshot": "true"}
            if filtered:
                params["filter"] = "\n".join(FILTERS)
            sock = await _connect(gw, owner if as_owner else staff, "org1", **params)
            sockets.append((sock, filtered, as_owner))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        writes = sum(await asyncio.gather(*writers))
        assert writes > 100
        # A sentinel inside every filter, committed last: once it arrived, all before it did.
        gw.sql(
            'INSERT INTO orders (id, "organizationId", amount, status)'
            " VALUES (1, 'org1', 77, 'open')"
            " ON CONFLICT (id) DO UPDATE SET amount = 77, status = 'open'"
        )
        gw.sql("UPDATE orders SET ssn = ssn WHERE id = 1")
        for sock, _, _ in sockets:
            await sock.wait_for(
                lambda m: (
                    m.get("type") == "postgres_changes"
                    and (m["new"] or {}).get("id") == 1
                    and m["eventType"] == "UPDATE"
                    and m["new"]["amount"] == 77
                ),
                timeout=30,
            )
        for sock, filtered, as_owner in sockets:
            state = _replay(sock)
            expected = _oracle(database_url, "org1", ORACLE_WHERE if filtered else "true", as_owner)
            assert state == expected
            assert all(row["organizationId"] == "org1" for row in state.values())
            assert "secret" not in orjson.dumps(sock.messages).decode()
        snapshots = sum(
            1 for sock, _, _ in sockets for m in sock.messages if m.get("type") == "snapshot"
        )
        assert snapshots >= len(sockets)


async def test_snapshot_over_the_limit_gets_an_error_frame(database_url: str) -> None:
    config = parse_realtime_config(tomllib.loads(ORDERS_CONFIG))
    async with running_gateway(
        database_url, config=config, schema=ORDERS_SCHEMA, snapshot_max_rows=10
    ) as gw:
        gw.sql(
            'INSERT INTO orders (id, "organizationId", amount, status)'
            " SELECT i, 'org1', i, 'open' FROM generate_series(1, 20) AS i"
        )
        staff = gw.add_member("staff", "org1", "staff")
        big = await _connect(gw, staff, "org1", snapshot="true")
        error = await big.wait_for(lambda m: m.get("event") == "error")
        assert (
            error["payload"]["limit"] == 10
            and "WALCAST_SNAPSHOT_MAX_ROWS" in error["payload"]["message"]
        )
        small = await _connect(gw, staff, "org1", snapshot="true", filter="orders:amount=lte.5")
        await small.wait_for(lambda m: m.get("event") == "snapshot-complete")
        assert [len(m["rows"]) for m in small.messages if m["type"] == "snapshot"] == [5]
        assert not any(m["type"] == "snapshot" for m in big.messages)
        gw.sql("UPDATE orders SET amount = 1 WHERE id = 20")  # live events still follow
        await big.wait_for(lambda m: m.get("type") == "postgres_changes")
        moved = await small.wait_for(lambda m: m.get("type") == "postgres_changes")
        assert moved["eventType"] == "INSERT" and moved["new"]["id"] == 20


async def test_the_python_client_takes_a_filtered_snapshot_then_follows(gw: Gateway) -> None:
    from walcast.client import RealtimeClient

    owner = gw.add_member("own", "org1", "owner")
    gw.sql(
        'INSERT INTO applications (id, "organizationId", stage) VALUES'
        " ('s1', 'org1', 'interview'), ('s2', 'org1', 'screening')"
    )
    rows: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    complete = asyncio.Event()

    async def on_snapshot(message: dict[str, Any]) -> None:
        rows.extend(message["rows"])

    async def on_system(message: dict[str, Any]) -> None:
        if message["event"] == "snapshot-complete":
            complete.set()

    async def on_change(message: dict[str, Any]) -> None:
        changes.append(message)

    async with RealtimeClient(
        gw.url,
        owner,
        "org1",
        tables=["applications"],
        filters=["applications:stage=eq.interview"],
        snapshot=True,
        on_snapshot=on_snapshot,
        on_system=on_system,
        on_change=on_change,
    ) as client:
        await asyncio.wait_for(complete.wait(), 10)
        assert [row["id"] for row in rows] == ["s1"]
        gw.sql("UPDATE applications SET stage = 'interview' WHERE id = 's2'")
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.05)
        assert [(m["eventType"], m["new"]["id"]) for m in changes] == [("INSERT", "s2")]
        assert client.cursor == changes[-1]["id"]
