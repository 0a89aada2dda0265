"""Attacks that go around walcast's API through the database itself, against a real walcast on a
real PostgreSQL:

- a login role with no privilege at all writes broadcast messages into the WAL
  (`pg_logical_emit_message`): reserved `auth:` events, undeclared namespaces, declared events;
- the schema changes under a running walcast: a masked column is renamed, a routing column is
  dropped, so the config's mask or routing no longer applies to anything.

Negative checks never sleep: a sentinel committed after the attack arrives first (commit order
is delivery order), then nothing else may have arrived.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
import pytest

from gateway.config import parse_realtime_config
from tests.fix_gateway import (
    ACCESS_TOKEN,
    Gateway,
    Socket,
    _toml,
    running_gateway,
    signed_broadcast,
)
from walcast.app import PIPELINE

pytestmark = pytest.mark.integration

ORG = "org-forge"
RAW_SSN = "123-45-6789"
MARKER = "forged-payload-marker"
OLD_SECRET = "an-older-access-token-0123456789-abcdef"

#: Like the documented example, without a `fields` allow-list: every column goes out unless
#: masked, which is what makes a renamed masked column dangerous.
MASKED_CONFIG = """
[tables."public.applications"]
requiredRoles = ["recruiter", "owner"]
[tables."public.applications".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }

[tables.notifications]
userColumn = "userId"
"""


def _metric(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def _sentinel(gw: Gateway, *sockets: Socket) -> None:
    """A real broadcast through the API, committed after whatever came before: once every
    socket has it, everything committed earlier has been delivered (or never will be)."""
    event = f"sentinel-{uuid.uuid4().hex[:8]}"
    response = await gw.broadcast({"organizationId": ORG, "event": event})
    assert response.status == 202
    for sock in sockets:
        await sock.wait_for(lambda m: m.get("event") == event)


def _broadcasts(sock: Socket) -> list[str]:
    return [m["event"] for m in sock.events("broadcast")]


@contextmanager
def _login_role(gw: Gateway) -> Iterator[psycopg.Connection[Any]]:
    """A connection as a fresh role with LOGIN and nothing else."""
    role = f"nobody_{uuid.uuid4().hex[:10]}"
    gw.sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(gw.dsn, user=role, autocommit=True) as conn:
            yield conn
    finally:
        gw.sql(f'DROP ROLE "{role}"')


# -- forged broadcasts -------------------------------------------------------------------------


async def test_a_login_role_without_privileges_cannot_forge_broadcasts(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="walcast.routing")
    async with running_gateway(database_url) as gw:
        owner = await gw.connect(gw.add_member("u-owner", ORG, "owner"), ORG)
        recruiter = await gw.connect(gw.add_member("u-recruiter", ORG, "recruiter"), ORG)
        payload = {"reason": "role-changed", "note": MARKER}
        events = ("auth:token-invalidated", "evil:phish", "screening:complete")
        forged = [
            orjson.dumps({"organizationId": ORG, "event": event, "payload": payload}).decode()
            for event in events
        ]
        # And one with a signature made up without the key.
        forged.append("v1." + "A" * 43 + "." + orjson.dumps({"organizationId": ORG}).decode())
        with _login_role(gw) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT 1 FROM applications")  # no table privilege at all
            for content in forged:
                conn.execute("SELECT pg_logical_emit_message(true, 'walcast', %s)", (content,))

        await _sentinel(gw, owner, recruiter)  # a real broadcast, through the API, arrives
        for sock in (owner, recruiter):
            assert [e for e in _broadcasts(sock) if not e.startswith("sentinel-")] == []
            assert not sock.ws.closed
        assert _metric(gw, "walcast_forged_messages_total") == len(forged)
    errors = [r for r in caplog.records if "without a valid signature" in r.getMessage()]
    assert len(errors) == 1  # once per interval, however many were written
    assert MARKER not in caplog.text and "token-invalidated" not in caplog.text


async def test_a_message_signed_with_a_rotated_secret_still_arrives(database_url: str) -> None:
    """`ACCESS_TOKEN=new,old`: the API signs with the new secret; a broadcast the old one
    signed (written before the rotation, still in the WAL) is delivered too."""
    async with running_gateway(database_url, access_tokens=(ACCESS_TOKEN, OLD_SECRET)) as gw:
        sock = await gw.connect(gw.add_member("u-owner", ORG, "owner"), ORG)
        old = signed_broadcast({"organizationId": ORG, "event": "from-old"}, secret=OLD_SECRET)
        unknown = signed_broadcast(
            {"organizationId": ORG, "event": "from-unknown"}, secret="x" * 40
        )
        for content in (old, unknown):
            gw.sql("SELECT pg_logical_emit_message(true, 'walcast', %s)", (content,))
        await _sentinel(gw, sock)
        assert _broadcasts(sock)[:1] == ["from-old"] and "from-unknown" not in _broadcasts(sock)
        assert _metric(gw, "walcast_forged_messages_total") == 1


# -- the schema changes under a running walcast ------------------------------------------------


def _insert(gw: Gateway, id_: str, ssn_column: str = "ssn") -> None:
    gw.sql(
        f'INSERT INTO applications (id, "organizationId", stage, "{ssn_column}")'
        " VALUES (%s, %s, 'new', %s)",
        (id_, ORG, RAW_SSN),
    )


def _withheld(gw: Gateway) -> frozenset[str]:
    return gw.app[PIPELINE].router.withheld


def _received(sock: Socket, id_: str) -> list[dict[str, Any]]:
    return [m for m in sock.events("postgres_changes") if (m.get("new") or {}).get("id") == id_]


async def test_a_renamed_masked_column_is_withheld_never_sent_raw(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_realtime_config(_toml(MASKED_CONFIG))
    async with running_gateway(database_url, config=config) as gw:
        recruiter = await gw.connect(gw.add_member("u-recruiter", ORG, "recruiter"), ORG)
        _insert(gw, "a1")
        before = await recruiter.wait_for(lambda m: (m.get("new") or {}).get("id") == "a1")
        assert before["new"]["ssn"] == "*****6789"

        gw.sql("ALTER TABLE applications RENAME COLUMN ssn TO ssn_number")
        _insert(gw, "a2", "ssn_number")
        await _sentinel(gw, recruiter)
        assert _received(recruiter, "a2") == []  # nothing at all from that table
        assert RAW_SSN.encode() not in orjson.dumps(recruiter.messages)
        assert _metric(gw, "walcast_withheld_events_total", table="public.applications") == 1
        assert _withheld(gw) == {"public.applications"}

        gw.sql("ALTER TABLE applications RENAME COLUMN ssn_number TO ssn")
        _insert(gw, "a3")
        after = await recruiter.wait_for(lambda m: (m.get("new") or {}).get("id") == "a3")
        assert after["new"]["ssn"] == "*****6789"
        assert _withheld(gw) == frozenset()
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert message.startswith('table public.applications: column "ssn" (named by masking.ssn)')
    assert 'rename the column back, or make tables."public.applications".masking.ssn' in message
    assert "ssn_number" in message and RAW_SSN not in caplog.text


async def test_a_dropped_organization_column_withholds_the_table(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_realtime_config(_toml(MASKED_CONFIG))
    async with running_gateway(database_url, config=config) as gw:
        owner = await gw.connect(gw.add_member("u-owner", ORG, "owner"), ORG)
        gw.sql('ALTER TABLE applications DROP COLUMN "organizationId"')
        gw.sql("INSERT INTO applications (id, ssn) VALUES ('d1', %s)", (RAW_SSN,))
        await _sentinel(gw, owner)
        assert _received(owner, "d1") == []
        assert _metric(gw, "walcast_withheld_events_total", table="public.applications") == 1
        assert 'column "organizationId" (named by organizationColumn)' in caplog.text

        gw.sql('ALTER TABLE applications ADD COLUMN "organizationId" text')
        _insert(gw, "d2")
        await owner.wait_for(lambda m: (m.get("new") or {}).get("id") == "d2")


async def test_a_dropped_user_column_does_not_widen_the_audience(database_url: str) -> None:
    """Without its userColumn, a user-targeted row would go to the whole organization."""
    config = parse_realtime_config(_toml(MASKED_CONFIG))
    async with running_gateway(database_url, config=config) as gw:
        alice = await gw.connect(gw.add_member("u-alice", ORG, "recruiter"), ORG)
        bob = await gw.connect(gw.add_member("u-bob", ORG, "recruiter"), ORG)
        gw.sql('ALTER TABLE notifications DROP COLUMN "userId"')
        gw.sql(
            'INSERT INTO notifications ("organizationId", message) VALUES (%s, %s)',
            (ORG, "for alice only"),
        )
        await _sentinel(gw, alice, bob)
        for sock in (alice, bob):
            assert sock.events("postgres_changes") == []
        assert _metric(gw, "walcast_withheld_events_total", table="public.notifications") == 1
