"""What a full history costs a full garbage collection: the pause it adds to the event loop.

    .venv/bin/python -m bench.history_gc --events 500000

Fills a `MemoryHistory` (serve's defaults) with `events` changes of a ~200-byte row spread over
`orgs` organizations, then times `gc.collect()` (a full collection, the median of `repeat`) three
ways, in this one process:

* with the history empty: what the process itself costs (the baseline; start-up's objects
  are frozen, as `walcast serve` freezes them);
* with the history full;
* with as many bytes objects of the same size also held in a plain `deque`: what the entries
  would cost the collector if the history kept them that way.

Python runs a full collection when enough objects have survived younger ones, so a busy node
makes one every so often, and the whole event loop waits for it.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.common import emit, median
from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.events import ChangeEvent
from gateway.history import MemoryHistory

TABLE = parse_realtime_config({"tables": {"notes": {}}}).tables["public.notes"]
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _event(n: int, orgs: int) -> ChangeEvent:
    row = {
        "id": RawJson(str(n)),
        "organizationId": f"org_{n % orgs}",
        "title": f"title number {n} of the benchmark",
        "amount": n % 1000,
        "price": RawJson("123.45"),
        "created": "2026-11-28T12:00:00.123456+00:00",
        "doc": RawJson('{"k": "v", "n": 1}'),
    }
    key = (0x100 + n // 1000, n % 1000 + 1)
    return ChangeEvent(
        f"org_{n % orgs}", key, "9f2c41ab", WHEN, TABLE, "INSERT", row, None, (), None, None
    )


def median_ms(repeat: int, run: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    frozen_before = gc.get_freeze_count()
    try:
        return measure(args, frozen_before == 0)
    finally:
        if frozen_before == 0:  # run from the test suite: leave its collector as it was
            gc.unfreeze()


def measure(args: argparse.Namespace, freeze: bool) -> dict[str, Any]:
    history = MemoryHistory(max_total_events=max(500_000, args.events))
    history.complete_from = (0, 0)
    gc.collect()
    if freeze:
        gc.freeze()  # as `walcast serve` does with what start-up made
    empty_ms = median_ms(args.repeat, gc.collect)

    started = time.process_time()
    for n in range(args.events):
        history.append(_event(n, args.orgs))
    append_us = (time.process_time() - started) / args.events * 1e6
    gc.collect()  # the collector's first look at each chunk, after which it stops tracking it
    full_ms = median_ms(args.repeat, gc.collect)

    size = history.nbytes // max(1, len(history))
    as_deque = deque(n.to_bytes(8, "little") * (size // 8) for n in range(args.events))
    deque_ms = median_ms(args.repeat, gc.collect)
    del as_deque

    result = {
        "events": len(history),
        "orgs": args.orgs,
        "repeat": args.repeat,
        "append_cpu_us": round(append_us, 2),
        "bytes_per_event": round(history.nbytes / max(1, len(history))),
        "full_collection_ms_empty": round(empty_ms, 2),
        "full_collection_ms_full": round(full_ms, 2),
        "full_collection_ms_full_plus_deque": round(deque_ms, 2),
    }
    emit(
        "history_gc",
        result,
        [
            f"full collection, median of {args.repeat}, {len(history):,} events kept in "
            f"{args.orgs} organizations:",
            f"  history empty (baseline)          {empty_ms:8.2f} ms",
            f"  history full                      {full_ms:8.2f} ms"
            f"  (+{full_ms - empty_ms:.2f} ms)",
            f"  and as many entries in a deque    {deque_ms:8.2f} ms"
            f"  (+{deque_ms - full_ms:.2f} ms more)",
            f"  append: {append_us:.2f} µs CPU per event; {result['bytes_per_event']} bytes per"
            " event kept",
        ],
        json_only=args.json_only,
    )
    return result


if __name__ == "__main__":
    main()
