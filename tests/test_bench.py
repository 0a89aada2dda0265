"""Smoke test: each benchmark module runs end to end with a trivially small N (not a benchmark:
the numbers are not checked, only that the harness works and reports what it should)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import (
    cdc_stages,
    cdc_throughput,
    fanout,
    history_gc,
    latency,
    masking,
    memory,
    redis_bus,
    redis_reader,
    send_cost,
    serve_cdc,
    serve_instructions,
    serve_stages,
    sustained,
)
from tests.pg import PostgresServer

pytestmark = pytest.mark.integration

assert cdc_stages.main and memory.main  # both import; they are run by hand (see docs)


def test_cdc_throughput_reads_every_change_on_both_sides(pg_server: PostgresServer) -> None:
    result = cdc_throughput.main(
        ["--rows", "600", "--batch", "200", "--runs", "1", "--dsn", pg_server.dsn, "--json-only"]
    )
    assert result["rows"] == 600
    assert result["walcast_changes_per_s"] > 0 and result["pg_recvlogical_changes_per_s"] > 0


def test_serve_stages_times_every_stage_of_the_captured_wal(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    frames = tmp_path / "frames.pickle"
    options = ["--rows", "400", "--batch", "100", "--repeat", "1", "--json-only"]
    result = serve_stages.main([*options, "--dsn", pg_server.dsn, "--frames", str(frames)])
    assert result["rows"] == 400 and frames.exists()
    assert set(result["us_per_change"]) == {"read", "route", "publish", "serve path"}
    again = serve_stages.main([*options, "--frames", str(frames), "--only", "route"])
    assert again["rows"] == 400 and list(again["us_per_change"]) == ["route"]


def test_history_gc_times_a_full_collection_three_ways() -> None:
    result = history_gc.main(["--events", "3000", "--orgs", "7", "--repeat", "1", "--json-only"])
    assert result["events"] == 3000 and result["bytes_per_event"] > 200
    for key in ("empty", "full", "full_plus_deque"):
        assert result[f"full_collection_ms_{key}"] >= 0


def test_send_cost_times_both_ways_of_writing() -> None:
    result = send_cost.main(["--sockets", "20", "--rounds", "5", "--repeats", "1", "--json-only"])
    for key in ("transport_300B_us", "send_300B_us", "transport_15KB_us", "send_15KB_us"):
        assert result[key] > 0, result
    assert result["pass_wall_ms_one_thread"] > 0 and result["pass_wall_ms_two_threads"] > 0
    assert result["raw_sends_that_would_block"] == 0, result  # every sample was a real send


@pytest.fixture
def bench_redis(redis_url: str) -> Iterator[None]:
    """A reachable Redis, and afterwards a check that the bench dropped every key it made."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"no Redis at {redis_url}: {exc}")
    before = set(client.scan_iter(match="walcast-bench:*"))
    yield
    assert set(client.scan_iter(match="walcast-bench:*")) == before  # every key dropped
    client.close()


def test_redis_bus_stores_every_event_three_ways(redis_url: str, bench_redis: None) -> None:
    args = ["--events", "300", "--transaction", "1", "7", "--rounds", "1", "--json-only"]
    result = redis_bus.main([*args, "--redis-url", redis_url])
    assert set(result["by_size"]) == {"1", "7"}
    for numbers in result["by_size"].values():
        assert all(rate > 0 for rate in numbers["events_per_s"].values()), numbers


def test_redis_reader_streams_every_change_both_ways(
    pg_server: PostgresServer, redis_url: str, bench_redis: None
) -> None:
    args = ["--rows", "400", "--transaction", "1", "50", "--rounds", "1", "--json-only"]
    result = redis_reader.main([*args, "--dsn", pg_server.dsn, "--redis-url", redis_url])
    for numbers in result["by_size"].values():
        assert all(rate > 0 for rate in numbers["changes_per_s"].values()), numbers


def test_fanout_and_masking_deliver_to_every_socket() -> None:
    results = fanout.main(
        ["--sockets", "12", "--deliveries", "60", "--rounds", "1", "--burst", "2", "--json-only"]
    )
    (only,) = results.values()
    assert only["all_complete"] and only["walcast_slow_consumers"] == 0
    counted = masking.main(["--sockets", "6", "--events", "3", "--json-only"])
    assert counted["target_met"]


def test_latency_samples_every_probe(pg_server: PostgresServer) -> None:
    result = latency.main(
        [
            "--subscribers",
            "6",
            "--probes",
            "3",
            "--rate",
            "40",
            "--seconds",
            "0.5",
            "--warmup",
            "0",
            "--dsn",
            pg_server.dsn,
            "--json-only",
        ]
    )
    assert result["all_received"], result
    assert result["samples"] >= 3 * 20, result
    bare = result["bare"]  # the same-run baseline: every socket got every event
    assert bare["all_received"], bare
    assert bare["samples"] >= 3 * 19, bare  # the first event may be cleared with the warm-up


def test_latency_over_several_organizations(pg_server: PostgresServer) -> None:
    args = ["--subscribers", "6", "--probes", "3", "--rate", "40", "--seconds", "0.5"]
    result = latency.main(
        [*args, "--warmup", "0", "--orgs", "3", "--dsn", pg_server.dsn, "--json-only"]
    )
    assert result["all_received"], result  # the end row of each organization reached its block
    assert "bare" not in result
    # 3 probes in 3 organizations, 20 changes round-robin over them plus one end row each:
    # each probe times its own organization's share, so 23 samples in all (none crossed over).
    assert 21 <= result["samples"] <= 23, result


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_serve_instructions_counts_the_serve_process_and_pg_recvlogical(
    pg_server: PostgresServer,
) -> None:
    result = serve_instructions.main(["--rows", "2000", "--dsn", pg_server.dsn, "--json-only"])
    assert result["trees"] == [str(Path(serve_instructions.__file__).resolve().parent.parent)]
    (per_change,) = result["serve_instructions_per_change"]
    # Start-up alone is billions; a change costs thousands, more than pg_recvlogical's.
    (start_up,) = result["start_up_instructions"]
    assert start_up > 10_000 * per_change > 0
    assert per_change > result["pg_recvlogical_instructions_per_change"] > 0


@pytest.mark.parametrize("kind", serve_cdc.KINDS)
def test_serve_cdc_times_the_serve_process_and_pg_recvlogical(
    pg_server: PostgresServer, kind: str
) -> None:
    args = ["--rows", "3000", "--batch", "500", "--runs", "1", "--orgs", "3", "--kind", kind]
    cpus = os.sched_getaffinity(0)
    pin = kind == "update" and len(cpus) > 1  # one of the two runs pinned, where it can be
    result = serve_cdc.main([*args, *(["--pin"] * pin), "--dsn", pg_server.dsn, "--json-only"])
    assert os.sched_getaffinity(0) == cpus  # this process runs where it did before
    assert (result["rows"], result["kind"], result["pinned"]) == (3000, kind, pin)
    assert result["walcast_changes_per_s"] > 0 and result["pg_recvlogical_changes_per_s"] > 0
    assert result["walcast_cpu_us_per_change"] > 0
    (healthz,) = result["healthz"]
    (metrics,) = result["metrics"]
    assert healthz["answers"] >= 1 and metrics["answers"] >= 2  # the window needs two scrapes
    (gc_seen,) = result["gc"]
    assert gc_seen["collections"] > 0  # the sitecustomize hook reached the serve process


def test_top_frames_ranks_own_and_cumulative_samples() -> None:
    lines = [
        "Pipeline.run (/x/walcast/pipeline.py:10);route (/x/walcast/routing.py:5) 3",
        "Pipeline.run (/x/walcast/pipeline.py:12);decode (/x/cdc/reader.py:7) 1",
        "select (/usr/lib/selectors.py:1) 4",
    ]
    top = serve_cdc.top_frames(lines)
    assert top["samples"] == 8
    assert top["own_percent"][0] == ("select (lib/selectors.py)", 50.0)
    assert top["own_percent"][1] == ("route (walcast/routing.py)", 37.5)
    assert ("Pipeline.run (walcast/pipeline.py)", 50.0) in top["cumulative_percent"]
    assert top["stages_percent"] == [
        ("(not in the pipeline)", 50.0),
        ("route (walcast/routing.py)", 37.5),
        ("decode (cdc/reader.py)", 12.5),
    ]


def test_sustained_delivers_pgbench_changes_masked_and_isolated(pg_server: PostgresServer) -> None:
    args = ["--tps", "50", "--seconds", "3", "--scale", "1", "--clients", "2", "--paired"]
    result = sustained.main([*args, "--dsn", pg_server.dsn, "--json-only"])
    received = result["received"]
    # TPC-B: four row changes per transaction, each to both subscribers of org_bench.
    assert received["owner"] == received["member"] == 4 * result["pgbench"]["transactions"]
    assert result["missing"] == {"owner": 0, "member": 0} and not result["closed_by_server"]
    assert result["isolated"] and result["masked_leaks"] == 0 and result["out_of_order"] == 0
    assert result["last_minute"]["samples"] == 2 * received["owner"]
    assert result["rss_mb"] and result["gc_last_minute"]["collections"] > 0
    # The baseline run: pg_recvlogical timed every commit of its own pgbench run.
    # --paired: each change the owner got was matched to pg_recvlogical's copy of its commit.
    assert result["added_by_walcast"]["samples"] == received["owner"]
    (baseline,) = result["baseline_runs"]
    assert baseline["missing"] == 0 and baseline["tps"] > 0 and baseline["p50_ms"] > 0


def test_gc_hook_times_collections_and_applies_the_threshold(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(serve_cdc.GC_HOOK)
    log = tmp_path / "gc.log"
    env = {
        "PYTHONPATH": str(tmp_path),
        "WALCAST_BENCH_GC_LOG": str(log),
        "WALCAST_BENCH_GC_THRESHOLD": "off",
    }
    probe = "import gc; gc.collect(); print(gc.isenabled())"
    answer = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "False"  # the collector is off, as asked
    (pause,) = serve_cdc.gc_pauses(log)  # only the explicit collection ran, and was timed
    assert pause.generation == 2 and pause.seconds > 0
