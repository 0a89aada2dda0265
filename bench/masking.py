"""Masking cost: serializations per event equal the visibility classes, whatever the audience.

    .venv/bin/python -m bench.masking --sockets 100 10000

For each audience size: connect that many sockets spread over three visibility classes
(`bench.wsload.CLASSES`: raw, half masked, fully masked), publish `events` row changes with two
masked columns, wait until every socket has them all, and read `walcast_serializations_total`
from `GET /metrics` before and after. A count, not a timing: it does not depend on the machine.
Expected: exactly 3 per event at every size (plus 1 for the end-marker broadcast).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import Any

import aiohttp

from bench.common import add_common_args, emit, raise_nofile
from bench.wsload import (
    CLASSES,
    READY_MARKER,
    ClientProcess,
    Server,
    change_event,
    end_event,
    start_server,
)

_SERIALIZATIONS = re.compile(rb"^walcast_serializations_total ([0-9.e+]+)$", re.MULTILINE)


async def serializations(server: Server) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/metrics") as response,
    ):
        found = _SERIALIZATIONS.search(await response.read())
    assert found is not None, "walcast_serializations_total missing from /metrics"
    return float(found.group(1))


async def measure(sizes: list[int], events: int) -> dict[str, Any]:
    server = await start_server()
    client = ClientProcess(server.port)
    per_size: dict[str, Any] = {}
    try:
        for sockets in sizes:
            await client.connect(server.walcast_paths(sockets, prefix=f"s{sockets}-"), READY_MARKER)
            before = await serializations(server)
            for i in range(events):
                server.registry.publish(change_event(server, i))
                await asyncio.sleep(0)
            server.registry.publish(end_event(server))
            ended, lost, ok, _ = await client.await_end()
            after = await serializations(server)
            changes = after - before - 1  # the end marker is one broadcast serialization
            per_size[str(sockets)] = {
                "events": events,
                "serializations": int(after - before),
                "serializations_per_event": changes / events,
                "all_received": ok and ended == sockets and not lost,
            }
            await client.close_sockets()
    finally:
        await client.quit()
        await server.close()
    counts = {r["serializations_per_event"] for r in per_size.values()}
    return {
        "classes": len(CLASSES),
        "results": per_size,
        "independent_of_audience": len(counts) == 1,
        "target_met": counts == {float(len(CLASSES))},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--events", type=int, default=50)
    add_common_args(parser)
    args = parser.parse_args(argv)
    raise_nofile(1 << 20)
    result = asyncio.run(measure(args.sockets, args.events))
    lines = [
        f"Masking cost ({result['classes']} visibility classes, walcast_serializations_total):"
    ]
    for sockets, r in result["results"].items():
        lines.append(
            f"  {int(sockets):>6} subscribers: {r['serializations_per_event']:.2f} serializations "
            f"per event over {r['events']} events (all received: {r['all_received']})"
        )
    lines.append(
        f"  target (= classes, independent of subscribers): "
        f"{'met' if result['target_met'] else 'NOT met'}"
    )
    emit("masking", result, lines, json_only=args.json_only)
    return result


if __name__ == "__main__":
    main()
