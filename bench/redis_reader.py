"""The Redis-mode reader end to end: WAL → pipeline → `RedisSink` → Redis, against the same
pipeline into a sink that keeps nothing, on the same WAL.

    .venv/bin/python -m bench.redis_reader --rows 100000 --transaction 1 100

Set-up per transaction size: a table of six columns with an organization column (10
organizations), a publication, and `2 x rounds` slots made by `Pipeline.prepare` before any
row is written; then `rows` inserts in transactions of `transaction` rows, and a last row
labelled END. Each run streams one fresh slot through `walcast.pipeline.Pipeline` (reader,
decoder, typed rows, routing) until the END row has been published:

* redis: into `RedisSink` (with its `run` task) under a prefix of the run's own, timed until
  `flush` returns, so every event is stored in Redis;
* in-process: into a sink that drops the events: the CDC and the routing alone, what any
  sink costs on top of.

Sides interleaved, medians. Needs PostgreSQL (its own throwaway cluster unless `--dsn`) and
Redis (`--redis-url`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tomllib
from collections.abc import Sequence
from typing import Any

import psycopg
import redis.asyncio as aioredis

from bench.common import add_common_args, database, emit, median
from bench.redis_bus import add_redis_url_arg, drop, fresh_keys
from gateway.config import RealtimeConfig, Settings, parse_realtime_config
from gateway.events import AccessRevoked, ChangeEvent, RoutedEvent
from gateway.metrics import Metrics
from walcast.aio import cancel_and_wait
from walcast.bus import RedisSink
from walcast.pipeline import DropSink, EventSink, Pipeline

SCHEMA = """
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    "organizationId" text NOT NULL,
    label text NOT NULL,
    qty integer NOT NULL,
    price numeric(12, 2) NOT NULL,
    attrs jsonb NOT NULL
);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""

CONFIG = """
[tables."public.orders"]
requiredRoles = ["owner", "member"]
"""

INSERTS = """
DO $$
BEGIN
  FOR b IN 0 .. {batches} - 1 LOOP
    INSERT INTO orders ("organizationId", label, qty, price, attrs)
    SELECT 'org-' || (g % 10), 'item-' || g || '-' || md5(g::text), g % 1000,
           (g % 100000) / 100.0 + 0.25, jsonb_build_object('color', 'blue', 'size', g % 7)
    FROM generate_series(b * {batch} + 1, (b + 1) * {batch}) AS g;
    COMMIT;
  END LOOP;
END $$
"""
END_ROW = """INSERT INTO orders ("organizationId", label, qty, price, attrs)
VALUES ('org-0', 'END', 0, 0, '{}')"""


class _UntilEnd:
    """Passes everything on, and notices the END row."""

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.done = asyncio.Event()
        self.events = 0

    def publish(self, events: Sequence[RoutedEvent | AccessRevoked]) -> None:
        self.inner.publish(events)
        self.events += len(events)
        for event in events:
            if isinstance(event, ChangeEvent) and event.new and event.new["label"] == "END":
                self.done.set()

    async def wait_for_room(self) -> None:
        await self.inner.wait_for_room()

    def mark_position(self, commit_lsn: int) -> None:
        self.inner.mark_position(commit_lsn)


async def run_side(
    side: str, settings: Settings, config: RealtimeConfig, redis_url: str
) -> tuple[float, float, int]:
    """Stream one slot to the END row; returns (seconds, CPU seconds, events)."""
    redis = aioredis.Redis.from_url(redis_url)
    keys = fresh_keys()
    redis_sink = RedisSink(redis, keys, history_seconds=600, max_len=10_000_000)
    sink = _UntilEnd(redis_sink if side == "redis" else DropSink())
    pipeline = Pipeline(settings, config, sink, Metrics(), on_ready=lambda lsn: None)
    start_lsn = await pipeline.prepare()
    tasks: list[asyncio.Task[None]] = []
    try:
        if side == "redis":
            assert pipeline.identity is not None
            pipeline.epoch = await redis_sink.start(start_lsn, pipeline.identity, pipeline.wal_end)
            tasks.append(asyncio.create_task(redis_sink.run()))
        started, cpu_started = time.perf_counter(), time.process_time()
        tasks.append(asyncio.create_task(pipeline.run(start_lsn)))
        await sink.done.wait()
        if side == "redis":
            await redis_sink.flush()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await cancel_and_wait(*tasks)
        await drop(redis, keys)
        await redis.aclose()
    return elapsed, cpu, sink.events


def measure(dsn: str, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    config = parse_realtime_config(tomllib.loads(CONFIG))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute(SCHEMA)
    sides = ("redis", "in_process")
    slots = {
        (side, i): Settings(
            database_url=dsn, slot=f"bench_{side}_{batch}_{i}", publication="bench_pub"
        )
        for i in range(args.rounds)
        for side in sides
    }
    for settings in slots.values():  # every slot starts before the rows
        asyncio.run(Pipeline(settings, config, DropSink(), Metrics(), on_ready=print).prepare())
    with psycopg.connect(dsn, autocommit=True) as conn:
        batches = max(1, args.rows // batch)
        conn.execute(INSERTS.format(batches=batches, batch=batch).encode())
        conn.execute(END_ROW)
    rates: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(args.rounds):
        for side in sides:
            seconds, cpu_seconds, events = asyncio.run(
                run_side(side, slots[side, i], config, args.redis_url)
            )
            # every row once (and the END row): what was timed is the whole stream
            assert events == batches * batch + 1, (side, events, batches * batch + 1)
            rates[side].append(events / seconds)
            cpu[side].append(cpu_seconds / events * 1e6)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for settings in slots.values():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot,))
    medians = {side: round(median(values)) for side, values in rates.items()}
    return {
        "changes_per_s": medians,
        "cpu_us_per_change": {side: round(median(v), 2) for side, v in cpu.items()},
        "ratio": round(medians["redis"] / medians["in_process"], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--transaction", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=3)
    add_redis_url_arg(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    with database(args.dsn) as dsn:
        by_size = {str(batch): measure(dsn, args, batch) for batch in args.transaction}
    result = {"rows": args.rows, "rounds": args.rounds, "by_size": by_size}
    lines = [f"Redis-mode reader, {args.rows} inserts, median of {args.rounds} (changes/s):"]
    for size, numbers in by_size.items():
        rates, cpu = numbers["changes_per_s"], numbers["cpu_us_per_change"]
        lines.append(
            f"  transactions of {size:>4} rows: into Redis {rates['redis']:>8,} "
            f"({cpu['redis']} µs CPU/change), in-process sink that keeps nothing "
            f"{rates['in_process']:>8,} ({cpu['in_process']} µs) -> {numbers['ratio']}x"
        )
    emit("redis_reader", result, lines, json_only=args.json_only)
    return result


if __name__ == "__main__":
    main()
