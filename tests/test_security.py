"""Security claims of docs/security.md not proved elsewhere: masks cover TOAST fill-ins and
replayed events, and error bodies never echo a credential.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway

pytestmark = pytest.mark.integration


def _is_row(row_id: str, event_type: str) -> Callable[[dict[str, Any]], bool]:
    def match(message: dict[str, Any]) -> bool:
        row = message.get("new") or message.get("old") or {}
        return message.get("eventType") == event_type and row.get("id") == row_id

    return match


async def test_masks_cover_toast_fill_ins_old_rows_and_replays(gw: Gateway) -> None:
    owner = await gw.connect(gw.add_member("sec-owner", "org-sec", "owner"), "org-sec")
    recruiter_token = gw.add_member("sec-rec", "org-sec", "recruiter")
    recruiter = await gw.connect(recruiter_token, "org-sec")
    # 12,000 random digits: stored out of line (TOAST), so an UPDATE that leaves it alone sends
    # it as "unchanged" and walcast fills it in from the old row.
    digits = "".join(random.choice("0123456789") for _ in range(12_000))
    masked = "*" * (len(digits) - 4) + digits[-4:]
    gw.sql(
        'INSERT INTO applications (id, "organizationId", ssn, email)'
        " VALUES ('t1', 'org-sec', %s, 'toast@example.com')",
        (digits,),
    )
    inserted = await recruiter.wait_for(_is_row("t1", "INSERT"))
    gw.sql("UPDATE applications SET stage = 'moved' WHERE id = 't1'")
    gw.sql("DELETE FROM applications WHERE id = 't1'")
    raw_update = await owner.wait_for(_is_row("t1", "UPDATE"))
    assert raw_update["new"]["ssn"] == digits  # the fill-in happened (raw for the owner)
    update = await recruiter.wait_for(_is_row("t1", "UPDATE"))
    delete = await recruiter.wait_for(_is_row("t1", "DELETE"))
    live = [inserted["new"], update["new"], update["old"], delete["old"]]
    assert [row["ssn"] for row in live] == [masked] * 4
    assert [row["email"] for row in live] == ["t****@e******.com"] * 4
    # Replayed (since=) events are masked for the resuming socket's class, like live ones.
    replayed = await gw.connect(recruiter_token, "org-sec", since=inserted["id"])
    replay_update = await replayed.wait_for(_is_row("t1", "UPDATE"))
    replay_delete = await replayed.wait_for(_is_row("t1", "DELETE"))
    rows = [replay_update["new"], replay_update["old"], replay_delete["old"]]
    assert [row["ssn"] for row in rows] == [masked] * 3
    for sock in (recruiter, replayed):
        for message in sock.messages:
            assert digits not in str(message) and "toast@example.com" not in str(message)


async def test_error_bodies_never_echo_credentials(gw: Gateway) -> None:
    forged = mint_ticket(
        "not-the-secret-0123456789abcdef", user_id="u", organization_id="o", roles=[]
    )
    expired = mint_ticket(ACCESS_TOKEN, user_id="u", organization_id="o", roles=[], now=1_000)
    bodies = []
    for ticket in (forged, expired, forged[:-3], "x" * 5000):
        async with gw.http.get(
            f"{gw.url}/realtime/v1/websocket", params={"ws_ticket": ticket}
        ) as response:
            assert response.status == 401
            bodies.append((ticket, await response.text()))
    wrong = ACCESS_TOKEN[:-1] + "!"
    for headers in ({"Authorization": f"Bearer {wrong}"}, {"X-Internal-Secret": wrong}):
        response = await gw.broadcast({"organizationId": "o", "event": "e"}, **headers)
        assert response.status == 401
    async with gw.http.post(
        f"{gw.url}/realtime/v1/ws-ticket", headers={"Authorization": "Bearer sess-secret-123"}
    ) as response:
        assert response.status == 401
        bodies.append(("sess-secret-123", await response.text()))
    for secret, body in bodies:
        assert secret[:40] not in body and ACCESS_TOKEN not in body
