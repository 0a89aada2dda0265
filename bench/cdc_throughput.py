"""CDC throughput: walcast's reader + decoder + typed rows + JSON vs `pg_recvlogical`, same WAL.

    .venv/bin/python -m bench.cdc_throughput --rows 200000

Set-up: one table of six columns (text, int, numeric, timestamptz, jsonb, bigint), a
publication on it, and `2 x runs` logical slots created at the same WAL position. Then `rows`
inserts are committed in transactions of `batch` rows, followed by a transactional logical
message (prefix `bench-end`) whose LSN is the end position. Each run reads one fresh slot from
the start to that message:

* A, walcast: `cdc.reader.ReplicationReader.items()` (transport, stream protocol, decoder,
  `ChangeBuilder` typed values), and every row rendered with `cdc.render.dumps`.
* B, `pg_recvlogical --start -o proto_version=1 -o publication_names=<pub>
  -o messages=true -f /dev/null -E <end LSN>` (the C client, same options, output discarded).

Runs are interleaved A B A B ... and the medians compared; both are timed wall clock from
process/connection start to the end message, so both include connecting. On a shared machine
the wall-clock ratio swings with other load (the Python side is CPU-bound, the C client mostly
waits for the walsender), so each side's CPU time per change is reported too: walcast's own
process time, and pg_recvlogical's user+system time from `getrusage(RUSAGE_CHILDREN)`.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import resource
import shutil
import subprocess
import time
from typing import Any

import psycopg

from bench.common import add_common_args, database, emit, median
from cdc.changes import LogicalMessage, RowChange
from cdc.lsn import format_lsn, parse_lsn
from cdc.reader import ReplicationReader
from cdc.render import dumps

PUBLICATION = "bench_pub"
END_PREFIX = "bench-end"

SCHEMA = """
CREATE TABLE bench_rows (
    id bigserial PRIMARY KEY,
    label text NOT NULL,
    qty integer NOT NULL,
    price numeric(12, 2) NOT NULL,
    created timestamptz NOT NULL,
    attrs jsonb NOT NULL,
    counter bigint NOT NULL
);
ALTER TABLE bench_rows REPLICA IDENTITY FULL;
CREATE PUBLICATION bench_pub FOR TABLE bench_rows;
"""

# One batch: `batch` rows of ~150 bytes of text output each, committed by the DO loop.
INSERT_BATCHES = """
DO $$
BEGIN
  FOR b IN 0 .. {batches} - 1 LOOP
    INSERT INTO bench_rows (label, qty, price, created, attrs, counter)
    SELECT 'item-' || g || '-' || md5(g::text),
           g % 1000,
           (g % 100000) / 100.0 + 0.25,
           now() - (g || ' seconds')::interval,
           jsonb_build_object('color', 'blue', 'size', g % 7, 'tags', jsonb_build_array('a', 'b')),
           g::bigint * 1000003
    FROM generate_series(b * {batch} + 1, (b + 1) * {batch}) AS g;
    COMMIT;
  END LOOP;
END $$;
"""


def find_pg_recvlogical() -> str:
    found = shutil.which("pg_recvlogical")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_recvlogical"), reverse=True)
    if not candidates:
        raise SystemExit("pg_recvlogical not found (install the PostgreSQL client binaries)")
    return candidates[0]


def prepare(dsn: str, rows: int, batch: int, runs: int) -> int:
    """Create the table, the slots and the WAL to read; return the end message's LSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for i in range(runs):
            for side in ("walcast", "recv"):
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{side}_{i}",)
                )
        batches = max(1, rows // batch)
        conn.execute(INSERT_BATCHES.format(batches=batches, batch=batch).encode())
        row = conn.execute(
            "SELECT pg_logical_emit_message(true, %s, 'end')::text", (END_PREFIX,)
        ).fetchone()
        assert row is not None
        return parse_lsn(row[0])


async def run_walcast(dsn: str, slot: str) -> tuple[float, float, int, int]:
    """Read `slot` to the end message; returns (seconds, CPU seconds, row changes, JSON bytes)."""
    reader = ReplicationReader(
        dsn, slot=slot, publication=PUBLICATION, tables=["public.bench_rows"]
    )
    changes = 0
    rendered = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    async for item in reader.items():
        if type(item) is RowChange:
            rendered += len(dumps(item.new))
            changes += 1
        elif type(item) is LogicalMessage and item.prefix == END_PREFIX:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    await reader.aclose()
    return elapsed, cpu, changes, rendered


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_recvlogical(binary: str, dsn: str, slot: str, end_lsn: int) -> tuple[float, float]:
    """Run pg_recvlogical to the end LSN; returns (seconds, its CPU seconds)."""
    command = [
        binary,
        "-d",
        dsn,
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={PUBLICATION}",
        "-o",
        "messages=true",
        "-f",
        "/dev/null",
        "-E",
        format_lsn(end_lsn),
    ]
    cpu_started = _children_cpu()
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=600, capture_output=True)
    return time.perf_counter() - started, _children_cpu() - cpu_started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="row changes")
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (A B A B ...)")
    parser.add_argument("--uvloop", action="store_true", help="run walcast's side on uvloop")
    add_common_args(parser)
    args = parser.parse_args(argv)
    binary = find_pg_recvlogical()
    if args.uvloop:
        import uvloop

        runner: Any = uvloop.run
    else:
        runner = asyncio.run

    with database(args.dsn) as dsn:
        started = time.perf_counter()
        end_lsn = prepare(dsn, args.rows, args.batch, args.runs)
        setup_seconds = time.perf_counter() - started
        expected = max(1, args.rows // args.batch) * args.batch
        walcast_rates: list[float] = []
        recv_rates: list[float] = []
        walcast_cpu: list[float] = []
        recv_cpu: list[float] = []
        for i in range(args.runs):
            seconds, cpu, changes, rendered = runner(run_walcast(dsn, f"walcast_{i}"))
            if changes != expected:
                raise SystemExit(f"walcast read {changes} changes, expected {expected}")
            walcast_rates.append(changes / seconds)
            walcast_cpu.append(cpu / changes * 1e6)
            seconds, cpu = run_recvlogical(binary, dsn, f"recv_{i}", end_lsn)
            recv_rates.append(expected / seconds)
            recv_cpu.append(cpu / expected * 1e6)

    walcast_rate, recv_rate = median(walcast_rates), median(recv_rates)
    ratio = walcast_rate / recv_rate
    result = {
        "rows": expected,
        "batch": args.batch,
        "runs": args.runs,
        "loop": "uvloop" if args.uvloop else "asyncio",
        "setup_seconds": round(setup_seconds, 1),
        "walcast_changes_per_s": round(walcast_rate),
        "pg_recvlogical_changes_per_s": round(recv_rate),
        "ratio": round(ratio, 3),
        "walcast_runs": [round(r) for r in walcast_rates],
        "pg_recvlogical_runs": [round(r) for r in recv_rates],
        "walcast_cpu_us_per_change": round(median(walcast_cpu), 2),
        "pg_recvlogical_cpu_us_per_change": round(median(recv_cpu), 2),
        "pg_recvlogical_wall_us_per_change": round(1e6 / recv_rate, 2),
        "json_bytes_per_row": round(rendered / max(changes, 1), 1),
        "target_ratio": 0.8,
        "target_met": ratio >= 0.8,
    }
    emit(
        "cdc_throughput",
        result,
        [
            f"CDC throughput, {expected} inserts in transactions of {args.batch} rows, "
            f"{args.runs} interleaved runs each:",
            f"  walcast (reader+decoder+typed+JSON): {walcast_rate:,.0f} changes/s (median)",
            f"  pg_recvlogical -> /dev/null:         {recv_rate:,.0f} changes/s (median)",
            f"  ratio {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})",
            f"  CPU per change: walcast {median(walcast_cpu):.2f} µs, pg_recvlogical "
            f"{median(recv_cpu):.2f} µs; pg_recvlogical wall {1e6 / recv_rate:.2f} µs/change",
        ],
        json_only=args.json_only,
    )
    return result


if __name__ == "__main__":
    main()
