"""The gateway end to end: real PostgreSQL, real replication stream, real sockets on a port."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway, Socket, running_gateway

pytestmark = pytest.mark.integration


def _is_change(table: str, event_type: str, row_id: str) -> Any:
    def match(m: dict[str, Any]) -> bool:
        row = m.get("new") or m.get("old") or {}
        return (
            m["type"] == "postgres_changes"
            and m["table"] == table
            and m["eventType"] == event_type
            and row.get("id") == row_id
        )

    return match


def _is_broadcast(event: str) -> Any:
    return lambda m: m["type"] == "broadcast" and m["event"] == event


async def _sentinel(gw: Gateway, org: str, *socks: Socket) -> None:
    """Commit an event every socket in `socks` may see, and wait for it everywhere."""
    name = f"sentinel-{time.monotonic_ns()}"
    response = await gw.broadcast({"organizationId": org, "event": name, "payload": {}})
    assert response.status == 202
    for sock in socks:
        await sock.wait_for(_is_broadcast(name))


async def test_insert_update_delete_shapes(gw: Gateway) -> None:
    owner = await gw.connect(gw.add_member("u-owner", "org-1", "owner"), "org-1")
    ready = owner.messages[0]
    assert ready["type"] == "system" and ready["event"] == "ready"
    assert ready["payload"]["organizationId"] == "org-1"
    assert ready["payload"]["userId"] == "u-owner"
    assert ready["payload"]["roles"] == ["owner"]

    gw.sql(
        "INSERT INTO applications VALUES ('app_1', 'org-1', 'cnd_1', 'applied', '123-45-6789',"
        " 'paul@example.com', 'u-other', 'n', 'hidden')"
    )
    gw.sql("UPDATE applications SET stage = 'interview' WHERE id = 'app_1'")
    gw.sql("DELETE FROM applications WHERE id = 'app_1'")
    insert = await owner.wait_for(_is_change("applications", "INSERT", "app_1"))
    update = await owner.wait_for(_is_change("applications", "UPDATE", "app_1"))
    delete = await owner.wait_for(_is_change("applications", "DELETE", "app_1"))

    row = {
        "id": "app_1",
        "organizationId": "org-1",
        "candidateId": "cnd_1",
        "stage": "applied",
        "ssn": "123-45-6789",
        "email": "paul@example.com",
        "createdBy": "u-other",
        "notes": "n",
    }
    assert insert["schema"] == "public"
    assert insert["new"] == row and insert["old"] is None
    assert "secret" not in insert["new"]  # not in `fields`
    assert update["new"] == {**row, "stage": "interview"} and update["old"] == row
    assert delete["new"] is None and delete["old"] == {**row, "stage": "interview"}
    ids = [insert["id"], update["id"], delete["id"]]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for event in (insert, update, delete):
        assert event["commitTimestamp"].endswith("Z")
        assert list(event)[:6] == ["type", "table", "schema", "eventType", "new", "old"]


async def test_masking_per_role_in_new_and_old(gw: Gateway) -> None:
    owner = await gw.connect(gw.add_member("m-owner", "org-m", "owner"), "org-m")
    recruiter = await gw.connect(gw.add_member("m-rec", "org-m", "recruiter"), "org-m")
    creator = await gw.connect(gw.add_member("m-creator", "org-m", "hiring-manager"), "org-m")
    gw.sql(
        "INSERT INTO applications VALUES ('app_m', 'org-m', 'c', 'applied', '123-45-6789',"
        " 'paul@example.com', 'm-creator')"
    )
    gw.sql("UPDATE applications SET stage = 'offer' WHERE id = 'app_m'")
    match = _is_change("applications", "UPDATE", "app_m")
    seen_by_owner = await owner.wait_for(match)
    seen_by_recruiter = await recruiter.wait_for(match)
    seen_by_creator = await creator.wait_for(match)
    for version in ("new", "old"):
        assert seen_by_owner[version]["ssn"] == "123-45-6789"
        assert seen_by_owner[version]["email"] == "paul@example.com"
        assert seen_by_recruiter[version]["ssn"] == "*****6789"
        assert seen_by_recruiter[version]["email"] == "p***@e******.com"
        # show.or = "owner": the row's creator sees its email raw, but not its ssn.
        assert seen_by_creator[version]["email"] == "paul@example.com"
        assert seen_by_creator[version]["ssn"] == "*****6789"
    for sock in (recruiter, creator):
        raw_frames = [m for m in sock.messages if "123-45-6789" in str(m)]
        assert raw_frames == []


async def test_organizations_are_isolated(gw: Gateway) -> None:
    a = await gw.connect(gw.add_member("iso-a", "org-a", "owner"), "org-a")
    b = await gw.connect(gw.add_member("iso-b", "org-b", "owner"), "org-b")
    gw.sql("INSERT INTO applications (id, \"organizationId\", stage) VALUES ('in-a', 'org-a', 's')")
    gw.sql("INSERT INTO applications (id, \"organizationId\", stage) VALUES ('in-b', 'org-b', 's')")
    await a.wait_for(_is_change("applications", "INSERT", "in-a"))
    await b.wait_for(_is_change("applications", "INSERT", "in-b"))
    await _sentinel(gw, "org-a", a)
    await _sentinel(gw, "org-b", b)
    assert all((m.get("new") or {}).get("organizationId") != "org-b" for m in a.events())
    assert all((m.get("new") or {}).get("organizationId") != "org-a" for m in b.events())
    # A row moving from org-a to org-b: org-a sees it leave, org-b sees it arrive.
    gw.sql(
        "UPDATE applications SET \"organizationId\" = 'org-b', stage = 'moved' WHERE id = 'in-a'"
    )
    left = await a.wait_for(_is_change("applications", "DELETE", "in-a"))
    arrived = await b.wait_for(_is_change("applications", "INSERT", "in-a"))
    assert left["old"]["organizationId"] == "org-a" and left["new"] is None
    assert arrived["new"]["stage"] == "moved"
    await _sentinel(gw, "org-a", a)
    assert not any("moved" in str(m) for m in a.messages)


async def test_role_outside_required_roles_gets_nothing(gw: Gateway) -> None:
    viewer = await gw.connect(gw.add_member("r-viewer", "org-r", "viewer"), "org-r")
    gw.sql("INSERT INTO applications (id, \"organizationId\") VALUES ('r1', 'org-r')")
    await _sentinel(gw, "org-r", viewer)
    assert viewer.events("postgres_changes") == []


async def test_user_specific_rows_reach_only_that_user(gw: Gateway) -> None:
    alice = await gw.connect(gw.add_member("alice", "org-u", "recruiter"), "org-u")
    bob = await gw.connect(gw.add_member("bob", "org-u", "recruiter"), "org-u")
    gw.sql(
        'INSERT INTO notifications ("organizationId", "userId", message) VALUES'
        " ('org-u', 'alice', 'for alice')"
    )
    note = await alice.wait_for(lambda m: m.get("table") == "notifications")
    assert note["new"]["message"] == "for alice"
    await _sentinel(gw, "org-u", bob)
    assert bob.events("postgres_changes") == []


async def test_broadcast_targets_roles_and_users(gw: Gateway) -> None:
    rec = await gw.connect(gw.add_member("b-rec", "org-bc", "recruiter"), "org-bc")
    owner = await gw.connect(gw.add_member("b-owner", "org-bc", "owner"), "org-bc")
    response = await gw.broadcast(
        {
            "organizationId": "org-bc",
            "event": "for-recruiters",
            "payload": {"x": 1},
            "targetRoles": ["recruiter"],
        }
    )
    assert response.status == 202
    got = await rec.wait_for(_is_broadcast("for-recruiters"))
    assert got["payload"] == {"x": 1} and got["id"]
    response = await gw.broadcast(
        {"organizationId": "org-bc", "event": "for-owner", "payload": [1, 2], "userId": "b-owner"}
    )
    assert response.status == 202
    await owner.wait_for(_is_broadcast("for-owner"))
    await _sentinel(gw, "org-bc", rec, owner)
    assert not any(m.get("event") == "for-recruiters" for m in owner.messages)
    assert not any(m.get("event") == "for-owner" for m in rec.messages)
    # Namespaces: declared events pass (with the namespace's default roles), others are 400.
    response = await gw.broadcast(
        {"organizationId": "org-bc", "event": "screening:progress", "payload": {"percent": 50}}
    )
    assert response.status == 202
    got = await rec.wait_for(_is_broadcast("screening:progress"))
    assert got["payload"] == {"percent": 50}
    details = {}
    for bad in ("screening:unknown", "nope:started", "auth:token-invalidated"):
        async with gw.http.post(
            f"{gw.url}/realtime/v1/broadcast",
            json={"organizationId": "org-bc", "event": bad},
            headers={"Authorization": f"Bearer {ACCESS_TOKEN}"},
        ) as response:
            assert response.status == 400
            answer = await response.json()
        assert answer["error"] == "undeclared event"
        details[bad] = answer["detail"]
    assert "reserved for walcast's own events" in details["auth:token-invalidated"]


async def test_broadcast_api_rejects_bad_requests(gw: Gateway) -> None:
    body = {"organizationId": "o", "event": "e"}
    assert (await gw.broadcast(body, Authorization="Bearer wrong")).status == 401
    assert (await gw.broadcast(body, **{"X-Internal-Secret": "wrong"})).status == 401
    assert (await gw.broadcast(body, **{"X-Internal-Secret": ACCESS_TOKEN})).status == 202
    headers = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
    url = f"{gw.url}/realtime/v1/api/broadcast"
    async with gw.http.post(url, data=b"{not json", headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid JSON"
    async with gw.http.post(url, json={"event": 3}, headers=headers) as response:
        assert response.status == 400
        assert "detail" in await response.json()
    big = {"organizationId": "o", "event": "e", "payload": "x" * (300 * 1024)}
    async with gw.http.post(url, json=big, headers=headers) as response:
        assert response.status == 413
    async with gw.http.post(f"{url}?organizationId=o", json={"event": "q"}, headers=headers) as r:
        assert r.status == 202
        assert (await r.json())["lsn"].count("/") == 1


async def test_ws_ticket_errors(gw: Gateway) -> None:
    url = f"{gw.url}/realtime/v1/ws-ticket"
    async with gw.http.post(url) as response:
        assert response.status == 401
    async with gw.http.post(url, headers={"Authorization": "Bearer nope"}) as response:
        assert response.status == 401
    token = gw.add_member("t-user", "org-t", "recruiter")
    headers = {"Authorization": f"Bearer {token}"}
    async with gw.http.post(url, headers=headers, json={"organizationId": "org-x"}) as response:
        assert response.status == 403
    async with gw.http.post(url, headers=headers, data=b"{bad") as response:
        assert response.status == 400
    for blank in (b"\r\n\r\n", b" "):  # a body of whitespace is not "no body"
        async with gw.http.post(url, headers=headers, data=blank) as response:
            assert response.status == 400, blank
            assert (await response.json())["detail"] == "send a JSON body or none"
    gw.sql('UPDATE "session" SET "activeOrganizationId" = NULL WHERE token = %s', (token,))
    async with gw.http.post(url, headers=headers) as response:
        assert response.status == 400
    gw.sql('UPDATE "session" SET "expiresAt" = now() - interval \'1 s\' WHERE token = %s', (token,))
    async with gw.http.post(url, headers=headers, json={"organizationId": "org-t"}) as response:
        assert response.status == 401


async def test_upgrade_rejections(gw: Gateway) -> None:
    token = gw.add_member("w-user", "org-w", "recruiter")
    assert await gw.upgrade_status({"organizationId": "org-w"}) == 401
    assert await gw.upgrade_status({"ws_ticket": "garbage", "organizationId": "org-w"}) == 401
    expired = mint_ticket(
        ACCESS_TOKEN,
        user_id="w-user",
        organization_id="org-w",
        roles=["recruiter"],
        now=time.time() - 120,
    )
    assert await gw.upgrade_status({"ws_ticket": expired, "organizationId": "org-w"}) == 401
    forged = mint_ticket(
        "another-secret-" + "x" * 32, user_id="w-user", organization_id="org-w", roles=[]
    )
    assert await gw.upgrade_status({"ws_ticket": forged, "organizationId": "org-w"}) == 401
    ticket = await gw.ticket(token, "org-w")
    assert await gw.upgrade_status({"ws_ticket": ticket, "organizationId": "org-other"}) == 403
    assert await gw.upgrade_status({"ws_ticket": ticket, "organizationId": "org-w"}) == 101
    assert await gw.upgrade_status({"ws_ticket": ticket, "organizationId": "org-w"}) == 401


async def test_client_frames_ping_and_garbage(gw: Gateway) -> None:
    sock = await gw.connect(gw.add_member("p-user", "org-p", "recruiter"), "org-p")
    await sock.ws.send_str("ping")
    await sock.ws.send_bytes(b"\xff\x00")
    await sock.ws.send_str('{"type":"subscribe"}')
    await sock.wait_for(lambda m: m.get("event") == "error")
    await sock.wait_for(lambda m: m == {"type": "text", "data": "pong"})
    await _sentinel(gw, "org-p", sock)
    assert not sock.ws.closed


async def test_serializations_equal_visibility_classes(gw: Gateway) -> None:
    # Three visibility classes: owners (ssn and email raw), recruiters (both masked), and the
    # row's creator (email raw through show.or = "owner"), 100 sockets each.
    members = [("s-owner", "owner"), ("s-rec", "recruiter"), ("s-creator", "hiring-manager")]
    for user, role in members:
        gw.add_member(user, "org-s", role)
    # Minted here: 300 calls to ws-ticket would meet its rate limit (a burst of 200).
    socks = []
    for index in range(300):
        user, role = members[index % 3]
        ticket = mint_ticket(ACCESS_TOKEN, user_id=user, organization_id="org-s", roles=[role])
        socks.append(await gw.connect_ticket(ticket, "org-s"))
    before = gw.metrics.serializations.value
    gw.sql(
        "INSERT INTO applications VALUES"
        " ('s1', 'org-s', 'c', 'new', '123-45-6789', 'ann@bee.co', 's-creator')"
    )
    events = await asyncio.gather(
        *(s.wait_for(_is_change("applications", "INSERT", "s1")) for s in socks)
    )
    assert gw.metrics.serializations.value - before == 3
    assert {(e["new"]["ssn"], e["new"]["email"]) for e in events} == {
        ("123-45-6789", "ann@bee.co"),
        ("*****6789", "ann@bee.co"),
        ("*****6789", "a**@b**.co"),
    }
    async with gw.http.get(f"{gw.url}/metrics") as response:
        text = await response.text()
    assert "walcast_serializations_total" in text and "walcast_connections 300.0" in text


async def test_metrics_expose_the_spec_names(gw: Gateway) -> None:
    sock = await gw.connect(gw.add_member("mx", "org-mx", "owner"), "org-mx")
    gw.sql("INSERT INTO applications (id, \"organizationId\") VALUES ('mx1', 'org-mx')")
    await sock.wait_for(_is_change("applications", "INSERT", "mx1"))
    await _sentinel(gw, "org-mx", sock)

    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} missing")

    deadline = time.monotonic() + 10
    while True:
        async with gw.http.get(f"{gw.url}/metrics") as response:
            text = await response.text()
        if value(text, "walcast_slot_retained_wal_bytes") > 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert 'walcast_changes_total{kind="INSERT",table="public.applications"}' in text
    assert value(text, "walcast_broadcasts_total") >= 1
    assert value(text, "walcast_events_total") >= 2  # the INSERT and the sentinel broadcast
    assert value(text, "walcast_deliveries_total") >= 2
    assert value(text, "walcast_serializations_total") >= 2
    assert value(text, "walcast_connections") == 1
    assert value(text, "walcast_slow_consumers_total") == 0
    assert value(text, "walcast_write_pass_seconds_count") >= 2  # `ready`, then the events
    assert 0 < value(text, "walcast_write_pass_seconds_sum") < 10
    assert value(text, "walcast_replication_lag_bytes") >= 0
    assert value(text, "walcast_slot_retained_wal_bytes") > 0
    async with gw.http.get(f"{gw.url}/readyz") as response:
        assert response.status == 200
    async with gw.http.get(f"{gw.url}/healthz") as response:
        assert response.status == 200


async def test_heartbeat_drops_a_peer_that_stops_answering(database_url: str) -> None:
    async with running_gateway(database_url, heartbeat_seconds=0.3) as gw:
        ticket = await gw.ticket(gw.add_member("hb", "org-hb", "owner"), "org-hb")
        silent = await gw.http.ws_connect(
            f"{gw.url}/realtime/v1/websocket",
            params={"ws_ticket": ticket, "organizationId": "org-hb"},
            autoping=False,  # never answers the server's pings
        )
        answering = await gw.connect(gw.add_member("hb2", "org-hb", "owner"), "org-hb")
        kinds = []
        async with asyncio.timeout(10):
            async for message in silent:
                kinds.append(message.type)
        assert aiohttp.WSMsgType.PING in kinds  # the server did ping
        assert silent.closed
        await asyncio.sleep(1.0)  # several heartbeat periods: the answering peer stays
        assert not answering.ws.closed
