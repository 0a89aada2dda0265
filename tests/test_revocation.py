"""Live access revocation (spec §6): the session store's `member` and `session` tables are read
through the same replication stream, so a change of access is ordered with the data changes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway

pytestmark = pytest.mark.integration

INVALIDATED = "auth:token-invalidated"


def _is_invalidated(m: dict[str, Any]) -> bool:
    return m["type"] == "broadcast" and m["event"] == INVALIDATED


def _params(ticket: str, org: str) -> dict[str, str]:
    return {"ws_ticket": ticket, "organizationId": org}


async def test_role_downgrade_closes_the_socket_before_any_later_event(gw: Gateway) -> None:
    token = gw.add_member("boss", "org-v", "owner")
    stale_ticket = await gw.ticket(token, "org-v")
    sock = await gw.connect(token, "org-v")
    bystander = await gw.connect(gw.add_member("peer", "org-v", "owner"), "org-v")

    # One transaction: the downgrade, then a row the old role would have seen raw.
    with_later_row = (
        "BEGIN;"
        " UPDATE member SET role = 'recruiter' WHERE \"userId\" = 'boss';"
        ' INSERT INTO applications (id, "organizationId", ssn)'
        "   VALUES ('after', 'org-v', '123-45-6789');"
        " COMMIT;"
    )
    gw.sql(with_later_row)
    notice = await sock.wait_for(_is_invalidated)
    assert notice["payload"] == {"reason": "role-changed"}
    assert await sock.wait_closed() == 4403
    assert not any(m.get("table") == "applications" for m in sock.messages)
    assert "123-45-6789" not in str(sock.messages)
    # Others in the organization are untouched and do get the row.
    await bystander.wait_for(lambda m: (m.get("new") or {}).get("id") == "after")
    assert not any(_is_invalidated(m) for m in bystander.messages)

    # A ticket minted before the change no longer opens a socket; a new one carries the new
    # role, and values come masked.
    assert await gw.upgrade_status(_params(stale_ticket, "org-v")) == 401
    again = await gw.connect(token, "org-v")
    assert again.messages[-1]["payload"]["roles"] == ["recruiter"]
    gw.sql(
        'INSERT INTO applications (id, "organizationId", ssn)'
        " VALUES ('later', 'org-v', '123-45-6789')"
    )
    row = await again.wait_for(lambda m: (m.get("new") or {}).get("id") == "later")
    assert row["new"]["ssn"] == "*****6789"


async def test_member_removed_and_session_deleted(gw: Gateway) -> None:
    removed_token = gw.add_member("gone", "org-d", "recruiter")
    removed = await gw.connect(removed_token, "org-d")
    other_org = await gw.connect(gw.add_member("gone", "org-e", "recruiter"), "org-e")
    gw.sql("DELETE FROM member WHERE \"userId\" = 'gone' AND \"organizationId\" = 'org-d'")
    notice = await removed.wait_for(_is_invalidated)
    assert notice["payload"] == {"reason": "member-removed"}
    assert await removed.wait_closed() == 4403
    # Membership of another organization is not affected.
    gw.sql("INSERT INTO applications (id, \"organizationId\") VALUES ('e1', 'org-e')")
    await other_org.wait_for(lambda m: (m.get("new") or {}).get("id") == "e1")

    token = gw.add_member("sess", "org-s2", "recruiter")
    second_token = gw.add_member("sess", "org-s3", "recruiter")
    by_session = await gw.connect(token, "org-s2")
    other_session = await gw.connect(second_token, "org-s3")
    gw.sql('DELETE FROM "session" WHERE token = %s', (token,))
    notice = await by_session.wait_for(_is_invalidated)
    assert notice["payload"] == {"reason": "session-revoked"}
    assert await by_session.wait_closed() == 4403
    gw.sql("INSERT INTO applications (id, \"organizationId\") VALUES ('s3', 'org-s3')")
    await other_session.wait_for(lambda m: (m.get("new") or {}).get("id") == "s3")
    assert not other_session.ws.closed


async def test_tickets_minted_after_a_change_are_accepted(gw: Gateway) -> None:
    gw.add_member("fresh", "org-f", "owner")
    watcher = await gw.connect(gw.add_member("watch", "org-f", "owner"), "org-f")
    gw.sql("UPDATE member SET role = 'recruiter' WHERE \"userId\" = 'fresh'")
    gw.sql("INSERT INTO applications (id, \"organizationId\") VALUES ('mark', 'org-f')")
    await watcher.wait_for(lambda m: (m.get("new") or {}).get("id") == "mark")
    ticket = mint_ticket(
        ACCESS_TOKEN, user_id="fresh", organization_id="org-f", roles=["recruiter"], now=time.time()
    )
    assert await gw.upgrade_status(_params(ticket, "org-f")) == 101
