"""A real browser runs the seed page's client code against walcast (the Quickback page's snippet
works unchanged).

Headless Debian Chromium, driven over the DevTools protocol (tests/browser/cdp.py), loads
tests/browser/seed_client.html from the gateway under test (same origin, as the seed's relative
`fetch("/realtime/v1/ws-ticket")` needs). The page's seed callbacks (`addRecord`,
`refreshApplication`, ...) record what they are called with; the test awaits those records
through a promise the page resolves, never by sleeping.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psycopg
import pytest
from aiohttp import web

from gateway.config import Settings, parse_realtime_config
from gateway.state import STATE
from gateway.tickets import mint_ticket
from tests.browser.cdp import CHROMIUM, Chromium, Page
from tests.fix_gateway import ACCESS_TOKEN, TEST_CONFIG, TEST_SCHEMA, Gateway, free_port
from walcast.app import make_app
from walcast.cli import apply_migrations

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]

PAGES = Path(__file__).parent / "browser"
ORG = "org_browser"


@pytest.fixture
async def page_gw(database_url: str) -> AsyncIterator[Gateway]:
    """The `gw` fixture's walcast, plus the test pages under /static/ (same origin)."""
    apply_migrations(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(TEST_SCHEMA.encode())
    port = free_port()
    settings = Settings(database_url=database_url, access_tokens=(ACCESS_TOKEN,), port=port)
    app = make_app(settings, parse_realtime_config(tomllib.loads(TEST_CONFIG)), static_dir=PAGES)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    http = aiohttp.ClientSession()
    try:
        await asyncio.wait_for(app[STATE].readiness.wait(), 30)
        yield Gateway(f"http://127.0.0.1:{port}", database_url, app, http, settings)
    finally:
        await http.close()
        await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Chromium]:
    chromium = await Chromium.launch()
    try:
        yield chromium
    finally:
        await chromium.close()


async def _open(gw: Gateway, browser: Chromium, **query: str) -> Page:
    page = await browser.new_page()
    await page.navigate(f"{gw.url}/static/seed_client.html?{urlencode(query)}")
    return page


async def _wait(page: Page, predicate: str, timeout: float = 15.0) -> dict[str, Any]:
    """The first record matching the JS `predicate` (a function of one record)."""
    try:
        found: dict[str, Any] = await page.evaluate(
            f"window.seed.waitFor({predicate})", timeout=timeout
        )
    except TimeoutError:
        records = await page.evaluate("window.seed.records")
        raise AssertionError(f"no record matched {predicate}; the page saw {records}") from None
    return found


async def test_seed_client_sees_changes_and_broadcasts(page_gw: Gateway, browser: Chromium) -> None:
    gw = page_gw
    token = gw.add_member("u_rec", ORG, "recruiter")
    page = await _open(gw, browser, token=token, org=ORG)
    await _wait(page, "r => r.type === 'system' && r.event === 'ready'")

    gw.sql(
        'INSERT INTO applications (id, "organizationId", "candidateId", stage, ssn, secret)'
        " VALUES ('app_1', %s, 'cnd_1', 'applied', '123-45-6789', 'not for clients')",
        (ORG,),
    )
    inserted = await _wait(page, "r => r.call === 'addRecord'")
    assert inserted["table"] == "applications"
    record = inserted["record"]
    assert record["id"] == "app_1" and record["stage"] == "applied"
    assert record["ssn"] == "*****6789"  # a recruiter sees the masked value
    assert "secret" not in record  # not in the table's `fields`

    gw.sql("UPDATE applications SET stage = 'interview' WHERE id = 'app_1'")
    updated = await _wait(page, "r => r.call === 'updateRecord'")
    assert updated["record"]["stage"] == "interview"

    response = await gw.broadcast(
        {
            "organizationId": ORG,
            "event": "screening-complete",
            "payload": {"applicationId": "app_1"},
        }
    )
    assert response.status == 202
    refreshed = await _wait(page, "r => r.call === 'refreshApplication'")
    assert refreshed["applicationId"] == "app_1"

    response = await gw.broadcast(
        {"organizationId": ORG, "event": "screening:progress", "payload": {"percent": 40}}
    )
    assert response.status == 202
    progress = await _wait(page, "r => r.call === 'updateProgressBar'")
    assert progress["percent"] == 40

    gw.sql("DELETE FROM applications WHERE id = 'app_1'")
    removed = await _wait(page, "r => r.call === 'removeRecord'")
    assert removed == {"call": "removeRecord", "table": "applications", "id": "app_1"}

    calls = [r["call"] for r in await page.evaluate("window.seed.records")]
    assert calls.count("open") == 1 and "close" not in calls and "error" not in calls
    assert "Connected and authenticated!" in page.console


@pytest.mark.parametrize(("age", "opens"), [(0, True), (120, False)], ids=["fresh", "expired"])
async def test_ticket_handshake_in_the_browser(
    page_gw: Gateway, browser: Chromium, age: int, opens: bool
) -> None:
    """A pre-minted ticket, fresh or issued two minutes ago: the expired one's upgrade is
    refused (401), which the browser reports as error + close, with no message delivered."""
    gw = page_gw
    gw.add_member("u_rec", ORG, "recruiter")
    ticket = mint_ticket(
        ACCESS_TOKEN,
        user_id="u_rec",
        organization_id=ORG,
        roles=["recruiter"],
        now=time.time() - age,
    )
    page = await _open(gw, browser, org=ORG, ticket=ticket)
    first = await _wait(page, "r => ['open', 'error', 'close'].includes(r.call)")
    if opens:
        assert first["call"] == "open"
        await _wait(page, "r => r.type === 'system' && r.event === 'ready'")
        return
    assert first["call"] == "error"
    closed = await _wait(page, "r => r.call === 'close'")
    assert closed["code"] == 1006  # the handshake failed: no WebSocket close frame
    assert await page.evaluate("window.seed.messages") == []
    calls = [r["call"] for r in await page.evaluate("window.seed.records")]
    assert "open" not in calls and "addRecord" not in calls
