"""Fan-out: deliveries per second by walcast's hub vs a bare aiohttp `send_str` loop, same run.

    .venv/bin/python -m bench.fanout --sockets 1000 10000

One organization; the sockets are spread over three visibility classes (`bench.wsload.CLASSES`)
and read by a separate client process. Each round connects `sockets` fresh sockets, publishes
`events` row changes of ~300-byte frames, then an end marker, and stops the clock when every
socket has received the marker. Rounds alternate A B A B:

* A, walcast: `HubRegistry.publish(event)` for each event (what the pipeline's sink calls):
  mask + serialize once per class, the same frame bytes queued on every socket and written
  once per socket per loop turn. `--burst` events are published per loop turn
  (`asyncio.sleep(0)` between bursts): 1 is the worst case (an idle database, one event at a
  time); under load the reader hands over every change that has already arrived without
  yielding to the loop, so a burst is what a busy stream looks like.
* B, bare: for each event, `await ws.send_str(text)` for each socket in turn (the text
  serialized once per class beforehand, so the baseline does less work per event).

Deliveries = sockets x (events + 1). Reported: deliveries/s (median of rounds), the ratio, and
the server process's CPU time per delivery (steadier than wall time on a shared machine).
No database is needed: events are handed to the hub registry in process.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from bench.common import add_common_args, emit, median, raise_nofile
from bench.wsload import (
    CLASSES,
    HELLO_MARKER,
    READY_MARKER,
    ClientProcess,
    Server,
    change_event,
    end_event,
    row,
    start_server,
)


async def walcast_round(
    server: Server, client: ClientProcess, sockets: int, events: int, burst: int
) -> dict:
    await client.connect(server.walcast_paths(sockets), READY_MARKER)
    metrics = server.metrics
    before = metrics.deliveries.value
    serializations = metrics.serializations.value
    slow = metrics.slow_consumers._value.get()
    publish = server.registry.publish
    prepared = [change_event(server, i) for i in range(events)]
    cpu, started = time.process_time(), time.perf_counter()
    for i, event in enumerate(prepared, 1):
        publish(event)
        if i % burst == 0:
            await asyncio.sleep(0)
    publish(end_event(server))
    ended, lost, ok, _ = await client.await_end()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    delivered = metrics.deliveries.value - before
    result = {
        "wall": wall,
        "cpu": cpu,
        "deliveries": sockets * (events + 1),
        "counted_deliveries": int(delivered),
        "serializations_per_event": (metrics.serializations.value - serializations) / (events + 1),
        "slow_consumers": int(metrics.slow_consumers._value.get() - slow),
        "ended": ended,
        "lost": lost,
        "complete": ok,
    }
    await client.close_sockets()
    return result


async def bare_round(server: Server, client: ClientProcess, sockets: int, events: int) -> dict:
    await client.connect(server.bare_paths(sockets), HELLO_MARKER)
    texts = [
        [
            orjson.dumps(
                {
                    "type": "postgres_changes",
                    "table": "orders",
                    "schema": "public",
                    "eventType": "INSERT",
                    "new": row(i),
                    "old": None,
                    "id": f"{i:016X}-0001",
                    "commitTimestamp": "2026-11-28T11:46:37.123456Z",
                }
            ).decode()
            for _ in CLASSES
        ]
        for i in range(events)
    ]
    pairs = list(server.bare_classes.items())
    cpu, started = time.process_time(), time.perf_counter()
    for per_class in texts:
        for ws, cls in pairs:
            await ws.send_str(per_class[cls])
    for ws, _ in pairs:
        await ws.send_str("bench-end")
    ended, lost, ok, _ = await client.await_end()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await client.close_sockets()
    return {
        "wall": wall,
        "cpu": cpu,
        "deliveries": sockets * (events + 1),
        "ended": ended,
        "lost": lost,
        "complete": ok,
    }


async def run(
    sizes: list[int], deliveries: int, rounds: int, bursts: list[int], coalesce_ms: float
) -> dict[str, Any]:
    server = await start_server(write_coalesce_ms=coalesce_ms)
    client = ClientProcess(server.port)
    results: dict[str, Any] = {}
    try:
        for sockets in sizes:
            events = max(1, deliveries // sockets)
            for burst in bursts:
                walcast: list[dict] = []
                bare: list[dict] = []
                for _ in range(rounds):
                    walcast.append(await walcast_round(server, client, sockets, events, burst))
                    bare.append(await bare_round(server, client, sockets, events))
                w_rate = median([r["deliveries"] / r["wall"] for r in walcast])
                b_rate = median([r["deliveries"] / r["wall"] for r in bare])
                results[f"{sockets}/burst{burst}"] = {
                    "sockets": sockets,
                    "burst": burst,
                    "events": events,
                    "walcast_deliveries_per_s": round(w_rate),
                    "bare_deliveries_per_s": round(b_rate),
                    "ratio": round(w_rate / b_rate, 2),
                    "walcast_cpu_us_per_delivery": round(
                        median([r["cpu"] / r["deliveries"] * 1e6 for r in walcast]), 3
                    ),
                    "bare_cpu_us_per_delivery": round(
                        median([r["cpu"] / r["deliveries"] * 1e6 for r in bare]), 3
                    ),
                    "walcast_serializations_per_event": walcast[-1]["serializations_per_event"],
                    "walcast_slow_consumers": sum(r["slow_consumers"] for r in walcast),
                    "all_complete": all(r["complete"] and not r["lost"] for r in walcast + bare),
                    "walcast_rounds": [round(r["deliveries"] / r["wall"]) for r in walcast],
                    "bare_rounds": [round(r["deliveries"] / r["wall"]) for r in bare],
                }
    finally:
        await client.quit()
        await server.close()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--deliveries", type=int, default=300_000, help="deliveries per round (sets the events)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side (A B A B)")
    parser.add_argument(
        "--burst", type=int, nargs="+", default=[1, 10], help="events per loop turn (walcast)"
    )
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument(
        "--coalesce-ms", type=float, default=0.5, help="walcast's WALCAST_WRITE_COALESCE_MS"
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    raise_nofile(1 << 20)
    job = run(args.sockets, args.deliveries, args.rounds, args.burst, args.coalesce_ms)
    if args.uvloop:
        import uvloop

        results = uvloop.run(job)
    else:
        results = asyncio.run(job)
    summary = [f"Fan-out, 3 visibility classes, ~300-byte frames, {args.rounds} rounds each:"]
    for r in results.values():
        summary.append(
            f"  {r['sockets']:>6} sockets x {r['events']} events, burst {r['burst']:>3}: walcast "
            f"{r['walcast_deliveries_per_s']:,} deliveries/s, bare send_str "
            f"{r['bare_deliveries_per_s']:,}/s, ratio {r['ratio']:.2f} "
            f"(target >= 2: {'met' if r['ratio'] >= 2 else 'NOT met'}); CPU/delivery "
            f"{r['walcast_cpu_us_per_delivery']:.2f} vs {r['bare_cpu_us_per_delivery']:.2f} µs"
        )
    emit(
        "fanout",
        {
            "loop": "uvloop" if args.uvloop else "asyncio",
            "coalesce_ms": args.coalesce_ms,
            "results": results,
        },
        summary,
        json_only=args.json_only,
    )
    return results


if __name__ == "__main__":
    main()
