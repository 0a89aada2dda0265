"""Latency: commit → client receive, p50/p95/p99, with the whole pipeline on a real PostgreSQL.

    .venv/bin/python -m bench.latency --subscribers 1000 --rate 1000 --seconds 10

A real walcast (CDC pipeline + gateway, `tests.fix_gateway.start_gateway`) runs in this process;
`subscribers` sockets of one organization (three visibility classes) are opened by a separate
client process; a writer process commits single-row INSERT transactions at `rate` per second
for `seconds`. Every `subscribers // probes`-th socket is a probe: it parses its frames and
records `receive time - commitTimestamp` for each event (`commitTimestamp` is the commit record's
time from the WAL; both clocks are this machine's). The others only drain their sockets. The
first `warmup` seconds are discarded. The writer's last row (one per organization) carries an
end marker: once every socket has it, everything has been delivered. Targets: p50 < 5 ms,
p99 < 50 ms.

`--orgs N` spreads the subscribers over N organizations (contiguous blocks) and the writer's
rows round-robin over them, so each change reaches `subscribers / N` sockets: a multi-tenant
deployment. With one organization every subscriber gets every change.

Baseline, in the same run (one organization only): a bare aiohttp server (`bench.wsload`'s
`/bare` route, no database, no walcast) with the same number of sockets, fed in process on the
same schedule, each event sent with `await ws.send_str` to every socket. Its `commitTimestamp`
is the time the event was due by the schedule, not when the loop got round to it: a loop that
falls behind shows it as latency, as walcast would (its writer commits on the same schedule).
Its latency is the floor for one Python process writing to that many sockets on this machine,
with the database, the WAL and walcast taken away. A baseline more than 5 s behind its schedule
stops there (`gave_up_behind_schedule_at_event`): it cannot carry the load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import tomllib
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from bench.common import add_common_args, database, emit, median, percentile, raise_nofile
from bench.wsload import CLASSES, READY_MARKER, ClientProcess, row, start_server
from gateway.config import parse_realtime_config
from gateway.state import STATE
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, start_gateway
from walcast.serve import freeze_startup_objects

ORG = "org_latency"
BARE_GIVE_UP_SECONDS = 5.0  #: the baseline stops once it is this far behind its schedule

CONFIG = """
historySeconds = 30
[tables."public.ticks"]
requiredRoles = ["owner", "admin", "member"]
[tables."public.ticks".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
email = { type = "email", show = { roles = ["owner", "admin"] } }
"""

SCHEMA = """
CREATE TABLE ticks (
    id bigserial PRIMARY KEY,
    "organizationId" text NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    customer text,
    ssn text,
    email text,
    note text
);
ALTER TABLE ticks REPLICA IDENTITY FULL;
"""

INSERT = (
    'INSERT INTO ticks ("organizationId", customer, ssn, email, note) VALUES (%s, %s, %s, %s, %s)'
)


def org_of(subscriber: int, subscribers: int, orgs: int) -> str:
    return f"{ORG}_{subscriber * orgs // subscribers}" if orgs > 1 else ORG


def write(dsn: str, rate: float, seconds: float, orgs: int) -> dict[str, Any]:
    """The writer process: single-row transactions on an absolute schedule, then the end rows."""
    names = [ORG] if orgs == 1 else [f"{ORG}_{k}" for k in range(orgs)]
    total = int(rate * seconds)
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for i in range(total):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn.execute(
                INSERT,
                (names[i % orgs], "Ada Lovelace", "123456789", "ada@example.com", "x" * 40),
                prepare=True,
            )
        elapsed = time.perf_counter() - started
        for name in names:
            conn.execute(INSERT, (name, None, None, None, "bench-end"))
    return {"written": total, "write_seconds": round(elapsed, 2)}


async def run(
    dsn: str,
    subscribers: int,
    rate: float,
    seconds: float,
    warmup: float,
    probes: int,
    orgs: int,
    coalesce_ms: float,
) -> dict[str, Any]:
    config = parse_realtime_config(tomllib.loads(CONFIG))
    gw, runner = await start_gateway(
        dsn,
        config=config,
        schema=SCHEMA,
        max_connections_per_org=0,
        max_connections_per_user=0,
        handshake_rate=0,
        handshake_burst=0,
        write_coalesce_ms=coalesce_ms,
    )
    port = int(gw.url.rsplit(":", 1)[1])
    client = ClientProcess(port)
    metrics = gw.app[STATE].metrics
    try:
        every = max(1, subscribers // probes)
        drains, probe_paths = [], []
        now = time.time()
        for i in range(subscribers):
            org = org_of(i, subscribers, orgs)
            ticket = mint_ticket(
                ACCESS_TOKEN,
                user_id=f"u{i}",
                organization_id=org,
                roles=CLASSES[i % len(CLASSES)],
                now=now,
            )
            path = f"/realtime/v1/websocket?ws_ticket={ticket}&organizationId={org}"
            (probe_paths if i % every == 0 else drains).append(path)
        await client.connect(drains, READY_MARKER)
        await client.connect(probe_paths, READY_MARKER, probe=True)
        freeze_startup_objects()  # as `walcast serve` does once it listens
        passes = metrics.write_passes.collect()[0]
        passes_before = _sample(passes, "_count"), _sample(passes, "_sum")
        deliveries = metrics.deliveries.value
        slow = metrics.slow_consumers._value.get()
        cpu = time.process_time()
        client_cpu = await client.cpu_seconds()
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.latency",
            "--writer",
            dsn,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--orgs",
            str(orgs),
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(warmup)  # pacing, not synchronization: the warm-up is discarded
        await client.latencies()
        written = json.loads((await writer.communicate())[0])
        ended, lost, complete, _ = await client.await_end()
        cpu = time.process_time() - cpu
        client_cpu = await client.cpu_seconds() - client_cpu
        latencies = sorted(v * 1000 for v in await client.latencies())
        delivered = metrics.deliveries.value - deliveries
        passes = metrics.write_passes.collect()[0]
        pass_count = _sample(passes, "_count") - passes_before[0]
        pass_seconds = _sample(passes, "_sum") - passes_before[1]
        slow = metrics.slow_consumers._value.get() - slow
    finally:
        gc.unfreeze()  # leave a calling process (the bench smoke test) as it was
        await client.quit()
        await gw.http.close()
        await runner.cleanup()
    return {
        **written,
        "achieved_rate": round(written["written"] / written["write_seconds"]),
        "probes": len(probe_paths),
        **_distribution(latencies),
        "deliveries": int(delivered),
        "write_passes": int(pass_count),
        "mean_write_pass_ms": round(pass_seconds / pass_count * 1000, 2) if pass_count else None,
        "server_cpu_seconds": round(cpu, 1),
        "client_cpu_seconds": round(client_cpu, 1),
        "slow_consumers_closed": int(slow),
        "all_received": complete and ended == subscribers and not lost,
    }


def _sample(metric: Any, suffix: str) -> float:
    return float(next(s.value for s in metric.samples if s.name.endswith(suffix)))


def _distribution(latencies: list[float]) -> dict[str, Any]:
    return {
        "samples": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p95_ms": round(percentile(latencies, 0.95), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "median_ms": round(median(latencies), 2),
    }


async def run_bare(
    subscribers: int, rate: float, seconds: float, warmup: float, probes: int
) -> dict[str, Any]:
    """The baseline: the same sockets and schedule, `await ws.send_str` to each, no walcast."""
    server = await start_server()
    client = ClientProcess(server.port)
    try:
        every = max(1, subscribers // probes)
        paths = server.bare_paths(subscribers)
        await client.connect([p for i, p in enumerate(paths) if i % every], b"hello")
        await client.connect(paths[::every], b"hello", probe=True)
        pairs = list(server.bare_classes.items())
        cpu = time.process_time()
        total = int(rate * seconds)
        behind_at = None
        started, wall_start = time.perf_counter(), time.time()
        for i in range(total):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > BARE_GIVE_UP_SECONDS:
                behind_at = i  # it cannot keep up: what it has shown is enough
                break
            when = datetime.fromtimestamp(wall_start + (due - started), UTC)
            stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            texts = [
                orjson.dumps(
                    {
                        "type": "postgres_changes",
                        "table": "ticks",
                        "schema": "public",
                        "eventType": "INSERT",
                        "new": row(i),
                        "old": None,
                        "id": f"{i:016X}-0001",
                        "commitTimestamp": stamp,
                    }
                ).decode()
                for _ in CLASSES
            ]
            for ws, cls in pairs:
                await ws.send_str(texts[cls])
            if i == int(rate * warmup):
                await client.latencies()  # the warm-up is discarded
        for ws, _ in pairs:
            await ws.send_str("bench-end")
        ended, lost, complete, _ = await client.await_end()
        cpu = time.process_time() - cpu
        latencies = sorted(v * 1000 for v in await client.latencies())
    finally:
        await client.quit()
        await server.close()
    return {
        **_distribution(latencies),
        "gave_up_behind_schedule_at_event": behind_at,
        "server_cpu_seconds": round(cpu, 1),
        "all_received": complete and ended == subscribers and not lost,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000, help="committed changes per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--probes", type=int, default=20, help="sockets that time every event")
    parser.add_argument("--orgs", type=int, default=1, help="organizations (subscriber blocks)")
    parser.add_argument(
        "--coalesce-ms", type=float, default=0.5, help="walcast's WALCAST_WRITE_COALESCE_MS"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the bare aiohttp baseline run"
    )
    parser.add_argument("--uvloop", action="store_true", help="run walcast on uvloop")
    parser.add_argument("--writer", metavar="DSN", help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.writer:  # the writer process
        print(json.dumps(write(args.writer, args.rate, args.seconds, args.orgs)))
        return {}
    raise_nofile(1 << 20)
    with database(args.dsn) as dsn:
        job = run(
            dsn,
            args.subscribers,
            args.rate,
            args.seconds,
            args.warmup,
            args.probes,
            args.orgs,
            args.coalesce_ms,
        )
        runner: Any = asyncio.run
        if args.uvloop:
            import uvloop

            runner = uvloop.run
        result = runner(job)
        if args.orgs == 1 and not args.no_baseline:
            result["bare"] = runner(
                run_bare(args.subscribers, args.rate, args.seconds, args.warmup, args.probes)
            )
    result.update(
        subscribers=args.subscribers,
        rate=args.rate,
        orgs=args.orgs,
        coalesce_ms=args.coalesce_ms,
        loop="uvloop" if args.uvloop else "asyncio",
    )
    met = result["p50_ms"] < 5 and result["p99_ms"] < 50
    result["target_met"] = met
    summary = [
        f"Latency commit -> receive, {args.subscribers} subscribers in {args.orgs} "
        f"organization(s), {args.rate:.0f} changes/s for {args.seconds:.0f} s "
        f"(achieved {result['achieved_rate']}/s), "
        f"{result['samples']} samples from {result['probes']} probes:",
        f"  walcast: p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
        f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms; "
        f"target p50 < 5, p99 < 50: {'met' if met else 'NOT met'}",
        f"  walcast's write passes: {result['write_passes']}, "
        f"mean {result['mean_write_pass_ms']} ms each; CPU seconds: walcast "
        f"{result['server_cpu_seconds']}, client process {result['client_cpu_seconds']}",
    ]
    bare = result.get("bare")
    if bare:
        summary.append(
            f"  bare send_str loop, same sockets and schedule, no database: p50 {bare['p50_ms']} "
            f"ms, p95 {bare['p95_ms']} ms, p99 {bare['p99_ms']} ms, max {bare['max_ms']} ms"
            + (
                f"; gave up {BARE_GIVE_UP_SECONDS:.0f} s behind schedule at event "
                f"{bare['gave_up_behind_schedule_at_event']}"
                if bare["gave_up_behind_schedule_at_event"] is not None
                else ""
            )
        )
    emit("latency", result, summary, json_only=args.json_only)
    return result


if __name__ == "__main__":
    main()
