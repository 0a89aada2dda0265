"""A PostgreSQL with `wal_level=logical` for the tests, from the first source that works (spec §9):

1. `WALCAST_TEST_DATABASE_URL` (a server you run; `restart()` is then unavailable);
2. testcontainers' `PostgresContainer`, where a Docker engine answers;
3. an ephemeral cluster made with the local `initdb`/`pg_ctl` in a temporary directory on a free
   port, run as the `postgres` user when the tests run as root.

The shared system server on 5432 is never touched: it is not set up for logical replication and
other work depends on it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

__all__ = ["PostgresServer", "start_postgres"]

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "40",
    "max_connections": "300",
    "fsync": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
    "log_min_messages": "warning",
    "wal_sender_timeout": "60s",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


@dataclass
class PostgresServer:
    """A running server: `dsn` points at its maintenance database `postgres`."""

    dsn: str
    kind: str
    _restart: object = field(default=None, repr=False)
    _stop: object = field(default=None, repr=False)

    @property
    def can_restart(self) -> bool:
        return self._restart is not None

    def restart(self, *, mode: str = "fast") -> None:
        """Restart the server (`mode="immediate"` simulates a crash)."""
        if self._restart is None:
            raise RuntimeError(f"cannot restart a {self.kind} server")
        self._restart(mode)  # type: ignore[operator]

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()  # type: ignore[operator]

    def dsn_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.dsn, dbname=dbname)

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new, empty database for one test; dropped (with its slots) afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.dsn_for(name)
        finally:
            self._drop_database(name)

    def _drop_database(self, name: str) -> None:
        for _ in range(50):
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                        " WHERE database = %s AND active_pid IS NOT NULL",
                        (name,),
                    )
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE database = %s AND NOT active",
                        (name,),
                    )
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    return
            except psycopg.Error:
                time.sleep(0.1)


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def _start_container() -> PostgresServer:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16", driver=None)
    container.with_command(" ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()))
    container.start()
    dsn = container.get_connection_url()

    def restart(mode: str) -> None:
        container.get_wrapped_container().restart(timeout=0 if mode == "immediate" else 10)
        _wait_ready(dsn)

    return PostgresServer(dsn=dsn, kind="container", _restart=restart, _stop=container.stop)


def _wait_ready(dsn: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _start_local_cluster() -> PostgresServer:
    initdb, pg_ctl = _find_binary("initdb"), _find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError(
            "no PostgreSQL for the tests: set WALCAST_TEST_DATABASE_URL, run a Docker engine, "
            "or install the PostgreSQL server binaries (initdb, pg_ctl)"
        )
    as_root = os.geteuid() == 0
    base = tempfile.mkdtemp(prefix="walcast-pg-")
    datadir = os.path.join(base, "data")
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    run(initdb, "-D", datadir, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    port = _free_port()
    settings = {**SERVER_SETTINGS, "port": str(port), "unix_socket_directories": base}
    with open(os.path.join(datadir, "postgresql.auto.conf"), "a", encoding="utf-8") as conf:
        for key, value in settings.items():
            conf.write(f"{key} = '{value}'\n")
    log = os.path.join(base, "server.log")
    run(pg_ctl, "-D", datadir, "-l", log, "-w", "-t", "60", "start")
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def restart(mode: str) -> None:
        if mode == "immediate":
            run(pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop")
            run(pg_ctl, "-D", datadir, "-l", log, "-w", "-t", "60", "start")
        else:
            run(pg_ctl, "-D", datadir, "-l", log, "-m", mode, "-w", "-t", "60", "restart")
        _wait_ready(dsn)

    def stop() -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            run(pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)

    _wait_ready(dsn)
    return PostgresServer(dsn=dsn, kind="local", _restart=restart, _stop=stop)


def start_postgres() -> PostgresServer:
    """Start (or find) the test server, in the order documented above."""
    url = os.environ.get("WALCAST_TEST_DATABASE_URL")
    if url:
        _wait_ready(url)
        return PostgresServer(dsn=url, kind="external")
    if _docker_answers():
        return _start_container()
    return _start_local_cluster()
