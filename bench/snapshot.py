"""Subscriptions: a 10,000-row snapshot, and fan-out with filters against the same sockets without.

    .venv/bin/python -m bench.snapshot [--rows 10000] [--sockets 1000] [--events 2000]

1. Snapshot: a real gateway (CDC pipeline + aiohttp) on a throwaway PostgreSQL, `--rows` rows in
   one organization; a client opens a socket with ``snapshot=true`` and the clock runs from the
   upgrade request to ``snapshot-complete`` (ticket excluded). Reported: seconds, rows/s, the
   number of snapshot frames (median of `--rounds`).
2. Fan-out with filters, in process: `--sockets` connections over three visibility classes, on
   transports that take every write and drop it (this measures the hub's grouping, masking and
   serialization, not the kernel; bench/fanout.py measures real sockets). The same sockets run
   once with no filter and once spread over ten ``amount=gt.N`` filters; `--events` UPDATEs
   move rows across the thresholds. Reported: deliveries/s for both, and serializations per
   event (``walcast_serializations_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tomllib
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from bench.common import add_common_args, database, emit, median
from gateway.config import parse_realtime_config
from gateway.events import ChangeEvent
from gateway.fanout import Connection, WriteScheduler
from gateway.history import MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.policy import PolicyCache
from gateway.subscriptions import ALL, compile_subscription, parse_subscription

CONFIG = """
[tables."public.orders"]
requiredRoles = ["a", "b", "c"]
[tables."public.orders".masking]
ssn = { type = "ssn", show = { roles = ["a"] } }
email = { type = "email", show = { roles = ["b"] } }
"""
SCHEMA = """
CREATE TABLE orders (id int PRIMARY KEY, "organizationId" text NOT NULL, amount numeric NOT NULL,
    status text NOT NULL, ssn text, email text, "placedAt" timestamptz NOT NULL DEFAULT now());
ALTER TABLE orders REPLICA IDENTITY FULL;
"""


async def snapshot_rounds(dsn: str, rows: int, rounds: int) -> list[dict[str, float]]:
    from tests.fix_gateway import running_gateway

    config = parse_realtime_config(tomllib.loads(CONFIG))
    results = []
    async with running_gateway(dsn, config=config, schema=SCHEMA, snapshot_max_rows=rows) as gw:
        gw.sql(
            'INSERT INTO orders (id, "organizationId", amount, status, ssn, email)'
            " SELECT i, 'org1', i % 100, 'open', '123-45-6789', 'paul@example.com'"
            f" FROM generate_series(1, {int(rows)}) AS i"
        )
        token = gw.add_member("bench", "org1", "b")
        for _ in range(rounds):
            ticket = await gw.ticket(token, "org1")
            params = {"ws_ticket": ticket, "organizationId": "org1", "snapshot": "true"}
            started = time.perf_counter()
            async with gw.http.ws_connect(
                f"{gw.url}/realtime/v1/websocket", params=params, max_msg_size=0
            ) as ws:
                got, frames = 0, 0
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        break
                    body = orjson.loads(message.data)
                    if body.get("type") == "snapshot":
                        got += len(body["rows"])
                        frames += 1
                    elif body.get("event") == "snapshot-complete":
                        break
                    elif body.get("event") == "error":
                        raise RuntimeError(body)
                elapsed = time.perf_counter() - started
            assert got == rows, (got, rows)
            results.append({"seconds": elapsed, "rows_per_s": rows / elapsed, "frames": frames})
    return results


class _Sink:
    """A transport that takes every write at once and keeps nothing."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


async def fanout_round(sockets: int, events: int, filtered: bool) -> dict[str, float]:
    config = parse_realtime_config(tomllib.loads(CONFIG))
    table = config.tables["public.orders"]
    history = MemoryHistory()
    history.complete_from = (0x10, 0)
    history.advance((0x10, 0))
    writes = WriteScheduler()
    metrics = Metrics()
    registry = HubRegistry(metrics, history, writes=writes)
    types = {"public.orders": {"amount": ("integer", "N")}}
    filters = [
        compile_subscription(
            parse_subscription(
                [],
                [f"orders:amount=gt.{threshold}"],
                [],
                config=config,
                roles=frozenset("a"),
                policies=PolicyCache(),
            ),
            types,
        )
        for threshold in range(0, 100, 10)
    ]
    for index in range(sockets):
        conn = Connection(
            None,  # type: ignore[arg-type]
            _Sink(),  # type: ignore[arg-type]
            user_id=f"u{index}",
            organization_id="org1",
            roles=frozenset({"abc"[index % 3]}),
            session_id=None,
            max_send_buffer=1 << 30,
            on_slow=lambda _conn: None,
            writes=writes,
            subscription=filters[(index // 3) % 10] if filtered else ALL,
        )
        await registry.attach(conn, None)
    writes.flush_now()
    when = datetime.now(UTC)
    base = {
        "id": 1,
        "organizationId": "org1",
        "status": "open",
        "ssn": "123-45-6789",
        "email": "paul@example.com",
    }
    prepared = [
        ChangeEvent(
            "org1",
            (0x20 + i, 1),
            "",
            when,
            table,
            "UPDATE",
            {**base, "amount": (i * 37) % 100},
            {**base, "amount": (i * 37 + 50) % 100},
            (),
            None,
            None,
            1000 + i,
        )
        for i in range(events)
    ]
    deliveries = metrics.deliveries.value
    serializations = metrics.serializations.value
    started = time.perf_counter()
    for i, event in enumerate(prepared, 1):
        registry.publish(event)
        if i % 16 == 0:
            writes.flush_now()
    writes.flush_now()
    elapsed = time.perf_counter() - started
    delivered = metrics.deliveries.value - deliveries
    return {
        "deliveries_per_s": delivered / elapsed,
        "deliveries_per_event": delivered / events,
        "serializations_per_event": (metrics.serializations.value - serializations) / events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    with database(args.dsn) as dsn:
        snaps = asyncio.run(snapshot_rounds(dsn, args.rows, args.rounds))
    plain = [
        asyncio.run(fanout_round(args.sockets, args.events, False)) for _ in range(args.rounds)
    ]
    filtered = [
        asyncio.run(fanout_round(args.sockets, args.events, True)) for _ in range(args.rounds)
    ]

    def mid(results: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in results])

    result = {
        "rows": args.rows,
        "snapshot_seconds": mid(snaps, "seconds"),
        "snapshot_rows_per_s": mid(snaps, "rows_per_s"),
        "snapshot_frames": mid(snaps, "frames"),
        "sockets": args.sockets,
        "events": args.events,
        "unfiltered_deliveries_per_s": mid(plain, "deliveries_per_s"),
        "filtered_deliveries_per_s": mid(filtered, "deliveries_per_s"),
        "unfiltered_serializations_per_event": mid(plain, "serializations_per_event"),
        "filtered_serializations_per_event": mid(filtered, "serializations_per_event"),
        "filtered_deliveries_per_event": mid(filtered, "deliveries_per_event"),
    }
    emit(
        "snapshot",
        result,
        [
            f"snapshot of {args.rows} rows: {result['snapshot_seconds'] * 1000:.0f} ms to"
            f" snapshot-complete, {result['snapshot_rows_per_s']:,.0f} rows/s,"
            f" {result['snapshot_frames']:.0f} frames",
            f"fan-out, {args.sockets} sockets, 3 classes: unfiltered"
            f" {result['unfiltered_deliveries_per_s']:,.0f} deliveries/s"
            f" ({result['unfiltered_serializations_per_event']:.1f} serializations/event);"
            f" 10 filters {result['filtered_deliveries_per_s']:,.0f} deliveries/s"
            f" ({result['filtered_serializations_per_event']:.1f} serializations/event,"
            f" {result['filtered_deliveries_per_event']:.0f} deliveries/event)",
        ],
        json_only=args.json_only,
    )


if __name__ == "__main__":
    main()
