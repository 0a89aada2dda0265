"""Memory: resident memory per idle WebSocket connection, walcast vs a bare aiohttp socket.

    .venv/bin/python -m bench.memory --sockets 10000

Each side is measured in a fresh process of its own (this module run with `--side`), so
neither reuses memory the other freed; the gateway runs in that process (`bench.wsload`), the
clients in another. For each side: warm up with 50 sockets, collect garbage, read the process's
RSS, open `sockets` connections (walcast: ticket checked,
attached to the organization's hub, `ready` sent; bare: an aiohttp `WebSocketResponse` kept in a
set), wait until every one is ready, collect garbage, read RSS again. The delta divided by the
number of sockets is the cost of one idle connection, kernel socket buffers not included (they
are not in RSS). Target: < 20 KiB per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
from typing import Any

from bench.common import add_common_args, emit, raise_nofile
from bench.wsload import HELLO_MARKER, READY_MARKER, ClientProcess, rss_bytes, start_server

TARGET_KIB = 20


async def measure_side(side: str, sockets: int) -> dict[str, Any]:
    server = await start_server()
    client = ClientProcess(server.port)
    marker = READY_MARKER if side == "walcast" else HELLO_MARKER

    def paths(count: int, prefix: str) -> list[str]:
        if side == "walcast":
            return server.walcast_paths(count, prefix=prefix)
        return server.bare_paths(count)

    try:
        # Warm up the code path so one-time imports and caches are not counted.
        await client.connect(paths(50, "warm"), marker)
        await client.close_sockets()
        todo = paths(sockets, "u")
        gc.collect()
        before = rss_bytes()
        await client.connect(todo, marker)
        del todo
        gc.collect()
        after = rss_bytes()
    finally:
        await client.quit()
        await server.close()
    return {
        f"{side}_rss_delta_mib": round((after - before) / 2**20, 1),
        f"{side}_kib_per_connection": round((after - before) / sockets / 1024, 2),
    }


def measure(sockets: int) -> dict[str, Any]:
    result: dict[str, Any] = {"sockets": sockets}
    for side in ("walcast", "bare"):
        answer = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--side", side, "--sockets", str(sockets)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        result.update(json.loads(answer.stdout))
    result["target_kib"] = TARGET_KIB
    result["target_met"] = result["walcast_kib_per_connection"] < TARGET_KIB
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--side", choices=["walcast", "bare"], help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    raise_nofile(1 << 20)
    if args.side:  # the child process measuring one side
        print(json.dumps(asyncio.run(measure_side(args.side, args.sockets))))
        return {}
    result = measure(args.sockets)
    emit(
        "memory",
        result,
        [
            f"Memory per idle connection at {args.sockets} connections (server RSS delta):",
            f"  walcast {result['walcast_kib_per_connection']:.1f} KiB/conn "
            f"({result['walcast_rss_delta_mib']} MiB), bare aiohttp "
            f"{result['bare_kib_per_connection']:.1f} KiB/conn; target < {TARGET_KIB} KiB: "
            f"{'met' if result['target_met'] else 'NOT met'}",
        ],
        json_only=args.json_only,
    )
    return result


if __name__ == "__main__":
    main()
