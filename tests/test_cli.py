"""The `walcast` command as a user runs it: a subprocess, configured by the environment.

End to end: `migrate`, `check`, `serve` (ticket, socket, a committed INSERT, `walcast broadcast`,
SIGTERM → sockets closed with 1001, exit 0), `ticket`. Then the common mistakes, each of which
must end with exit status 2 and a message that says what to fix, never a traceback; and the help,
which explains itself without pointing at documents the user does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from gateway.tickets import verify_ticket
from tests.fix_gateway import add_member, clean_env, free_port, walcast_command
from tests.fix_serve import run_walcast
from walcast.cli import main

pytestmark = pytest.mark.integration

ACCESS_TOKEN = "cli-test-access-token-0123456789abcdef"
ORG = "org_cli"

CONFIG = """
[tables."public.applications"]
requiredRoles = ["recruiter", "owner"]
[tables."public.applications".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
"""

SCHEMA = """
CREATE TABLE applications (
    id text PRIMARY KEY, "organizationId" text NOT NULL, stage text, ssn text
);
ALTER TABLE applications REPLICA IDENTITY FULL;
CREATE TABLE plain (id int PRIMARY KEY, "organizationId" text);
"""

#: What user-facing text must not lean on: sections of a document users do not have.
UNEXPLAINED = re.compile(r"§|\bspec\b|\bseed\b|SPEC\.md", re.IGNORECASE)

#: The machine's own PostgreSQL (wal_level=replica); used read-only, for the wal_level message.
SYSTEM_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres?connect_timeout=3"


def _fails_cleanly(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert not UNEXPLAINED.search(result.stderr), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def _prepare(dsn: str, tmp_path: Path, config: str = CONFIG) -> Path:
    result = run_walcast("migrate", env=clean_env(DATABASE_URL=dsn))
    assert result.returncode == 0, result.stderr
    assert "001_better_auth.sql" in result.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA.encode())
    path = tmp_path / "realtime.toml"
    path.write_text(config, encoding="utf-8")
    return path


def _add_member(dsn: str, user: str, roles: str) -> str:
    return add_member(dsn, user, ORG, roles)


class Serve:
    """A running `walcast serve` subprocess whose stderr is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.lines: list[str] = []
        self._listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        listening = asyncio.create_task(self._listening.wait())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait({listening, exited}, timeout=timeout, return_when="FIRST_COMPLETED")
        exited.cancel()
        assert self._listening.is_set(), "\n".join(self.lines)
        # The port is open; readiness (the pipeline has caught up) has no event to await
        # from outside the process, so ask /readyz until it says 200.
        while True:
            async with http.get(f"{self.url}/readyz") as response:
                if response.status == 200:
                    return
            assert time.monotonic() < deadline, "not ready in time:\n" + "\n".join(self.lines)
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], port: int) -> AsyncIterator[Serve]:
    process = await asyncio.create_subprocess_exec(
        *walcast_command(),
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    serve = Serve(process, f"http://127.0.0.1:{port}")
    try:
        yield serve
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *walcast_command(),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _messages(ws: aiohttp.ClientWebSocketResponse, into: list[dict[str, Any]]) -> None:
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            into.append(orjson.loads(message.data))


async def _next(
    ws: aiohttp.ClientWebSocketResponse, predicate: Any, timeout: float = 15
) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        while True:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.TEXT, message
            parsed: dict[str, Any] = orjson.loads(message.data)
            if predicate(parsed):
                return parsed

    return await asyncio.wait_for(find(), timeout)


# -- end to end --------------------------------------------------------------------------------


async def test_serve_end_to_end_and_graceful_sigterm(database_url: str, tmp_path: Path) -> None:
    config = _prepare(database_url, tmp_path)
    recruiter = _add_member(database_url, "u_rec", "recruiter")
    port = free_port()
    env = clean_env(
        DATABASE_URL=database_url,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(config),
        WALCAST_PORT=str(port),
    )

    code, out, err = await _run("check", env=env)
    assert code == 0, out + err
    assert out.strip().endswith("ok"), out

    async with aiohttp.ClientSession() as http, serving(env, port) as serve:
        started = time.monotonic()
        await serve.wait_ready(http)
        ready_after = time.monotonic() - started

        # The URL the log announces answers with what is there, instead of a 404.
        async with http.get(f"{serve.url}/") as response:
            assert response.status == 200
            index = await response.json()
        assert index["service"] == "walcast"
        for endpoint in (
            "POST /realtime/v1/ws-ticket",
            "GET /realtime/v1/websocket",
            "POST /realtime/v1/broadcast",
            "GET /readyz",
            "GET /openapi.json",
        ):
            assert endpoint in index["endpoints"]
        assert not any(endpoint.startswith(("HEAD ", "GET / ")) for endpoint in index["endpoints"])

        async with http.post(
            f"{serve.url}/realtime/v1/ws-ticket",
            headers={"Authorization": f"Bearer {recruiter}"},
        ) as response:
            assert response.status == 200
            ticket = (await response.json())["wsTicket"]
        ws = await http.ws_connect(
            f"{serve.url}/realtime/v1/websocket",
            params={"ws_ticket": ticket, "organizationId": ORG},
        )
        await _next(ws, lambda m: m.get("event") == "ready")

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO applications VALUES ('app_1', %s, 'interview', '123-45-6789')",
                (ORG,),
            )
        change = await _next(ws, lambda m: m["type"] == "postgres_changes")
        assert change["eventType"] == "INSERT"
        assert change["new"] == {
            "id": "app_1",
            "organizationId": ORG,
            "stage": "interview",
            "ssn": "*****6789",
        }

        # `walcast broadcast` finds the server through WALCAST_HOST/WALCAST_PORT.
        code, out, err = await _run(
            "broadcast", "--org", ORG, "--event", "hello", "--payload", '{"n": 1}', env=env
        )
        assert code == 0, err
        answer = orjson.loads(out)
        assert answer["accepted"] is True and "/" in answer["lsn"]
        message = await _next(ws, lambda m: m["type"] == "broadcast")
        assert (message["event"], message["payload"]) == ("hello", {"n": 1})
        # A refusal is walcast's own answer, said once, with its status.
        code, out, err = await _run(
            "broadcast", "--org", ORG, "--event", "hello", env=env | {"ACCESS_TOKEN": "w" * 32}
        )
        assert (code, out) == (2, ""), err
        assert "broadcast refused (401)" in err and "Traceback" not in err

        # check against the live setup: slot and publication exist now.
        code, out, err = await _run("check", env=env)
        assert code == 0, out + err
        assert "slot walcast: active=True" in out

        received: list[dict[str, Any]] = []
        reading = asyncio.create_task(_messages(ws, received))
        stopping = time.monotonic()
        assert await serve.stop(signal.SIGTERM) == 0
        stopped_after = time.monotonic() - stopping
        await asyncio.wait_for(reading, 5)
        assert ws.close_code == 1001
        assert stopped_after < 5, stopped_after

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # nothing accepts on the port any more
    log_text = "\n".join(serve.lines)
    assert ticket not in log_text and recruiter not in log_text
    assert "ws_ticket" not in log_text
    assert "slot=walcast" in log_text and "public.applications" in log_text
    assert f":{port}" in log_text
    # serve sets up once before it opens its port, then streams: one set-up to report.
    assert log_text.count("replication set up") == 1, log_text
    endpoints_line = next(line for line in serve.lines if "endpoints:" in line)
    assert "POST /realtime/v1/ws-ticket" in endpoints_line
    assert "GET /realtime/v1/websocket" in endpoints_line
    print(f"serve ready after {ready_after:.2f}s; SIGTERM to exit {stopped_after:.2f}s")


def test_ticket_prints_a_ticket_that_verifies() -> None:
    result = run_walcast(
        "ticket",
        "--user",
        "U",
        "--org",
        "O",
        "--roles",
        "a,b",
        env=clean_env(ACCESS_TOKEN=ACCESS_TOKEN),
    )
    assert result.returncode == 0, result.stderr
    claims = verify_ticket(result.stdout.strip(), [ACCESS_TOKEN], now=time.time())
    assert (claims.user_id, claims.organization_id) == ("U", "O")
    assert claims.roles == frozenset({"a", "b"})


# -- check: problems named, exit 1 -------------------------------------------------------------


def test_check_names_missing_tables_and_replica_identity(database_url: str, tmp_path: Path) -> None:
    config = _prepare(
        database_url,
        tmp_path,
        CONFIG + '[tables."public.plain"]\n[tables."public.nope"]\n',
    )
    result = run_walcast(
        "check", env=clean_env(DATABASE_URL=database_url, WALCAST_CONFIG=str(config))
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "table public.nope does not exist" in result.stdout
    assert 'ALTER TABLE "public"."plain" REPLICA IDENTITY FULL;' in result.stdout
    assert "2 problem(s)" in result.stdout


# -- common mistakes: exit 2, a message that says what to do, no traceback ------------------------


@pytest.fixture
def system_postgres() -> Iterator[str]:
    """The machine's PostgreSQL, read-only (every session forced into read-only transactions)."""
    try:
        with psycopg.connect(SYSTEM_POSTGRES) as conn:
            level = conn.execute("SHOW wal_level").fetchone()
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 to show the wal_level message with")
    if level is None or level[0] == "logical":
        pytest.skip("the PostgreSQL on 5432 already has wal_level=logical")
    yield SYSTEM_POSTGRES


def test_wal_level_not_logical(system_postgres: str) -> None:
    env = clean_env(
        DATABASE_URL=system_postgres,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_PORT=str(free_port()),
        PGOPTIONS="-c default_transaction_read_only=on",
    )
    _fails_cleanly(
        run_walcast("serve", env=env), "wal_level", "ALTER SYSTEM SET wal_level = logical"
    )
    result = run_walcast("check", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "wal_level = replica" in result.stdout


def test_missing_table_and_replica_identity_stop_serve(database_url: str, tmp_path: Path) -> None:
    base = {"DATABASE_URL": database_url, "ACCESS_TOKEN": ACCESS_TOKEN}
    missing = _prepare(database_url, tmp_path, CONFIG + '[tables."public.nope"]\n')
    env = clean_env(**base, WALCAST_CONFIG=str(missing), WALCAST_PORT=str(free_port()))
    _fails_cleanly(run_walcast("serve", env=env), "do not exist", "public.nope")

    identity = tmp_path / "identity.toml"
    identity.write_text(CONFIG + '[tables."public.plain"]\n', encoding="utf-8")
    env = clean_env(**base, WALCAST_CONFIG=str(identity), WALCAST_PORT=str(free_port()))
    _fails_cleanly(
        run_walcast("serve", env=env),
        'ALTER TABLE "public"."plain" REPLICA IDENTITY FULL;',
        "manageReplicaIdentity",
    )


def test_wrong_database_url() -> None:
    refused = f"postgresql://postgres@127.0.0.1:{free_port()}/walcast"
    for args in (["serve"], ["check"], ["migrate"]):
        env = clean_env(
            DATABASE_URL=refused, ACCESS_TOKEN=ACCESS_TOKEN, WALCAST_PORT=str(free_port())
        )
        _fails_cleanly(run_walcast(*args, env=env), "cannot connect to PostgreSQL", "DATABASE_URL")
    garbled = clean_env(DATABASE_URL="postgres:/x:secret-pw@?port=abc", ACCESS_TOKEN=ACCESS_TOKEN)
    result = run_walcast("check", env=garbled)
    _fails_cleanly(result, "DATABASE_URL")
    assert "secret-pw" not in result.stderr
    _fails_cleanly(
        run_walcast("serve", env=clean_env(ACCESS_TOKEN=ACCESS_TOKEN)), "DATABASE_URL is not set"
    )


def test_port_in_use(database_url: str, tmp_path: Path) -> None:
    config = _prepare(database_url, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            DATABASE_URL=database_url,
            ACCESS_TOKEN=ACCESS_TOKEN,
            WALCAST_CONFIG=str(config),
            WALCAST_PORT=str(port),
        )
        _fails_cleanly(run_walcast("serve", env=env), f"port {port}", "in use", "WALCAST_PORT")


def test_missing_access_token(database_url: str) -> None:
    _fails_cleanly(run_walcast("serve", env=clean_env(DATABASE_URL=database_url)), "ACCESS_TOKEN")
    _fails_cleanly(
        run_walcast("ticket", "--user", "u", "--org", "o", env=clean_env()), "ACCESS_TOKEN"
    )
    _fails_cleanly(
        run_walcast("broadcast", "--org", "o", "--event", "e", env=clean_env()), "ACCESS_TOKEN"
    )


SHORT_SECRET_FIX = (
    "Make one with `openssl rand -hex 32` or"
    ' `python -c "import secrets; print(secrets.token_hex(32))"`'
)


def test_short_access_token_is_refused_at_start(database_url: str) -> None:
    """Every configured secret is at least 32 bytes; the message says how to make one."""
    short = "secret"
    result = run_walcast("serve", env=clean_env(DATABASE_URL=database_url, ACCESS_TOKEN=short))
    _fails_cleanly(result)
    assert result.stderr == (
        "walcast: invalid settings: ACCESS_TOKEN is 6 bytes long; each secret must be at least"
        f" 32 bytes. {SHORT_SECRET_FIX}\n"
    )
    rotated = clean_env(DATABASE_URL=database_url, ACCESS_TOKEN=f"{ACCESS_TOKEN},{'x' * 31}")
    result = run_walcast("serve", env=rotated)
    _fails_cleanly(result, "secret 2 of 2 in ACCESS_TOKEN is 31 bytes long")
    assert ACCESS_TOKEN not in result.stderr and "x" * 31 not in result.stderr
    _fails_cleanly(run_walcast("check", env=rotated), "secret 2 of 2 in ACCESS_TOKEN")


def test_bad_config_file(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x", "ACCESS_TOKEN": ACCESS_TOKEN}
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[tables."public.a"]\nrequiredRole = ["x"]\n', encoding="utf-8")
    _fails_cleanly(
        run_walcast("serve", env=clean_env(**env, WALCAST_CONFIG=str(unknown))),
        str(unknown),
        "requiredRole",
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("[tables\n", encoding="utf-8")
    _fails_cleanly(
        run_walcast("check", env=clean_env(**env, WALCAST_CONFIG=str(broken))),
        str(broken),
        "not valid TOML",
    )
    missing = tmp_path / "missing.toml"
    _fails_cleanly(
        run_walcast("serve", "--config", str(missing), env=clean_env(**env)),
        str(missing),
        "not found",
    )


def test_broadcast_without_a_server_and_bad_payload() -> None:
    env = clean_env(ACCESS_TOKEN=ACCESS_TOKEN, WALCAST_PORT=str(free_port()))
    _fails_cleanly(
        run_walcast("broadcast", "--org", "o", "--event", "e", env=env),
        "cannot reach walcast",
        "walcast serve",
    )
    _fails_cleanly(
        run_walcast("broadcast", "--org", "o", "--event", "e", "--payload", "{nope", env=env),
        "--payload is not valid JSON",
    )


def _help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


COMMANDS = ("serve", "demo", "migrate", "check", "ticket", "broadcast")


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(capsys)
    assert not UNEXPLAINED.search(top), top
    for name in ("DATABASE_URL", "ACCESS_TOKEN", "WALCAST_CONFIG", "WALCAST_PORT", "REDIS_URL"):
        assert name in top
    for command in COMMANDS:
        assert command in top
        text = _help(capsys, command)
        assert not UNEXPLAINED.search(text), text
        # Every option says what it is for: a bare `--org ORG` is followed by another option.
        lines = text.split("options:", 1)[1].splitlines()
        for line, after in zip(lines, [*lines[1:], ""], strict=True):
            if re.fullmatch(r"  -\S+(?:,? \S+)*", line):  # the flag alone: help on the next line
                assert re.match(r" {8,}\S", after), f"{command}: {line.strip()} has no help"


def test_console_script_is_installed() -> None:
    assert shutil.which("walcast", path=str(Path(sys.executable).parent)) is not None
