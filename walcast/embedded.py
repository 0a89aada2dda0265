"""A throwaway PostgreSQL for `walcast demo`, so the first run needs no database set up.

The server binaries come from, in order: the directory in `WALCAST_PG_BIN`; `initdb`/`pg_ctl` on
`PATH`; Debian's `/usr/lib/postgresql/<version>/bin`; the `pgserver` wheel
(`pip install 'walcast[embedded]'`), which ships a relocatable PostgreSQL. Nothing is downloaded
at run time: with none of these, `EmbeddedUnavailable` says how to get one.

The cluster lives in a fresh temporary directory, listens on 127.0.0.1 on a free port with
`wal_level=logical`, trusts local connections (it is reachable only from this machine and holds
nothing but demo rows), and is stopped and deleted by `stop()`. PostgreSQL refuses to run as
root, so as root the cluster is owned by, and run as, the `postgres` user (via `runuser`). The
server starts in its own session, so a Ctrl-C in the terminal reaches walcast only: walcast then
closes its sockets and replication connection first and stops the server last. A demo killed
outright (`kill -9`) cannot clean up: the next `start_embedded()` sweeps such leftovers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg

from cdc.errors import WalcastError

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedUnavailable",
    "find_bin_dir",
    "pgserver_bin_dir",
    "start_embedded",
    "sweep_stale",
]

log = logging.getLogger(__name__)

#: Settings written to the cluster's postgresql.auto.conf. Durability is off: the data is
#: deleted on exit anyway, and the demo should not wear out a laptop's disk.
SERVER_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "log_min_messages": "warning",
}

INSTALL_HINT = (
    "walcast demo needs a PostgreSQL server and found none on this machine. Either:\n"
    "  - install PostgreSQL (Debian/Ubuntu: apt-get install postgresql;"
    " macOS: brew install postgresql@16), or\n"
    "  - install the embedded server wheel: pip install 'walcast[embedded]', or\n"
    "  - point the demo at a server that has wal_level=logical:"
    " walcast demo --database-url postgresql://user@host/db"
)

_TOOLS = ("initdb", "pg_ctl")
#: In each cluster's directory: the pid of the walcast process that owns it (see sweep_stale).
OWNER_FILE = "walcast.pid"


class EmbeddedUnavailable(WalcastError, RuntimeError):
    """No usable PostgreSQL binaries, or they could not start a cluster; the message says why."""


def _has_tools(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _TOOLS)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/16/bin -> (16,); newest first after a reverse sort.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def pgserver_bin_dir() -> Path | None:
    """The binaries of the `pgserver` wheel, if installed (found without importing it)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if _has_tools(candidate):
            return candidate
    return None


def find_bin_dir() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: `WALCAST_PG_BIN` when set, else the sources
    in the module docstring, in that order."""
    forced = os.environ.get("WALCAST_PG_BIN")
    if forced:
        return Path(forced) if _has_tools(Path(forced)) else None
    on_path = shutil.which("initdb")
    if on_path:
        directory = Path(on_path).resolve().parent
        if _has_tools(directory):
            return directory
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for directory in debian:
        if _has_tools(directory):
            return directory
    return pgserver_bin_dir()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """One temporary cluster. Use `start_embedded()`; `stop()` is idempotent."""

    bin_dir: Path
    base: Path
    port: int = 0
    database: str = "walcast"
    _run_as: list[str] = field(default_factory=list, repr=False)
    _running: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 120, new_session: bool = False) -> None:
        try:
            subprocess.run(  # noqa: S603 - fixed binaries from find_bin_dir, no shell
                [*self._run_as, *args],
                check=True,
                capture_output=True,
                timeout=timeout,
                cwd=self.base,
                start_new_session=new_session,
            )
        except subprocess.CalledProcessError as exc:
            output = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip()
            tail = "\n".join(output.splitlines()[-5:])
            raise EmbeddedUnavailable(
                f"{Path(args[0]).name} failed (exit {exc.returncode}): {tail}"
            ) from None

    def _start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            *("-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8"),
            "--no-sync",
        )
        log_file = self.base / "server.log"
        last_error: EmbeddedUnavailable | None = None
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            settings = {
                **SERVER_SETTINGS,
                "port": str(self.port),
                "unix_socket_directories": str(self.base),
            }
            with open(self.data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
                conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    *("-D", str(self.data_dir), "-l", str(log_file), "-w", "-t", "60", "start"),
                    new_session=True,
                )
            except EmbeddedUnavailable as exc:
                last_error = exc
                continue
            self._running = True
            break
        else:
            assert last_error is not None
            raise last_error
        self._wait_ready()
        with psycopg.connect(self._maintenance_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"'.encode())

    @property
    def _maintenance_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self._maintenance_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling a server that gives no readiness event

    def stop(self) -> None:
        """Stop the server (fast shutdown, immediate if that hangs) and delete its directory."""
        if self._running and self.data_dir.exists():
            self._running = False
            pg_ctl = str(self.bin_dir / "pg_ctl")
            try:
                self._run(pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "20", "stop")
            except (EmbeddedUnavailable, subprocess.TimeoutExpired):
                with contextlib.suppress(EmbeddedUnavailable, subprocess.TimeoutExpired):
                    self._run(pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
        log.info("embedded PostgreSQL stopped and its data deleted")

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run_as_prefix() -> tuple[list[str], pwd.struct_passwd | None]:
    if os.geteuid() != 0:
        return [], None
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise EmbeddedUnavailable(
            "PostgreSQL refuses to run as root and this machine has no 'postgres' user:"
            " run walcast demo as an ordinary user, or create one (useradd --system postgres)"
        ) from None
    if not shutil.which("runuser"):
        raise EmbeddedUnavailable(
            "running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'"
        )
    return ["runuser", "-u", "postgres", "--"], account


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path | None = None) -> int:
    """Stop and delete the clusters of demos that died without cleaning up (`kill -9`): those
    whose `walcast.pid` names a process that is gone. Returns how many were swept."""
    directory = directory or Path(tempfile.gettempdir())
    swept = 0
    for base in directory.glob("walcast-demo-*"):
        owner = _read_pid(base / OWNER_FILE)
        if owner is None or _alive(owner):
            continue
        lock = base / "data" / "postmaster.pid"
        postmaster = _read_pid(lock)
        if postmaster is not None and _alive(postmaster):
            with contextlib.suppress(OSError):
                os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown
            # The server deletes its lock file on exit (its pid may linger as a zombie).
            deadline = time.monotonic() + 10
            while lock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # a foreign process: no event to wait on
        shutil.rmtree(base, ignore_errors=True)
        swept += 1
    return swept


def start_embedded(bin_dir: Path | None = None) -> EmbeddedPostgres:
    """Create and start a temporary cluster with a database `walcast`; see the module docstring.

    Raises:
        EmbeddedUnavailable: no binaries (the message says how to install them), or the cluster
            could not be created or started (the message carries PostgreSQL's last words).
    """
    bin_dir = bin_dir or find_bin_dir()
    if bin_dir is None:
        raise EmbeddedUnavailable(INSTALL_HINT)
    prefix, account = _run_as_prefix()
    swept = sweep_stale()
    if swept:
        log.info("deleted %d embedded cluster(s) left behind by demos that were killed", swept)
    base = Path(tempfile.mkdtemp(prefix="walcast-demo-"))
    server = EmbeddedPostgres(bin_dir=bin_dir, base=base, _run_as=prefix)
    try:
        (base / OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")
        if account is not None:
            os.chown(base, account.pw_uid, account.pw_gid)
        log.info("starting an embedded PostgreSQL from %s", bin_dir)
        server._start()
    except BaseException:
        server.stop()
        raise
    log.info("embedded PostgreSQL listening on 127.0.0.1:%d (wal_level=logical)", server.port)
    return server
