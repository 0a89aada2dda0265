"""Prometheus metrics. One registry per app, so several apps can live in one process
(tests, and a reader + gateway in `walcast serve`). Hot paths increment by batch, once per event,
never once per socket.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ChangeTally", "Metrics", "Tally"]


class Tally(Collector):
    """A counter the hot path adds to as a plain int (``tally.value += n``), read only when
    scraped: a Prometheus `Counter.inc` checks its argument and takes a lock, once per event."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class ChangeTally(Collector):
    """`walcast_changes_total{table, kind}` as a plain dict the pipeline adds to per row, keyed
    by (schema, table, kind): no label look-up or lock per row, labels formatted when scraped."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.counts: dict[tuple[str, str, str], int] = {}
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=("table", "kind"))
        for (schema, table, kind), value in list(self.counts.items()):
            family.add_metric((f"{schema}.{table}", kind), value)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.changes = ChangeTally(
            "walcast_changes", "Row changes decoded from the WAL", registry=registry
        )
        self.broadcasts = Counter(
            "walcast_broadcasts", "Custom broadcasts decoded from the WAL", registry=registry
        )
        self.deliveries = Tally(
            "walcast_deliveries", "Frames written to sockets", registry=registry
        )
        self.serializations = Tally(
            "walcast_serializations",
            "Event serializations (one per visibility class per event)",
            registry=registry,
        )
        self.events = Tally(
            "walcast_events", "Events published to organization hubs", registry=registry
        )
        self.connections = Gauge(
            "walcast_connections", "Open WebSocket connections", registry=registry
        )
        self.slow_consumers = Counter(
            "walcast_slow_consumers", "Sockets closed for back-pressure", registry=registry
        )
        self.revocations = Counter(
            "walcast_revocations",
            "Sockets closed because access was revoked",
            ["reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "walcast_dropped_events",
            "Events dropped before delivery",
            ["reason"],
            registry=registry,
        )
        self.forged_messages = Counter(
            "walcast_forged_messages",
            "Broadcast messages in the WAL without a valid signature, dropped",
            registry=registry,
        )
        self.withheld_events = Counter(
            "walcast_withheld_events",
            "Row changes withheld because a column the realtime config names is gone",
            ["table"],
            registry=registry,
        )
        self.replication_lag = Gauge(
            "walcast_replication_lag_bytes",
            "Server WAL end minus the reader's received position",
            registry=registry,
        )
        self.retained_wal = Gauge(
            "walcast_slot_retained_wal_bytes",
            "WAL the slot keeps (pg_current_wal_lsn() - restart_lsn)",
            registry=registry,
        )
        self.history_events = Gauge(
            "walcast_history_events", "Events held in resume history", registry=registry
        )
        self.resyncs = Counter(
            "walcast_resyncs", "Resume requests answered with resync_required", registry=registry
        )
        self.accept_errors = Counter(
            "walcast_accept_errors",
            "Failed accept() calls: out of file descriptors or kernel memory",
            ["reason"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "walcast_connections_refused",
            "Connections refused or closed before their first request",
            ["reason"],
            registry=registry,
        )
        self.write_passes = Histogram(
            "walcast_write_pass_seconds",
            "Time of one write pass: everything queued, one write per socket (the latency floor)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )

        self.gc_pauses = Histogram(
            "walcast_gc_pause_seconds",
            "Python garbage-collection passes: how long each held the process, by generation",
            ["generation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )

    def watch_gc(self) -> Callable[[], None]:
        """Time every collection into `walcast_gc_pause_seconds` (`gc.callbacks`, for the whole
        process); returns what stops it. A pause here is a pause of the event loop."""
        children = [self.gc_pauses.labels(str(generation)) for generation in range(3)]
        clock = time.perf_counter
        started = 0.0

        def callback(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = clock()
            else:
                children[info["generation"]].observe(clock() - started)

        gc.callbacks.append(callback)
        return lambda: gc.callbacks.remove(callback)

    def render(self) -> bytes:
        return generate_latest(self.registry)
