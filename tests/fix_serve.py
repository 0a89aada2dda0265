"""`walcast` as a subprocess: one-shot CLI runs, `walcast serve` processes (alone or as a
cluster of readers and gateway nodes sharing a Redis), waiting for `/readyz`, stopping them.

Readiness of another process has no event to await from outside, so the waits ask `/readyz`;
every other wait is on a message arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg

from tests.fix_gateway import (
    ACCESS_TOKEN,
    Socket,
    add_member,
    clean_env,
    free_port,
    walcast_command,
)
from walcast.cli import apply_migrations


def prepare_database(dsn: str, directory: Path, *, schema: str, config: str) -> Path:
    """The session store and `schema` in the database; `config` written to a file in
    `directory`, whose path is returned (for WALCAST_CONFIG)."""
    apply_migrations(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema.encode())
    path = directory / "realtime.toml"
    path.write_text(config, encoding="utf-8")
    return path


def serve_env(dsn: str, config: Path, **more: str) -> dict[str, str]:
    """The environment of a `walcast serve` on `dsn` with the config file `config`, on a slot
    and publication of its own (several processes given one such environment share them)."""
    return clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(config),
        WALCAST_SLOT=f"w_{uuid.uuid4().hex[:12]}",
        WALCAST_PUBLICATION=f"w_{uuid.uuid4().hex[:12]}",
        **more,
    )


def run_walcast(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """One `walcast` command, run to its end, with text logs; its output is captured."""
    return subprocess.run(
        [*walcast_command(), "--log-format", "text", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def wait_ready(
    url: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 30.0,
) -> None:
    """Ask `url`/readyz until it says 200; fail at once (with `log`) if `process` exits."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if process is not None and process.poll() is not None:
                raise AssertionError(f"walcast exited ({process.returncode}):\n{_text(log)}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() >= deadline:
                raise AssertionError(f"walcast did not become ready:\n{_text(log)}")
            await asyncio.sleep(0.05)


def _text(log: Path | None) -> str:
    return "" if log is None else log.read_text(encoding="utf-8", errors="replace")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still running 10 s later."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Walcast:
    """One `walcast serve` process (reader, gateway node, or both) and its log lines."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, role: str) -> None:
        self.process = process
        self.port = port
        self.role = role
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def readyz(self, http: aiohttp.ClientSession) -> int:
        try:
            async with http.get(f"{self.url}/readyz") as response:
                return response.status
        except aiohttp.ClientError:
            return 0

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while await self.readyz(http) != 200:
            assert self.process.returncode is None, f"{self.role} exited:\n" + self.log()
            assert time.monotonic() < deadline, f"{self.role} not ready:\n" + self.log()
            await asyncio.sleep(0.05)

    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            await self.kill()
            code = -9
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        return code


class Cluster:
    """Processes sharing one database, one slot, one Redis and one key prefix."""

    def __init__(self, env: dict[str, str], dsn: str, http: aiohttp.ClientSession) -> None:
        self.env = env
        self.dsn = dsn
        self.http = http
        self.processes: list[Walcast] = []
        self.sockets: list[Socket] = []

    async def start(self, role: str, *, redis_url: str | None = None) -> Walcast:
        flags = {"reader": ["--no-gateway"], "node": ["--no-cdc"], "both": []}[role]
        port = free_port()
        env = dict(self.env, WALCAST_PORT=str(port))
        if redis_url is not None:
            env["REDIS_URL"] = redis_url
        process = await asyncio.create_subprocess_exec(
            *walcast_command(),
            "--log-format",
            "text",
            "serve",
            *flags,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        walcast = Walcast(process, port, role)
        self.processes.append(walcast)
        return walcast

    async def reader_and_node(self, *, redis_url: str | None = None) -> tuple[Walcast, Walcast]:
        """A `--no-gateway` reader and a `--no-cdc` gateway node, both ready."""
        reader = await self.start("reader", redis_url=redis_url)
        node = await self.start("node", redis_url=redis_url)
        await self.wait_ready(reader, node)
        return reader, node

    async def wait_ready(self, *processes: Walcast) -> None:
        for walcast in processes:
            await walcast.wait_ready(self.http)

    async def close(self) -> None:
        for sock in self.sockets:
            if not sock.ws.closed:
                await sock.ws.close()
        for walcast in self.processes:
            await walcast.stop()

    def sql(self, query: str, params: Any = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)

    def add_member(self, user: str, org: str, roles: str) -> str:
        return add_member(self.dsn, user, org, roles)

    async def ticket(self, node: Walcast, token: str, org: str) -> str:
        async with self.http.post(
            f"{node.url}/realtime/v1/ws-ticket",
            headers={"Authorization": f"Bearer {token}"},
            json={"organizationId": org},
        ) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["wsTicket"])

    async def connect(
        self, node: Walcast, token: str, org: str, *, since: str | None = None
    ) -> Socket:
        ticket = await self.ticket(node, token, org)
        params = {"ws_ticket": ticket, "organizationId": org}
        if since is not None:
            params["since"] = since
        ws = await self.http.ws_connect(f"{node.url}/realtime/v1/websocket", params=params)
        sock = Socket(ws)
        sock.start()
        self.sockets.append(sock)
        await sock.wait_for(lambda m: m.get("event") == "ready", timeout=20)
        return sock

    async def broadcast(self, node: Walcast, body: dict[str, Any]) -> int:
        async with self.http.post(
            f"{node.url}/realtime/v1/broadcast",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {ACCESS_TOKEN}"},
        ) as response:
            await response.read()
            return response.status
