"""Redis bus: how many events/s the reader's sink stores in Redis, against Redis's own pace.

    .venv/bin/python -m bench.redis_bus --events 20000 --transaction 1 100

Needs a Redis (`--redis-url`, default `REDIS_URL` or redis://127.0.0.1:6379/0); every key is
under a prefix of the run's own and deleted afterwards. No PostgreSQL: the events are the
ones `bench.wsload` builds (row changes of about 300 bytes), spread over `--orgs`
organizations, in transactions of `--transaction` rows (each followed by `mark_position`, as
the pipeline does at a commit). Three ways to store the same events, interleaved per round:

* walcast: `RedisSink` as the reader runs it (`publish` queues, `run` stores a batch per
  round trip, in one Lua call), timed from the first `publish` until `flush` returns.
* one round trip per event: the same Lua script called with one event at a time, each
  awaited (what the sink did before batching; the pace of any design that waits for Redis
  per row).
* bare pipelined XADD: the same entries, pipelined in batches of 1,000, no Lua, no
  position, no duplicate check: about as fast as one client can feed this Redis.

Prints events/s for each (median of `--rounds`) and walcast's ratio to the other two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from bench.common import emit, median
from bench.wsload import CONFIG, row
from cdc.cursors import format_cursor, parse_cursor
from cdc.identity import Identity
from gateway.config import parse_realtime_config
from gateway.events import ChangeEvent
from walcast.aio import cancel_and_wait
from walcast.bus import PUBLISH_SCRIPT, BusKeys, RedisSink, encode_events, stream_id

#: The made-up database the benchmark's history belongs to.
BENCH_IDENTITY = Identity("1", 1, "bench", 1, "walcast")


def make_events(count: int, orgs: int, transaction: int) -> list[list[ChangeEvent]]:
    """`count` INSERTs in transactions of `transaction` rows, organizations round robin."""
    import tomllib
    from datetime import UTC, datetime

    table = parse_realtime_config(tomllib.loads(CONFIG)).tables["public.orders"]
    now = datetime.now(UTC)
    transactions: list[list[ChangeEvent]] = []
    for first in range(0, count, transaction):
        lsn = 0x100_0000 + first * 0x100
        transactions.append(
            [
                ChangeEvent(
                    organization_id=f"org-{i % orgs}",
                    key=(lsn, position),
                    epoch="",
                    commit_time=now,
                    table=table,
                    event_type="INSERT",
                    new=row(i),
                    old=None,
                    unchanged=(),
                    target_user=None,
                    owner_id=None,
                )
                for position, i in enumerate(range(first, min(first + transaction, count)), 1)
            ]
        )
    return transactions


def fresh_keys() -> BusKeys:
    """Keys under a prefix of this run's own (every Redis bench key starts `walcast-bench:`)."""
    return BusKeys(f"walcast-bench:{uuid.uuid4().hex[:10]}:")


async def drop(redis: aioredis.Redis, keys: BusKeys) -> None:
    async for key in redis.scan_iter(match=f"{keys.prefix}*", count=1000):
        await redis.delete(key)


def add_redis_url_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )


async def run_sink(redis: aioredis.Redis, transactions: list[list[ChangeEvent]]) -> float:
    keys = fresh_keys()
    sink = RedisSink(redis, keys, history_seconds=600, max_len=1_000_000)
    await sink.start(0x100_0000, BENCH_IDENTITY, 1 << 40)
    task = asyncio.create_task(sink.run())
    try:
        started = time.perf_counter()
        for events in transactions:
            for event in events:
                sink.publish([event])
            sink.mark_position(events[-1].commit_lsn + 1)
            await sink.wait_for_room()
        await sink.flush()
        elapsed = time.perf_counter() - started
    finally:
        await cancel_and_wait(task)
        await drop(redis, keys)
    assert sink.published == sum(map(len, transactions)) and sink.duplicates == 0
    return elapsed


async def run_per_event(redis: aioredis.Redis, transactions: list[list[ChangeEvent]]) -> float:
    keys = fresh_keys()
    await redis.set(keys.floor, format_cursor(0x100_0000, 0))
    script = redis.register_script(PUBLISH_SCRIPT)
    try:
        started = time.perf_counter()
        for events in transactions:
            for event in events:
                key = parse_cursor(event.cursor)
                assert key is not None
                await script(  # a batch of one
                    keys=[keys.floor, keys.position, keys.org(event.organization_id or "")],
                    args=["1000000", event.cursor, stream_id(key), 1, 3, encode_events([event])],
                )
        return time.perf_counter() - started
    finally:
        await drop(redis, keys)


async def run_bare(redis: aioredis.Redis, transactions: list[list[ChangeEvent]]) -> float:
    keys = fresh_keys()
    events = [event for events in transactions for event in events]
    try:
        started = time.perf_counter()
        for first in range(0, len(events), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for event in events[first : first + 1000]:
                    pipe.xadd(keys.org(event.organization_id or ""), {"e": encode_events([event])})
                await pipe.execute()
        return time.perf_counter() - started
    finally:
        await drop(redis, keys)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(args.redis_url)
    sides: dict[str, Callable[[aioredis.Redis, list[list[ChangeEvent]]], Awaitable[float]]] = {
        "walcast": run_sink,
        "per_event": run_per_event,
        "bare_pipeline": run_bare,
    }
    results: dict[str, Any] = {}
    try:
        for size in args.transaction:
            transactions = make_events(args.events, args.orgs, size)
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, run in sides.items():
                    rates[side].append(args.events / await run(redis, transactions))
            medians = {side: round(median(values)) for side, values in rates.items()}
            results[str(size)] = {
                "events_per_s": medians,
                "vs_per_event": round(medians["walcast"] / medians["per_event"], 2),
                "vs_bare_pipeline": round(medians["walcast"] / medians["bare_pipeline"], 2),
            }
    finally:
        await redis.aclose()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--transaction", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=3)
    add_redis_url_arg(parser)
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    by_size = asyncio.run(measure(args))
    result = {"events": args.events, "orgs": args.orgs, "rounds": args.rounds, "by_size": by_size}
    lines = [
        f"Redis bus, {args.events} events over {args.orgs} organizations (median of "
        f"{args.rounds}), events/s:"
    ]
    for size, numbers in by_size.items():
        rates = numbers["events_per_s"]
        lines.append(
            f"  transactions of {size:>4} rows: walcast {rates['walcast']:>8,}  one round trip "
            f"per event {rates['per_event']:>8,}  bare pipelined XADD {rates['bare_pipeline']:>8,}"
            f"  -> {numbers['vs_per_event']}x per-event, {numbers['vs_bare_pipeline']}x bare"
        )
    emit("redis_bus", result, lines, json_only=args.json_only)
    return result


if __name__ == "__main__":
    main()
