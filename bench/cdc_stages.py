"""Where CDC time goes, stage by stage, on captured WAL with no I/O in the timed loops.

    .venv/bin/python -m bench.cdc_stages --rows 50000

Captures the CopyData messages of `rows` inserts (the same table as `bench.cdc_throughput`)
from a slot once, then replays them through each stage in turn, timing microseconds per row
change (best of `repeat`): stream framing (`cdc.replication`), pgoutput decoding
(`cdc.decoder`), typed rows (`cdc.changes`), JSON (`cdc.render`), and all of them together.
CPU-bound and single-threaded, so it is far steadier than the end-to-end benchmark on a
shared machine: it is the one to run before and after a change to those modules.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.cdc_throughput import END_PREFIX, PUBLICATION, SCHEMA, prepare
from bench.common import add_common_args, database, emit
from cdc.changes import ChangeBuilder, RowChange
from cdc.decoder import Decoder
from cdc.messages import Insert, Message
from cdc.render import dumps
from cdc.replication import ReplicationProtocol, XLogData
from cdc.transport import ReplicationConnection

assert SCHEMA  # the captured table is bench.cdc_throughput's


async def capture(
    dsn: str, slot: str, publication: str = PUBLICATION, end_prefix: str = END_PREFIX
) -> list[bytes]:
    """Every CopyData message of `slot` up to the end message (keepalives included)."""
    conn = await ReplicationConnection.connect(dsn)
    frames: list[bytes] = []
    decoder = Decoder()
    try:
        await conn.start_replication(
            slot,
            0,
            {"proto_version": "1", "publication_names": publication, "messages": "true"},
        )
        protocol = ReplicationProtocol()
        while True:
            data = await conn.read_copy()
            frames.append(data)
            message = protocol.receive(data)
            if isinstance(message, XLogData):
                decoded = decoder.decode(message.payload)
                if isinstance(decoded, Message) and decoded.prefix == end_prefix:
                    return frames
    finally:
        conn.close()


def best_of(repeat: int, run: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def report(
    bench: str,
    title: str,
    micros: dict[str, float],
    total: str,
    changes: int,
    frames: int,
    repeat: int,
    json_only: bool,
) -> dict[str, Any]:
    """Print a stage benchmark's µs per change (`total`: the stage that runs them all)."""
    result = {"rows": changes, "frames": frames, "us_per_change": micros}
    lines = [f"{title}, µs per row change over {changes} inserts (best of {repeat}):"]
    lines += [f"  {name:10s} {value:7.3f}" for name, value in micros.items()]
    if total in micros:
        lines.append(f"  => {1e6 / micros[total]:,.0f} changes/s for the CPU work alone (no I/O)")
    emit(bench, result, lines, json_only=json_only)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    add_common_args(parser)
    args = parser.parse_args(argv)

    with database(args.dsn) as dsn:
        prepare(dsn, args.rows, args.batch, 1)
        frames = asyncio.run(capture(dsn, "walcast_0"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('recv_0')")

    protocol = ReplicationProtocol()
    payloads = [
        (m.payload, m.data_start) for m in map(protocol.receive, frames) if isinstance(m, XLogData)
    ]
    decoder = Decoder()
    messages = [decoder.decode(p, lsn) for p, lsn in payloads]
    builder = ChangeBuilder()
    rows = [i for m in messages for i in builder.feed(m) if isinstance(i, RowChange)]
    changes = sum(isinstance(m, Insert) for m in messages)

    def framing() -> None:
        receive = ReplicationProtocol().receive
        for frame in frames:
            receive(frame)

    def decoding() -> None:
        decode = Decoder().decode
        for payload, lsn in payloads:
            decode(payload, lsn)

    def typing() -> None:
        feed = ChangeBuilder().feed
        for message in messages:
            feed(message)

    def rendering() -> None:
        for row in rows:
            dumps(row.new)

    def everything() -> None:
        receive = ReplicationProtocol().receive
        decode = Decoder().decode
        feed = ChangeBuilder().feed
        for frame in frames:
            message = receive(frame)
            if type(message) is XLogData:
                for item in feed(decode(message.payload, message.data_start)):
                    if type(item) is RowChange:
                        dumps(item.new)

    stages = {
        "framing": framing,
        "decoding": decoding,
        "typing": typing,
        "rendering": rendering,
        "all": everything,
    }
    micros = {
        name: round(best_of(args.repeat, run) / changes * 1e6, 3) for name, run in stages.items()
    }
    return report(
        "cdc_stages", "CDC stages", micros, "all", changes, len(frames), args.repeat, args.json_only
    )


if __name__ == "__main__":
    main()
