"""Where `walcast serve`'s CPU goes per change, stage by stage, on captured WAL with no I/O.

    .venv/bin/python -m bench.serve_stages --rows 50000

Captures the CopyData messages of `rows` inserts into `bench.serve_cdc`'s table (10
organizations, 1,000-row transactions) once, then replays them, timing microseconds per row
change (best of `repeat`):

* `read`: stream framing, pgoutput decoding and typed rows (`cdc`), as the reader does;
* `route`: `walcast.routing.Router` over the reader's items;
* `publish`: the routed events into the node's hubs and in-memory history (`HubRegistry`,
  `MemoryHistory`, with the serve defaults), no sockets;
* `serve path`: all three in one pass, as `walcast.pipeline` chains them (its loop over a run
  of row changes included).

CPU-bound and single-threaded, so far steadier than `bench.serve_cdc` on a shared machine: the
one to run before and after a change to the serve path. `bench.serve_cdc` remains the headline
figure (a real `walcast serve` process against `pg_recvlogical`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pickle
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.cdc_stages import best_of, capture, report
from bench.common import add_common_args, database
from bench.serve_cdc import CONFIG, END_PREFIX, INSERT_BATCHES, PUBLICATION, SCHEMA
from cdc.changes import ChangeBuilder, Item, RowChange
from cdc.decoder import Decoder
from cdc.reader import DECODE_SLICE
from cdc.replication import ReplicationProtocol, XLogData
from cdc.runs import ChangeRuns
from gateway.broadcasts import BroadcastSigner
from gateway.config import parse_realtime_config
from gateway.history import MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from walcast.app import LocalSink
from walcast.pipeline import publish_changes
from walcast.routing import Router

SLOT = "stages"
STAGES = ("read", "route", "publish", "serve path")


def prepare(dsn: str, rows: int, batch: int, orgs: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA.encode())
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
        batches = max(1, rows // batch)
        conn.execute(INSERT_BATCHES.format(batches=batches, batch=batch, orgs=orgs).encode())
        conn.execute("SELECT pg_logical_emit_message(true, %s, 'end')", (END_PREFIX,))


def reading(frames: list[bytes]) -> Callable[[int, int], list[Item]]:
    """The reader's decoding, as `cdc.reader` does it: `frames[start:stop]`'s items, runs of
    row changes in one call (`cdc.runs`) and every other message one by one."""
    protocol, decoder, builder = ReplicationProtocol(), Decoder(), ChangeBuilder()
    receive, decode, feed = protocol.receive, decoder.decode, builder.feed
    take = ChangeRuns(protocol, decoder, builder).take

    def read_slice(start: int, stop: int) -> list[Item]:
        messages = frames[start:stop]
        items: list[Item] = []
        i = 0
        while i < len(messages):
            i = take(messages, i, items)
            if i < len(messages):
                message = receive(messages[i])
                i += 1
                if type(message) is XLogData:
                    items += feed(decode(message.payload, message.data_start))
        return items

    return read_slice


def read(frames: list[bytes]) -> list[Item]:
    read_slice, items = reading(frames), []
    for start in range(0, len(frames), DECODE_SLICE):
        items += read_slice(start, start + DECODE_SLICE)
    return items


def route_all(router: Router) -> Callable[[list[Item]], list[list[Any]]]:
    """Route each item as the pipeline does (a row change through `route_change`): a list of
    events per item that has any."""
    route, route_change = router.route, router.route_change

    def route_items(items: list[Item]) -> list[list[Any]]:
        routed = []
        for item in items:
            events = route_change(item) if type(item) is RowChange else route(item)
            if events:
                routed.append(events)
        return routed

    return route_items


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile the serve path once")
    parser.add_argument(
        "--frames",
        type=Path,
        help="keep the captured WAL in this file, and read it from there when it exists",
    )
    parser.add_argument(
        "--only", choices=STAGES, help="run this stage alone (e.g. under callgrind)"
    )
    add_common_args(parser)
    args = parser.parse_args(argv)

    if args.frames and args.frames.exists():
        frames = pickle.loads(args.frames.read_bytes())
    else:
        with database(args.dsn) as dsn:
            prepare(dsn, args.rows, args.batch, args.orgs)
            frames = asyncio.run(capture(dsn, SLOT, PUBLICATION, END_PREFIX))
        if args.frames:
            args.frames.write_bytes(pickle.dumps(frames))

    config = parse_realtime_config(tomllib.loads(CONFIG))
    items = read(frames)
    changes = sum(type(item) is RowChange for item in items)

    def new_router() -> Router:
        return Router(config, BroadcastSigner(["x" * 32]), Metrics())

    def new_sink() -> LocalSink:
        history = MemoryHistory(
            seconds=config.historySeconds,
            max_events=config.historyMaxEvents,
            max_total_events=config.historyMaxTotalEvents,
            max_total_bytes=config.historyMaxBytes,
        )
        return LocalSink(HubRegistry(Metrics(), history), history)

    def new_publisher() -> Callable[[list[list[Any]]], None]:
        publish = new_sink().publish

        def publish_all(routed: list[list[Any]]) -> None:
            for events in routed:
                publish(events)

        return publish_all

    routed = route_all(new_router())(items)
    # The fixtures live through every run; in serve they come and go. Kept out of the
    # collector's sight, so collections cost what they cost serve.
    gc.collect()
    gc.freeze()

    def routing() -> None:
        route_all(new_router())(items)

    def publishing() -> None:
        new_publisher()(routed)

    def serve_path() -> None:
        """As `walcast.pipeline` runs it: a run of row changes in one call, each other item
        routed on its own (its time checks and bookkeeping aside)."""
        router, publish, read_slice = new_router(), new_sink().publish, reading(frames)
        route, route_change, counts = router.route, router.route_change, {}
        for start in range(0, len(frames), DECODE_SLICE):
            batch = read_slice(start, start + DECODE_SLICE)
            i = 0
            while i < len(batch):
                if type(batch[i]) is RowChange:
                    i = publish_changes(batch, i, RowChange, counts, route_change, publish)
                else:
                    route(batch[i])  # a transaction's start and end: no events
                    i += 1

    stages = dict(zip(STAGES, (lambda: read(frames), routing, publishing, serve_path), strict=True))
    if args.only:
        stages = {args.only: stages[args.only]}
    micros = {
        name: round(best_of(args.repeat, run) / changes * 1e6, 3) for name, run in stages.items()
    }
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(serve_path)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return report(
        "serve_stages",
        "serve path stages",
        micros,
        "serve path",
        changes,
        len(frames),
        args.repeat,
        args.json_only,
    )


if __name__ == "__main__":
    main()
