"""`walcast serve` catching up on committed inserts vs `pg_recvlogical`, same WAL.

    .venv/bin/python -m bench.serve_cdc --rows 300000
    .venv/bin/python -m bench.serve_cdc --kind update

The headline CDC figure, through the code path users run: a real `walcast serve` process (the
CLI, configured by environment: DATABASE_URL, ACCESS_TOKEN, WALCAST_CONFIG, WALCAST_PORT,
WALCAST_SLOT, WALCAST_PUBLICATION), so routing, history, cursors and metrics are included.

Set-up: one table of seven columns (bigserial, two text of which one is the organization,
int, numeric, timestamptz, jsonb), REPLICA IDENTITY FULL, a publication on it, and `2 x runs`
logical slots, all created before the inserts so every slot reads the same WAL. Then `rows`
inserts are committed (`synchronous_commit = on`) in transactions of `batch` rows, spread over
`orgs` organizations, and a transactional logical message marks the end position. With
`--kind update` the rows are inserted before the slots exist and the WAL the runs read is
`rows` UPDATEs of them instead (one column each, in transactions of `batch` rows): with
REPLICA IDENTITY FULL each carries its whole old row too, so serve types two rows per change.

Runs are interleaved, each on a fresh slot:

* A, `walcast serve` (historySeconds 120, the default bounds) streams the slot from the start.
  `/metrics` and `/healthz` are each polled every 50 ms; the rate is that of
  `walcast_changes_total` between the first scrapes at or past 10 % and 90 % of `rows`, and the
  CPU per change is the serve process's utime+stime (/proc/<pid>/stat) over the same scrapes.
  The polls' answer times are the loop's responsiveness during a catch-up (target: every
  answer within 100 ms). A loop that answers no scrape between 10 % and 90 % cannot be timed
  that way: the rate is then that of the whole catch-up as serve's own log times it ("replication
  streaming" to "caught up with the WAL"), and the CPU spans the whole catch-up too.
  Python's garbage-collection pauses in the serve process are recorded
  by a `sitecustomize` hook put on its PYTHONPATH (`gc.callbacks`; no product code involved).
* B, `pg_recvlogical --start -o proto_version=1 -o publication_names=<pub> -o messages=true
  -f /dev/null -E <end LSN>`, timed from start to exit, its CPU from getrusage(RUSAGE_CHILDREN).

`--gc-threshold off` (or `g0,g1,g2`) runs serve with another collector setting, through the
same hook: an experiment that shows what the collector costs.

`--py-spy FILE` samples the first walcast run with py-spy (`--format raw`, non-blocking) from
the first poll to the last change, and adds the top frames by own and cumulative time and the
share of each stage under `Pipeline.run`. py-spy charges a collection to the Python frame whose
allocation triggered it: read it together with the GC figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.cdc_throughput import find_pg_recvlogical
from bench.common import (
    add_common_args,
    database,
    emit,
    median,
    percentile,
    process_cpu_seconds,
    process_rss_bytes,
)
from cdc.lsn import format_lsn, parse_lsn
from tests.fix_gateway import ACCESS_TOKEN, clean_env, free_port, walcast_command

__all__ = [
    "GC_HOOK",
    "ServeProcess",
    "add_gc_threshold_arg",
    "gc_pauses",
    "gc_threshold_env",
]

TABLE = "bench_serve"
PUBLICATION = "bench_serve_pub"
END_PREFIX = "bench-end"
POLL_SECONDS = 0.05
SLOW_ANSWER_SECONDS = 0.1  #: issue target: every /healthz and /metrics answer within this

SCHEMA = f"""
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    "organizationId" text NOT NULL,
    label text NOT NULL,
    qty integer NOT NULL,
    price numeric(12, 2) NOT NULL,
    created timestamptz NOT NULL,
    attrs jsonb NOT NULL
);
ALTER TABLE {TABLE} REPLICA IDENTITY FULL;
CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE};
"""

INSERT_BATCHES = f"""
DO $$
BEGIN
  FOR b IN 0 .. {{batches}} - 1 LOOP
    INSERT INTO {TABLE} ("organizationId", label, qty, price, created, attrs)
    SELECT 'org_' || (g % {{orgs}}),
           'item-' || g || '-' || md5(g::text),
           g % 1000,
           (g % 100000) / 100.0 + 0.25,
           now() - (g || ' seconds')::interval,
           jsonb_build_object('color', 'blue', 'size', g % 7, 'tags', jsonb_build_array('a', 'b'))
    FROM generate_series(b * {{batch}} + 1, (b + 1) * {{batch}}) AS g;
    COMMIT;
  END LOOP;
END $$;
"""

CONFIG = f"""
historySeconds = 120
[tables."public.{TABLE}"]
"""

REPOSITORY = Path(__file__).resolve().parent.parent

# Installed as `sitecustomize` on the serve process's PYTHONPATH: Python imports it at start-up.
# Each collection's wall time goes to the file named by WALCAST_BENCH_GC_LOG, one line each:
# "<unix time> <generation> <seconds> <collected>", appended by a thread every 0.2 s.
# WALCAST_BENCH_GC_THRESHOLD ("off", or "g0,g1,g2") tries another collector setting: what
# the collector costs, measured without changing walcast.
GC_HOOK = """
import atexit, gc, os, threading, time

_threshold = os.environ.get("WALCAST_BENCH_GC_THRESHOLD")
if _threshold == "off":
    gc.disable()
elif _threshold:
    gc.set_threshold(*map(int, _threshold.split(",")))

_path = os.environ.get("WALCAST_BENCH_GC_LOG")
if _path:
    _pending = []
    _began = [0.0]

    def _timed(phase, info):
        if phase == "start":
            _began[0] = time.perf_counter()
        else:
            ended = time.perf_counter()
            _pending.append((time.time(), info["generation"], ended - _began[0], info["collected"]))

    def _flush():
        batch = _pending[:]
        del _pending[: len(batch)]
        if batch:
            with open(_path, "a") as out:
                out.write("".join("%.6f %d %.6f %d\\n" % entry for entry in batch))

    def _loop():
        while True:
            time.sleep(0.2)
            _flush()

    gc.callbacks.append(_timed)
    threading.Thread(target=_loop, name="bench-gc-log", daemon=True).start()
    atexit.register(_flush)
"""


def add_gc_threshold_arg(parser: argparse.ArgumentParser) -> None:
    """`--gc-threshold`: the collector setting GC_HOOK gives serve, for an experiment."""
    parser.add_argument(
        "--gc-threshold",
        default="",
        help='an experiment: serve\'s collector "off" or "g0,g1,g2" (default: as shipped)',
    )


def gc_threshold_env(threshold: str) -> dict[str, str]:
    """What serve's environment needs for GC_HOOK to apply `threshold` ("": as shipped)."""
    return {"WALCAST_BENCH_GC_THRESHOLD": threshold} if threshold else {}


@dataclass
class GcPause:
    at: float  #: unix time the collection ended
    generation: int
    seconds: float
    collected: int


def gc_pauses(path: Path) -> list[GcPause]:
    if not path.exists():
        return []
    pauses = []
    for line in path.read_text().splitlines():
        at, generation, seconds, collected = line.split()
        pauses.append(GcPause(float(at), int(generation), float(seconds), int(collected)))
    return pauses


def during(pauses: Sequence[GcPause], began: float, ended: float) -> list[GcPause]:
    """The collections that ended between `began` and `ended` (unix time)."""
    return [pause for pause in pauses if began <= pause.at <= ended]


def summarize_gc(pauses: Sequence[GcPause]) -> dict[str, Any]:
    """Count, total and longest pause per generation, and the overall p99/max."""
    by_generation: dict[str, Any] = {}
    for generation in (0, 1, 2):
        times = sorted(p.seconds * 1000 for p in pauses if p.generation == generation)
        by_generation[str(generation)] = {
            "count": len(times),
            "total_ms": round(sum(times), 1),
            "max_ms": round(times[-1], 2) if times else None,
        }
    every = sorted(p.seconds * 1000 for p in pauses)
    return {
        "collections": len(every),
        "total_ms": round(sum(every), 1),
        "p99_ms": round(percentile(every, 0.99), 2) if every else None,
        "max_ms": round(every[-1], 2) if every else None,
        "by_generation": by_generation,
    }


@dataclass
class ServeProcess:
    """A running `walcast serve` (the CLI) on a free port, its GC pauses logged to `gc_log`."""

    process: subprocess.Popen[bytes]
    url: str
    gc_log: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def launch_serve(
    dsn: str,
    config: str,
    *,
    slot: str,
    publication: str,
    workdir: Path,
    cpus: set[int] | None = None,
    code: Path = REPOSITORY,
    wrapper: Sequence[str] = (),
    **env: str,
) -> ServeProcess:
    """Start `walcast serve` of the tree `code` with `config` (TOML text), its GC pauses
    logged by `GC_HOOK`; on `cpus` only when given, under `wrapper` (a command prefix)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.toml").write_text(config)
    hook = workdir / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(GC_HOOK)
    gc_log, log = workdir / "gc.log", workdir / "serve.log"
    gc_log.unlink(missing_ok=True)
    port = free_port()
    environment = clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(workdir / "config.toml"),
        WALCAST_PORT=str(port),
        WALCAST_SLOT=slot,
        WALCAST_PUBLICATION=publication,
        WALCAST_BENCH_GC_LOG=str(gc_log),
        PYTHONPATH=os.pathsep.join([str(hook), str(code)]),
        **env,
    )
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [*wrapper, *walcast_command(), "serve"],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else partial(os.sched_setaffinity, 0, cpus),
        )
    return ServeProcess(process, f"http://127.0.0.1:{port}", gc_log, log)


@contextlib.asynccontextmanager
async def serve_process(dsn: str, config: str, **launch: Any) -> AsyncIterator[ServeProcess]:
    """`launch_serve(dsn, config, **launch)`, wait until /healthz answers; SIGTERM (then
    SIGKILL) on the way out."""
    running = launch_serve(dsn, config, **launch)
    process, log = running.process, running.log
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"walcast serve exited ({process.returncode}):\n{tail}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{running.url}/healthz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SystemExit("walcast serve did not answer /healthz within 60 s")
                await asyncio.sleep(0.02)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Poll:
    sent: float
    answered: float
    changes: float = 0.0  #: /metrics only: walcast_changes_total over all labels
    cpu: float = 0.0  #: /metrics only: the serve process's CPU seconds at the answer

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


@dataclass
class Polls:
    healthz: list[Poll] = field(default_factory=list)
    metrics: list[Poll] = field(default_factory=list)


def changes_total(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("walcast_changes_total{")
    )


async def poll(
    http: aiohttp.ClientSession,
    url: str,
    into: list[Poll],
    stop: asyncio.Event,
    reading: Callable[[str], tuple[float, float]] | None = None,
) -> None:
    """GET `url` every POLL_SECONDS (one request in flight) until `stop`."""
    while not stop.is_set():
        sent = time.perf_counter()
        async with http.get(url) as response:
            body = await response.text()
        answered = time.perf_counter()
        entry = Poll(sent, answered)
        if reading is not None:
            entry.changes, entry.cpu = reading(body)
        into.append(entry)
        await asyncio.sleep(max(0.0, sent + POLL_SECONDS - time.perf_counter()))


def responsiveness(polls: Sequence[Poll]) -> dict[str, Any]:
    times = sorted(p.seconds * 1000 for p in polls)
    return {
        "answers": len(times),
        "max_ms": round(times[-1], 1) if times else None,
        "p50_ms": round(median(times), 1),
        "over_100ms": sum(t > SLOW_ANSWER_SECONDS * 1000 for t in times),
    }


def window(scrapes: Sequence[Poll], rows: int) -> tuple[Poll, Poll, str]:
    """The first scrapes at or past 10 % and 90 % of `rows`, and what they span.

    When no scrape was answered in between (the loop did not answer during the catch-up), the
    window widens to the last scrape before 10 %: the CPU then covers the whole catch-up.
    """
    first = next(i for i, s in enumerate(scrapes) if s.changes >= 0.1 * rows)
    last = next(i for i, s in enumerate(scrapes) if s.changes >= 0.9 * rows)
    if first < last:
        return scrapes[first], scrapes[last], "10-90 %"
    if first == 0:
        raise SystemExit("too few /metrics answers during the catch-up to time it")
    return scrapes[first - 1], scrapes[last], "whole catch-up"


def logged_catchup(log: Path) -> tuple[float, float]:
    """From serve's own log: when 'replication streaming' and 'caught up with the WAL' were
    logged (unix time, ms stamps)."""
    began = ended = None
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("msg", "")
        if message == "replication streaming" and began is None:
            began = _stamp(entry["ts"])
        elif message.startswith("caught up with the WAL"):
            ended = _stamp(entry["ts"])
    if began is None or ended is None:
        raise SystemExit(f"serve's log does not show the catch-up ({log})")
    return began, ended


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass
class WalcastRun:
    rate: float  #: changes/s over the scrape window, or over the logged catch-up if none
    cpu_us: float
    window: str
    logged_rate: float  #: rows / the catch-up's duration in serve's log
    polls: Polls
    gc: list[GcPause]  #: the whole process's, start-up included
    catch_up: tuple[float, float]  #: when the catch-up began and ended (unix time)
    rss_bytes: int
    profile: dict[str, Any] | None = None


async def run_walcast(
    dsn: str,
    slot: str,
    rows: int,
    workdir: Path,
    py_spy: Path | None,
    gc_threshold: str,
    cpus: set[int] | None = None,
) -> WalcastRun:
    env = gc_threshold_env(gc_threshold)
    async with serve_process(
        dsn, CONFIG, slot=slot, publication=PUBLICATION, workdir=workdir, cpus=cpus, **env
    ) as serve:
        pid = serve.pid
        spy = None
        if py_spy is not None:
            spy = _start_py_spy(pid, py_spy)
        polls, stop = Polls(), asyncio.Event()

        def reading(body: str) -> tuple[float, float]:
            return changes_total(body), process_cpu_seconds(pid)

        async with aiohttp.ClientSession() as http:
            pollers = [
                asyncio.create_task(poll(http, f"{serve.url}/healthz", polls.healthz, stop)),
                asyncio.create_task(
                    poll(http, f"{serve.url}/metrics", polls.metrics, stop, reading)
                ),
            ]
            deadline = time.monotonic() + max(120.0, rows / 2000)
            while not polls.metrics or polls.metrics[-1].changes < rows:
                if serve.process.poll() is not None:
                    raise SystemExit(f"walcast serve exited during the catch-up ({serve.log})")
                if time.monotonic() > deadline:
                    raise SystemExit("walcast serve did not catch up within the time allowed")
                await asyncio.sleep(POLL_SECONDS / 2)
            stop.set()
            await asyncio.gather(*pollers)
        profile = _stop_py_spy(spy, py_spy) if spy is not None and py_spy is not None else None
        rss = process_rss_bytes(pid)
    start, end, spans = window(polls.metrics, rows)
    changes = end.changes - start.changes
    began, ended = logged_catchup(serve.log)
    logged_rate = rows / (ended - began)
    return WalcastRun(
        rate=changes / (end.answered - start.answered) if spans == "10-90 %" else logged_rate,
        cpu_us=(end.cpu - start.cpu) / changes * 1e6,
        window=spans,
        logged_rate=logged_rate,
        polls=polls,
        gc=gc_pauses(serve.gc_log),
        catch_up=(began, ended),
        rss_bytes=rss,
        profile=profile,
    )


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    return subprocess.Popen(
        [*command, "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_py_spy(spy: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    spy.wait(30)
    return top_frames(out.read_text().splitlines())


PIPELINE_FRAME = "Pipeline.run (walcast/pipeline.py)"


def top_frames(lines: Sequence[str], top: int = 15) -> dict[str, Any]:
    """Top frames of a py-spy raw (collapsed-stack) profile by own and by cumulative samples,
    and the stages: the share of samples under each frame that `Pipeline.run` calls (its own
    lines count as `(own)`, anything not in the pipeline as `(not in the pipeline)`)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        if "sitecustomize" in stack:
            continue  # the bench's own GC-log thread, not walcast
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
        if PIPELINE_FRAME in frames:
            below = frames[frames.index(PIPELINE_FRAME) + 1 :]
            stages[below[0] if below else "(own)"] += count
        else:
            stages["(not in the pipeline)"] += count
    share = 100.0 / max(total, 1)
    return {
        "samples": total,
        "own_percent": [(f, round(n * share, 1)) for f, n in own.most_common(top)],
        "cumulative_percent": [(f, round(n * share, 1)) for f, n in cumulative.most_common(top)],
        "stages_percent": [(f, round(n * share, 1)) for f, n in stages.most_common()],
    }


def _short(frame: str) -> str:
    """'function (path/to/module.py:123)' -> 'function (module.py)': one entry per function."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


UPDATE_BATCHES = f"""
DO $$
BEGIN
  FOR b IN 0 .. {{batches}} - 1 LOOP
    UPDATE {TABLE} SET qty = qty + 1 WHERE id BETWEEN b * {{batch}} + 1 AND (b + 1) * {{batch}};
    COMMIT;
  END LOOP;
END $$;
"""

KINDS = ("insert", "update")


def prepare(
    dsn: str, rows: int, batch: int, runs: int, orgs: int, tag: str, kind: str = "insert"
) -> tuple[int, int]:
    """Table, publication and every run's slots (`<side>_<run>_<tag>`), then the WAL of `rows`
    changes of `kind`; returns (rows, end LSN)."""
    batches = max(1, rows // batch)
    inserts = INSERT_BATCHES.format(batches=batches, batch=batch, orgs=orgs).encode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA.encode())
        if kind == "update":  # the rows exist before the slots: the runs read only updates
            conn.execute(inserts)
        for i in range(runs):
            for side in ("walcast", "recv"):
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                    (f"{side}_{i}_{tag}",),
                )
        conn.execute("SET synchronous_commit = on")
        if kind == "update":
            conn.execute(UPDATE_BATCHES.format(batches=batches, batch=batch).encode())
        else:
            conn.execute(inserts)
        row = conn.execute(
            "SELECT pg_logical_emit_message(true, %s, 'end')::text", (END_PREFIX,)
        ).fetchone()
        assert row is not None
        return batches * batch, parse_lsn(row[0])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="row changes")
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--orgs", type=int, default=10, help="organizations the rows spread over")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (A B A B ...)")
    parser.add_argument(
        "--kind", choices=KINDS, default="insert", help="the changes: inserts, or updates"
    )
    parser.add_argument("--py-spy", type=Path, help="profile the first walcast run into FILE")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the measured process (serve, pg_recvlogical) on the last CPU and everything "
        "else (PostgreSQL, this harness) on the others: steadier CPU figures",
    )
    add_gc_threshold_arg(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    binary = find_pg_recvlogical()
    everywhere = os.sched_getaffinity(0)
    measured = None
    if args.pin:
        cpus = sorted(everywhere)
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least two CPUs")
        measured = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # the cluster started below inherits it
    try:
        walcast_runs: list[WalcastRun] = []
        recv_rates: list[float] = []
        recv_cpu: list[float] = []
        with database(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="serve-cdc-") as tmp:
            started = time.perf_counter()
            tag = uuid.uuid4().hex[:8]  # slot names are server-wide
            rows, end_lsn = prepare(
                dsn, args.rows, args.batch, args.runs, args.orgs, tag, args.kind
            )
            setup_seconds = time.perf_counter() - started
            for i in range(args.runs):
                spy = args.py_spy if i == 0 else None
                workdir = Path(tmp) / f"run{i}"
                job = run_walcast(
                    dsn, f"walcast_{i}_{tag}", rows, workdir, spy, args.gc_threshold, measured
                )
                walcast_runs.append(asyncio.run(job))
                seconds, cpu = run_recvlogical(binary, dsn, f"recv_{i}_{tag}", end_lsn, measured)
                recv_rates.append(rows / seconds)
                recv_cpu.append(cpu / rows * 1e6)
    finally:
        os.sched_setaffinity(0, everywhere)  # back as it was: the tests call main() in-process

    rates = [run.rate for run in walcast_runs]
    walcast_rate, recv_rate = median(rates), median(recv_rates)
    ratio = walcast_rate / recv_rate
    cpu_us = median([run.cpu_us for run in walcast_runs])
    healthz = [responsiveness(run.polls.healthz) for run in walcast_runs]
    metrics = [responsiveness(run.polls.metrics) for run in walcast_runs]
    worst = max(h["max_ms"] or 0 for h in healthz + metrics)
    slow = sum(h["over_100ms"] for h in healthz + metrics)
    result: dict[str, Any] = {
        "rows": rows,
        "kind": args.kind,
        "batch": args.batch,
        "orgs": args.orgs,
        "runs": args.runs,
        "gc_threshold": args.gc_threshold or "default",
        "pinned": args.pin,
        "setup_seconds": round(setup_seconds, 1),
        "walcast_changes_per_s": round(walcast_rate),
        "pg_recvlogical_changes_per_s": round(recv_rate),
        "ratio": round(ratio, 3),
        "walcast_runs": [round(r) for r in rates],
        "pg_recvlogical_runs": [round(r) for r in recv_rates],
        "walcast_cpu_us_per_change": round(cpu_us, 2),
        "walcast_cpu_runs": [round(run.cpu_us, 2) for run in walcast_runs],
        "pg_recvlogical_cpu_us_per_change": round(median(recv_cpu), 2),
        "windows": [run.window for run in walcast_runs],
        "walcast_logged_catchup_runs": [round(run.logged_rate) for run in walcast_runs],
        "healthz": healthz,
        "metrics": metrics,
        "gc": [summarize_gc(run.gc) for run in walcast_runs],
        "catch_up_gc": [summarize_gc(during(run.gc, *run.catch_up)) for run in walcast_runs],
        "serve_rss_mb_at_end": [round(run.rss_bytes / 2**20, 1) for run in walcast_runs],
        "target_ratio": 0.8,
        "target_met": ratio >= 0.8,
        "responsive_target_met": slow == 0,
    }
    if walcast_runs[0].profile is not None:
        result["profile"] = walcast_runs[0].profile
    gc_first, gc_catch_up = result["gc"][0], result["catch_up_gc"][0]
    emit(
        "serve_cdc",
        result,
        [
            f"walcast serve catching up on {rows} {args.kind}s ({args.batch}-row transactions, "
            f"{args.orgs} organizations), {args.runs} interleaved runs each:",
            f"  walcast serve: {walcast_rate:,.0f} changes/s (median; runs "
            + ", ".join(f"{run.rate:,.0f} over {run.window}" for run in walcast_runs)
            + ")",
            f"  pg_recvlogical -> /dev/null, same WAL:      {recv_rate:,.0f} changes/s",
            f"  ratio {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})",
            f"  CPU per change: walcast serve {cpu_us:.2f} µs, pg_recvlogical "
            f"{median(recv_cpu):.2f} µs",
            f"  /healthz and /metrics during the catch-up: slowest answer {worst:.0f} ms, "
            f"{slow} answers over 100 ms (target: none)",
            f"  GC in serve (first run): {gc_first['collections']} collections, "
            f"{gc_first['total_ms']} ms in all, longest {gc_first['max_ms']} ms; during the "
            f"catch-up {gc_catch_up['collections']}, {gc_catch_up['total_ms']} ms, longest "
            f"{gc_catch_up['max_ms']} ms",
        ],
        json_only=args.json_only,
    )
    return result


def run_recvlogical(
    binary: str, dsn: str, slot: str, end_lsn: int, cpus: set[int] | None = None
) -> tuple[float, float]:
    """Run pg_recvlogical to the end LSN (on `cpus` only when given); returns (seconds, its
    CPU seconds)."""
    command = [binary, "-d", dsn, "--slot", slot, "--start", "--no-loop", "-o", "proto_version=1"]
    command += ["-o", f"publication_names={PUBLICATION}", "-o", "messages=true"]
    command += ["-f", "/dev/null", "-E", format_lsn(end_lsn)]
    cpu_started = _children_cpu()
    started = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        timeout=600,
        capture_output=True,
        preexec_fn=None if cpus is None else partial(os.sched_setaffinity, 0, cpus),
    )
    return time.perf_counter() - started, _children_cpu() - cpu_started


if __name__ == "__main__":
    main()
