"""What every benchmark shares: a PostgreSQL to run against, result output, small statistics.

A benchmark either gets a DSN (`--dsn`, a server with `wal_level=logical` that it may create
databases on) or starts its own throwaway cluster with the test harness (`tests/pg.py`). It
prints one JSON line (machine-readable, for docs/benchmarks.md) and then a human summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_common_args",
    "database",
    "emit",
    "machine",
    "median",
    "percentile",
    "process_cpu_seconds",
    "process_rss_bytes",
    "raise_nofile",
]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        help="a server with wal_level=logical to create a scratch database on "
        "(default: start a throwaway cluster with tests/pg.py)",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """A fresh scratch database, on `dsn`'s server or on a throwaway local cluster."""
    from tests.pg import PostgresServer, start_postgres

    server = PostgresServer(dsn=dsn, kind="external") if dsn else start_postgres()
    try:
        with server.fresh_database() as scratch:
            yield scratch
    finally:
        if not dsn:
            server.stop()


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    """Resident memory of process `pid`, bytes; 0 once it has exited (a zombie has none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "loadavg_1m": round(load[0], 2),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def emit(name: str, result: dict[str, Any], summary: Sequence[str], *, json_only: bool) -> None:
    """Print the JSON line, then (unless `json_only`) the human summary."""
    record = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    record["machine"] = machine()
    print(json.dumps(record, sort_keys=False), flush=True)
    if not json_only:
        for line in summary:
            print(line, file=sys.stdout)
        sys.stdout.flush()
