"""`walcast demo`: the embedded PostgreSQL, the demo writer, and the command end to end as a
subprocess (page at `/`, demo events on a WebSocket with each user's masks, the demo broadcast
endpoint, a quiet terminal unless `--access-log`, SIGINT stops it and deletes its temporary
data), and the live page in a real browser.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

import migrations
from tests.browser.cdp import CHROMIUM, Chromium, Page
from tests.fix_gateway import Socket, free_port
from walcast.demo import DemoWriter, load_demo_config, seed_demo
from walcast.embedded import (
    INSTALL_HINT,
    OWNER_FILE,
    EmbeddedUnavailable,
    find_bin_dir,
    pgserver_bin_dir,
    start_embedded,
    sweep_stale,
)

pytestmark = pytest.mark.integration

needs_binaries = pytest.mark.skipif(
    find_bin_dir() is None, reason="no PostgreSQL server binaries (initdb, pg_ctl)"
)


@pytest.fixture
def tmpdir_for_postgres() -> Iterator[Path]:
    """A TMPDIR the `postgres` user can enter (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="walcast-demo-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the embedded server -------------------------------------------------------------------------


@needs_binaries
def test_embedded_postgres_is_logical_and_leaves_nothing(
    tmpdir_for_postgres: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmpdir_for_postgres))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        with start_embedded() as server:
            assert server.base.parent == tmpdir_for_postgres
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
                conn.execute("SELECT pg_create_logical_replication_slot('t', 'pgoutput')")
            dsn = server.dsn
    finally:
        tempfile.tempdir = None
    assert list(tmpdir_for_postgres.iterdir()) == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)


def _reachable_by_postgres(bin_dir: Path) -> bool:
    """As root the cluster runs as `postgres`, which must be able to reach the binaries."""
    if os.geteuid() != 0:
        return True
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(bin_dir / "initdb")]
    return subprocess.run(probe, check=False, capture_output=True).returncode == 0


def test_embedded_postgres_from_the_pgserver_wheel(
    tmpdir_for_postgres: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for machines without PostgreSQL: the `embedded` extra's relocatable server
    starts a cluster on which logical decoding with pgoutput works."""
    bin_dir = pgserver_bin_dir()
    if bin_dir is None:
        pytest.skip("pgserver is not installed (pip install 'walcast[embedded]')")
    if not _reachable_by_postgres(bin_dir):
        pytest.skip(f"the postgres user cannot reach {bin_dir}")
    monkeypatch.setenv("TMPDIR", str(tmpdir_for_postgres))
    tempfile.tempdir = None
    try:
        with start_embedded(bin_dir) as server:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
                conn.execute("SELECT pg_create_logical_replication_slot('t', 'pgoutput')")
    finally:
        tempfile.tempdir = None
    assert list(tmpdir_for_postgres.iterdir()) == []


@needs_binaries
def test_a_killed_demos_cluster_is_swept(tmpdir_for_postgres: Path) -> None:
    """kill -9 leaves a running cluster behind; the next start stops and deletes it."""
    tempfile.tempdir = str(tmpdir_for_postgres)
    try:
        server = start_embedded()
        gone = subprocess.Popen(["true"])  # a pid that is gone once waited for
        gone.wait()
        (server.base / OWNER_FILE).write_text(f"{gone.pid}\n")
        with start_embedded() as second:  # sweeps the first on its way up
            assert [p.name for p in tmpdir_for_postgres.iterdir()] == [second.base.name]
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(server.dsn, connect_timeout=2)
        server.stop()  # harmless now
    finally:
        tempfile.tempdir = None
    assert list(tmpdir_for_postgres.iterdir()) == []


def test_no_binaries_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALCAST_PG_BIN", str(tmp_path))  # a directory without initdb
    assert find_bin_dir() is None
    with pytest.raises(EmbeddedUnavailable) as caught:
        start_embedded()
    assert str(caught.value) == INSTALL_HINT
    assert "apt-get install postgresql" in INSTALL_HINT and "walcast[embedded]" in INSTALL_HINT


def test_demo_without_postgres_exits_2_with_the_hint(tmp_path: Path) -> None:
    env = _demo_env(tmp_path) | {"WALCAST_PG_BIN": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "walcast", "demo", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "install PostgreSQL" in result.stderr
    assert result.stdout == ""


# -- the writer ----------------------------------------------------------------------------------


async def test_writer_covers_every_kind_of_change(database_url: str) -> None:
    migrations.apply(database_url, demo=True)
    org = seed_demo(database_url)
    assert {user.roles for user in org.users} == {"owner", "recruiter", "hiring-manager"}
    broadcasts: list[dict[str, Any]] = []

    async def broadcast(body: dict[str, Any]) -> None:
        broadcasts.append(body)

    writer = DemoWriter(org, broadcast, rng=random.Random(7))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        actions = [await writer.step(conn) for _ in range(150)]
        applications = await (
            await conn.execute(
                'SELECT id, stage FROM applications WHERE "organizationId" = %s', (org.id,)
            )
        ).fetchall()
        candidates = await (await conn.execute("SELECT count(*) FROM candidates")).fetchone()
        notified = await (
            await conn.execute('SELECT DISTINCT "userId" FROM notifications')
        ).fetchall()

    assert set(actions) == {"insert", "update", "delete", "broadcast"}
    assert {body["event"] for body in broadcasts} == {
        "screening:started",
        "screening:progress",
        "screening:complete",
    }
    config = load_demo_config()
    for body in broadcasts:  # every event the writer sends is declared in the demo config
        namespace, _, name = body["event"].partition(":")
        assert name in (config.namespaces[namespace].events or ())
    # The database holds exactly what the writer believes is open or finished: bounded.
    expected = {app.id: app.stage for app in writer.in_flight + writer.finished}
    assert dict(applications) == expected
    assert candidates == (len(expected),)
    assert len(writer.in_flight) <= writer.max_in_flight
    assert {row[0] for row in notified} <= {user.id for user in org.users}


# -- the command, as a subprocess ----------------------------------------------------------------


def _demo_env(tmpdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WALCAST_")}
    for key in ("DATABASE_URL", "ACCESS_TOKEN", "REDIS_URL"):
        env.pop(key, None)
    env["TMPDIR"] = str(tmpdir)
    return env


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    url: str
    tmpdir: Path
    http: aiohttp.ClientSession
    stderr: list[str] = field(default_factory=list)
    sockets: list[Socket] = field(default_factory=list)

    async def users(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}demo/api/users") as response:
            assert response.status == 200
            answer: dict[str, Any] = await response.json()
            return answer

    async def connect(self, user: dict[str, Any], org: str) -> Socket:
        async with self.http.post(
            f"{self.url}realtime/v1/ws-ticket",
            headers={"Authorization": f"Bearer {user['sessionToken']}"},
        ) as response:
            assert response.status == 200, await response.text()
            ticket = (await response.json())["wsTicket"]
        ws = await self.http.ws_connect(
            f"{self.url}realtime/v1/websocket", params={"ws_ticket": ticket, "organizationId": org}
        )
        sock = Socket(ws)
        sock.start()
        self.sockets.append(sock)
        await sock.wait_for(lambda m: m.get("event") == "ready")
        return sock


@pytest.fixture
async def demo(request: pytest.FixtureRequest, tmpdir_for_postgres: Path) -> AsyncIterator[Demo]:
    """`walcast demo` as a subprocess; extra flags through indirect parametrization."""
    extra: tuple[str, ...] = getattr(request, "param", ())
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "walcast",
        "--log-format",
        "text",
        "demo",
        "--port",
        str(port),
        "--interval",
        "0.1",
        *extra,
        env=_demo_env(tmpdir_for_postgres),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr: list[str] = []

    async def drain(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            stderr.append(line.decode(errors="replace"))

    drainer = asyncio.create_task(drain(process.stderr))
    http = aiohttp.ClientSession()
    try:
        try:
            banner = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        except TimeoutError:
            raise AssertionError("no banner; stderr:\n" + "".join(stderr)) from None
        urls = re.findall(r"https?://\S+", banner)
        assert urls == [f"http://127.0.0.1:{port}/"], banner + "".join(stderr)
        running = Demo(process, urls[0], tmpdir_for_postgres, http, stderr)
        yield running
        for sock in running.sockets:
            await sock.close()
    finally:
        await http.close()
        if process.returncode is None:  # stop it the way a user would, so it cleans up
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        sweep_stale(tmpdir_for_postgres)  # after a kill: its cluster must not outlive the test
        await drainer


@needs_binaries
async def test_demo_serves_the_page_and_masked_events(demo: Demo) -> None:
    async with demo.http.get(demo.url) as response:
        assert response.status == 200
        page = await response.text()
    assert "walcast" in page and "/static/app.js" in page
    async with demo.http.get(f"{demo.url}static/app.js") as response:
        assert response.status == 200

    listing = await demo.users()
    org = listing["organization"]["id"]
    users = {user["roles"][0]: user for user in listing["users"]}
    assert set(users) == {"owner", "recruiter", "hiring-manager"}
    owner = await demo.connect(users["owner"], org)
    manager = await demo.connect(users["hiring-manager"], org)

    # The same candidate INSERT, seen by both: raw for the owner, masked for the hiring manager.
    def candidate(m: dict[str, Any]) -> bool:
        return m.get("table") == "candidates" and m.get("eventType") == "INSERT"

    seen_by_manager = await manager.wait_for(candidate, timeout=20)
    row_id = seen_by_manager["new"]["id"]
    seen_by_owner = await owner.wait_for(
        lambda m: candidate(m) and m["new"]["id"] == row_id, timeout=20
    )
    raw, masked = seen_by_owner["new"], seen_by_manager["new"]
    assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", raw["ssn"])
    assert masked["ssn"] == "*****" + raw["ssn"][-4:]
    assert masked["email"] != raw["email"] and "***" in masked["email"]
    assert masked["name"] == raw["name"]
    await manager.wait_for(
        lambda m: m.get("table") == "applications" and m.get("eventType") == "UPDATE", timeout=20
    )

    # A custom broadcast through the demo endpoint (ACCESS_TOKEN stays server-side).
    body = {"event": "announcement", "payload": {"marker": "m-1"}, "targetRoles": []}
    async with demo.http.post(f"{demo.url}demo/api/broadcast", json=body) as response:
        assert response.status == 202, await response.text()
        assert (await response.json())["accepted"] is True
    for sock in (owner, manager):
        await sock.wait_for(lambda m: m.get("payload") == {"marker": "m-1"})
    async with demo.http.post(
        f"{demo.url}demo/api/broadcast", json={"event": "screening:unknown"}
    ) as response:
        assert response.status == 400  # the real API's answer, relayed
    async with demo.http.post(f"{demo.url}demo/api/broadcast", data=b"{") as response:
        assert response.status == 400

    # Notifications are per user: the hiring manager only ever gets their own.
    for message in manager.events("postgres_changes"):
        if message["table"] == "notifications":
            assert message["new"]["userId"] == users["hiring-manager"]["id"]
    assert not any(m.get("table") == "notifications" for m in owner.events())

    # All those requests, and the terminal shows none of them: no access log by default.
    assert _access_lines(demo) == [], demo.stderr


def _access_lines(demo: Demo) -> list[str]:
    return [line for line in demo.stderr if "walcast.access" in line]


@needs_binaries
@pytest.mark.parametrize("demo", [("--access-log",)], indirect=True)
async def test_sigint_stops_the_demo_and_deletes_its_data(demo: Demo) -> None:
    listing = await demo.users()
    sock = await demo.connect(listing["users"][0], listing["organization"]["id"])
    assert [p.name for p in demo.tmpdir.iterdir()] != []  # the embedded cluster lives here

    demo.process.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(demo.process.wait(), 15)
    assert code == 0, "".join(demo.stderr)
    assert await sock.wait_closed() == 1001
    assert list(demo.tmpdir.iterdir()) == []
    with pytest.raises(aiohttp.ClientConnectionError):
        async with demo.http.get(demo.url):
            pass
    # --access-log brings the request lines back (path only, never the ticket).
    logged = "".join(_access_lines(demo))
    assert "GET /demo/api/users 200" in logged and "GET /realtime/v1/websocket 101" in logged
    assert "ws_ticket" not in logged


# -- the live page, in a real browser ------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    chromium = await Chromium.launch()
    try:
        yield chromium
    finally:
        await chromium.close()


_UNTIL = """new Promise((resolve) => {
    const check = () => { const value = (%s); if (value) { resolve(value); return true; } };
    if (!check()) {
        const observer = new MutationObserver(() => { if (check()) observer.disconnect(); });
        observer.observe(
            document.body, { subtree: true, childList: true, characterData: true, attributes: true }
        );
    }
})"""

#: A JS expression: a candidates INSERT whose ssn cell has the class and matches the pattern.
_SSN_CELL = """[...document.querySelectorAll('.ev-insert')].some((item) =>
    item.querySelector('.title').textContent === 'candidates'
    && [...item.querySelectorAll('dt')].some((dt) => dt.textContent === 'ssn'
        && dt.nextElementSibling.querySelector('.value.%s')
        && %s.test(dt.nextElementSibling.textContent)))"""

_STATUS = "$('status').dataset.state === 'live' && $('status-text').textContent"

#: A JS expression: a masked email is on the page (long enough to wrap in a narrow column).
_MASKED_EMAIL = """[...document.querySelectorAll('dt')].some((dt) => dt.textContent === 'email'
    && dt.nextElementSibling.querySelector('.value.masked'))"""

#: A JS expression: every MASKED/RAW badge sits whole beside its value's first line.
_BADGES_BESIDE = """[...document.querySelectorAll('.value .lock')].every((lock) => {
    const rects = lock.getClientRects();
    const value = lock.parentElement.getBoundingClientRect();
    return rects.length === 1 && rects[0].top - value.top < rects[0].height;
})"""


async def _until(page: Page, condition: str, timeout: float = 20.0) -> Any:
    """Resolve when the JS expression `condition` is truthy, re-checked on every DOM change."""
    try:
        return await page.evaluate(_UNTIL % condition, timeout=timeout)
    except TimeoutError:
        text = await page.evaluate("document.body.innerText")
        raise AssertionError(f"never true: {condition}\npage text:\n{text[:2000]}") from None


@needs_binaries
async def test_live_page_shows_masked_events_and_sends_broadcasts(
    demo: Demo, browser: Chromium
) -> None:
    # 1100 px: four field columns per event, so a masked email fills its column and wraps.
    page = await browser.new_page(width=1100)
    await page.navigate(f"{demo.url}#u_harper")
    assert await _until(page, _STATUS) == "live as Harper Hale (hiring-manager)"
    assert await _until(page, _SSN_CELL % ("masked", r"/^\*{5}\d{4}/"))
    await _until(page, _MASKED_EMAIL)
    assert await page.evaluate(_BADGES_BESIDE), "a MASKED/RAW badge wrapped below its value"

    await page.evaluate(
        """(() => {
        $('b-event').value = 'announcement';
        $('b-event').dispatchEvent(new Event('change'));
        $('b-target').value = 'everyone';
        $('b-payload').value = JSON.stringify({ marker: 'from-the-page' });
        $('broadcast').requestSubmit();
    })()"""
    )
    result = await _until(page, "$('b-result').textContent")
    assert result.startswith("accepted at LSN "), result
    await _until(
        page,
        """[...document.querySelectorAll('.ev-broadcast')].some((item) =>
            item.querySelector('.title').textContent === 'announcement'
            && item.textContent.includes('from-the-page'))""",
    )

    # Switching to the owner reconnects with the owner's session: the same column, raw.
    await page.evaluate("document.querySelector('.user[data-id=\"u_olivia\"]').click()")
    assert await _until(page, _STATUS) == "live as Olivia Owens (owner)"
    assert await _until(page, _SSN_CELL % ("raw", r"/^\d{3}-\d{2}-\d{4}/"))
