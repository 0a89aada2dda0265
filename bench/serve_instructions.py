"""Instructions `walcast serve` executes per change catching up on the same WAL (callgrind).

    .venv/bin/python -m bench.serve_instructions --rows 200000 --tree ../previous-release

CPU time on a shared 2-vCPU guest swings by 20 % and more between runs of the same code
(where the walsender and serve land, what the neighbours do; see docs/benchmarks.md), so a
change of a few percent cannot be seen in `bench.serve_cdc`. An instruction count can: the
same code on the same WAL gives the same count to within a fraction of a percent. So this is
the A/B check for a change to the serve path.

Set-up as `bench.serve_cdc` (the same table, `rows` inserts in 1,000-row transactions over 10
organizations, one slot per run, all made before the inserts). Each code tree, this one first
and then each `--tree` (a checkout of another release, its C extensions built, e.g. with
`git worktree add`), runs as `walcast serve` under `valgrind --tool=callgrind` on its own
slot, its code on PYTHONPATH, until `walcast_changes_total` reaches `rows` and it has logged
that it caught up; then SIGTERM. A run of the same tree on a slot made after the inserts
(start-up and shutdown alone) is subtracted from each, so the figures are per change.

The reference in the same run: `pg_recvlogical` under callgrind on its own slot of the same
WAL, to /dev/null (its whole run, start-up included, per change). Neither side counts the
kernel's share (the TCP receive): CPU time includes it, so `bench.serve_cdc` stays the figure
for time. Under valgrind serve runs some 50 times slower, so its batches are larger than in
real time: the count is a comparison between trees, not a prediction of CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.common import add_common_args, database, emit
from bench.serve_cdc import CONFIG, PUBLICATION, changes_total, launch_serve, prepare
from cdc.lsn import format_lsn

HERE = Path(__file__).resolve().parent.parent
CAUGHT_UP = "caught up with the WAL"
#: Start-up under callgrind takes about half a minute on this machine class.
START_SECONDS = 600.0


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def total_instructions(out: Path) -> int:
    """The instruction total of a callgrind output file."""
    text = out.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(found.group(1))


async def serve_instructions(dsn: str, tree: Path, slot: str, rows: int, workdir: Path) -> int:
    """Run `walcast serve` of `tree` under callgrind until it has caught up with `rows`
    changes; its instruction total."""
    out = workdir / "callgrind.out"
    serve = launch_serve(
        dsn, CONFIG, slot=slot, publication=PUBLICATION, workdir=workdir,
        code=tree, wrapper=callgrind(out),
    )  # fmt: skip
    deadline = time.monotonic() + START_SECONDS + rows / 500
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                await asyncio.sleep(1.0)
                if serve.process.poll() is not None:
                    tail = serve.log.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"walcast serve exited ({serve.process.returncode}):\n{tail}")
                if time.monotonic() > deadline:
                    raise SystemExit("walcast serve did not catch up in time under callgrind")
                try:
                    async with http.get(f"{serve.url}/metrics") as response:
                        seen = changes_total(await response.text())
                except aiohttp.ClientError:
                    continue  # still starting
                if seen >= rows and CAUGHT_UP in serve.log.read_text(errors="replace"):
                    break
    finally:
        serve.process.send_signal(signal.SIGTERM)
        serve.process.wait(300)  # callgrind writes its file as the process exits
    return total_instructions(out)


def recvlogical_instructions(dsn: str, slot: str, end_lsn: int, workdir: Path) -> int:
    """`pg_recvlogical` under callgrind, from `slot`'s start to `end_lsn`; its total."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_recvlogical"), reverse=True)
    binary = found[0] if found else shutil.which("pg_recvlogical")
    if binary is None:
        raise SystemExit("pg_recvlogical not found (install the PostgreSQL client binaries)")
    out = workdir / "recvlogical.out"
    command = [*callgrind(out), binary, "-d", dsn, "--slot", slot, "--start", "--no-loop"]
    command += ["-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}"]
    command += ["-o", "messages=true", "-f", "/dev/null", "-E", format_lsn(end_lsn)]
    subprocess.run(command, check=True, timeout=3600, capture_output=True)
    return total_instructions(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="row changes")
    parser.add_argument(
        "--tree",
        type=Path,
        action="append",
        default=[],
        help="another code tree to compare (repeatable); this one always runs first",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (Debian: apt install valgrind)")
    trees = [HERE, *(tree.resolve() for tree in args.tree)]

    with database(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="serve-instr-") as tmp:
        tag = uuid.uuid4().hex[:8]
        rows, end_lsn = prepare(dsn, args.rows, 1000, len(trees), 10, tag)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(len(trees)):
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                    (f"idle_{i}_{tag}",),
                )
        start_ups, totals = [], []
        for i, tree in enumerate(trees):
            work = Path(tmp) / f"tree{i}"
            start_ups.append(
                asyncio.run(serve_instructions(dsn, tree, f"idle_{i}_{tag}", 0, work / "idle"))
            )
            totals.append(
                asyncio.run(serve_instructions(dsn, tree, f"walcast_{i}_{tag}", rows, work))
            )
        recv = recvlogical_instructions(dsn, f"recv_0_{tag}", end_lsn, Path(tmp))

    per_change = [
        round((total - start_up) / rows) for total, start_up in zip(totals, start_ups, strict=True)
    ]
    result: dict[str, Any] = {
        "rows": rows,
        "trees": [str(tree) for tree in trees],
        "start_up_instructions": start_ups,
        "serve_instructions": totals,
        "serve_instructions_per_change": per_change,
        "pg_recvlogical_instructions_per_change": round(recv / rows),
        "ratio_to_first": [round(n / per_change[0], 3) for n in per_change],
    }
    emit(
        "serve_instructions",
        result,
        [
            f"walcast serve catching up on {rows} inserts under callgrind, instructions per "
            "change (start-up subtracted):",
            *(f"  {n:>9,}  {tree}" for n, tree in zip(per_change, trees, strict=True)),
            f"  {round(recv / rows):>9,}  pg_recvlogical -> /dev/null, same WAL",
        ],
        json_only=args.json_only,
    )
    return result


if __name__ == "__main__":
    main()
