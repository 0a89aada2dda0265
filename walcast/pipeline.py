"""The CDC pipeline: replication reader → router → sink (the hubs, or the Redis bus).

Start-up, in order: check and set up the database (`cdc.setup`: wal_level, privileges, the
tables and the columns the config names, replica identity, the publication kept in step with the
config, the slot, re-created if PostgreSQL invalidated it); identify the database
(`cdc.identity`: the history epoch every cursor carries); note the slot's confirmed position
(history is complete from there); write a sync marker into the WAL; then stream. When
the reader hands the marker back, everything committed before start-up has been re-read into
history, so the node is ready: sockets may attach and resume.

The stream is handled a reader batch at a time (what one read took), each row routed and
published on its own without an await (a run of row changes in one call, `publish_changes`),
and the loop gets a turn once `YIELD_SECONDS` of that work have passed, checked after every
item or run (a run is at most a batch): a large transaction or a catch-up after downtime
takes as long as its rows take, while write passes, heartbeats, `/healthz` and socket reads
keep going.
Events stay in commit order, so an event committed after a large transaction reaches its
sockets only once that transaction has been handled.

What the slot may forget is decided by `RetentionWindow`: the WAL position the node had reached
`historySeconds` (and `HISTORY_TRIM_SLACK`) ago. That is at or before the oldest transaction
still in any history, so a node killed at any moment re-reads, on restart, every event a client
might still resume from.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg

from cdc import catalog, setup
from cdc.changes import LogicalMessage, RowChange, TransactionEnd
from cdc.cursors import NO_EPOCH
from cdc.identity import Identity, identify
from cdc.reader import ReplicationReader
from cdc.setup import Requirements
from gateway.broadcasts import BroadcastSigner
from gateway.config import RealtimeConfig, Settings
from gateway.events import AccessRevoked, BroadcastEvent, RoutedEvent
from gateway.metrics import Metrics
from walcast.routing import Router

__all__ = [
    "SYNC_PREFIX",
    "TICK_SECONDS",
    "DropSink",
    "EventSink",
    "Pipeline",
    "RetentionWindow",
    "config_columns",
    "setup_requirements",
]

log = logging.getLogger(__name__)

YIELD_SECONDS = 0.005
"""Longest stretch of pipeline work between two turns of the event loop."""

SAMPLE_SECONDS = 0.1
"""The retention window's resolution: at most one sample of the position reached this often."""

TICK_SECONDS = 1.0
"""How often `walcast.app` runs the periodic upkeep: `Pipeline.tick` and the history's trim."""

HISTORY_TRIM_SLACK = 2 * TICK_SECONDS
"""Seconds an event may outlive `historySeconds` in history, which drops expired events once a
tick: the slot keeps this much more (a tick, and one more for a late one)."""

#: `walcast_changes_total` counts a change under `change[2:5]`: one slice of the tuple.
assert RowChange._fields[2:5] == ("schema", "table", "kind"), "counted by relation and kind"


def publish_changes_py(
    items: list[Any],
    start: int,
    row_change: type[RowChange],
    counts: dict[tuple[str, str, str], int],
    route_change: Callable[[Any], Sequence[RoutedEvent | AccessRevoked]],
    publish: Callable[[Sequence[RoutedEvent | AccessRevoked]], None],
) -> int:
    """The pipeline's loop over a run of row changes: from `items[start]` on, while an item
    is a `row_change`, count it (`walcast_changes_total`), route it and publish its events;
    returns the index of the first item not taken. `walcast._speedups.publish_changes` is the
    same loop in C, one call per run instead of a turn of this loop per change."""
    i = start
    while i < len(items):
        item = items[i]
        if type(item) is not row_change:
            break
        relation = item[2:5]  # (schema, table, kind), in one step
        counts[relation] = counts.get(relation, 0) + 1
        events = route_change(item)
        if events:
            publish(events)
        i += 1
    return i


publish_changes: Callable[..., int]
try:
    from walcast._speedups import publish_changes
except ImportError:  # built without a C compiler
    publish_changes = publish_changes_py

SYNC_PREFIX = "walcast-sync"
"""Prefix of the marker message a starting pipeline writes to know when it has caught up."""


def config_columns(config: RealtimeConfig) -> dict[str, dict[str, tuple[str, ...]]]:
    """Per configured table, each config key that names columns → the columns it names."""
    return {name: table.named_columns() for name, table in config.tables.items()}


def setup_requirements(
    settings: Settings, config: RealtimeConfig, *, exclusive: bool = False
) -> Requirements:
    """What `cdc.setup` checks and ensures for this config (`exclusive`: single-node serve)."""
    return Requirements(
        slot=settings.slot,
        publication=settings.publication,
        tables=tuple(config.tables),
        columns=config_columns(config),
        replica_identity="manage" if config.manageReplicaIdentity else "check",
        exclusive=exclusive,
    )


class EventSink(Protocol):
    """Where routed events go: the local hubs, or the Redis bus."""

    def publish(self, events: Sequence[RoutedEvent | AccessRevoked]) -> None:
        """Take the events of one reader item (synchronous: called once per item)."""

    async def wait_for_room(self) -> None:
        """Return once the sink can take more (called between the reader's batches)."""

    def mark_position(self, commit_lsn: int) -> None:
        """Every event up to this commit has been published."""


class DropSink:
    """An `EventSink` that keeps nothing: for setting up without streaming, and benchmarks."""

    def publish(self, events: Sequence[RoutedEvent | AccessRevoked]) -> None:
        return None

    async def wait_for_room(self) -> None:
        return None

    def mark_position(self, commit_lsn: int) -> None:
        return None


class RetentionWindow:
    """Samples of (time, WAL position reached); answers what the slot must still keep.

    At most one sample per `SAMPLE_SECONDS`: a live stream reaches a new position with nearly
    every transaction, and a sample each would keep `seconds` x the rate of them (up to 120,000
    tuples at 1,000 transactions/s and 120 s), each one counted by the collector as the
    process growing. A position reached within `SAMPLE_SECONDS` of the last sample is left
    out; a later record takes it (the pipeline's tick and the Redis sink's upkeep record one
    every second). So the answer is a position reached a little before `seconds` ago, at most
    `SAMPLE_SECONDS` plus the time to the next record: never more than was reached then, which
    would let the slot forget WAL a resume still needs.
    """

    def __init__(self, seconds: float, start_lsn: int, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), start_lsn)])

    def __len__(self) -> int:
        """Samples kept: at most about `seconds / SAMPLE_SECONDS`."""
        return len(self._samples)

    def record(self, lsn: int) -> None:
        last_at, last_lsn = self._samples[-1]
        if lsn > last_lsn:
            now = self._clock()
            if now - last_at >= SAMPLE_SECONDS:
                self._samples.append((now, lsn))

    def retained(self) -> int:
        """The position reached `seconds` ago (or the oldest known, if younger)."""
        cutoff = self._clock() - self.seconds
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= cutoff:
            samples.popleft()
        return samples[0][1]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        config: RealtimeConfig,
        sink: EventSink,
        metrics: Metrics,
        *,
        on_ready: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.database_url is not None
        self._dsn = settings.database_url
        self._settings = settings
        self._config = config
        self._sink = sink
        self._metrics = metrics
        self._on_ready = on_ready
        self._clock = clock
        self.router = Router(config, BroadcastSigner(settings.access_tokens), metrics)
        self.reader: ReplicationReader | None = None
        self.retention: RetentionWindow | None = None
        #: The tables the publication covers, once `prepare()` has run.
        self.tables: tuple[str, ...] = ()
        #: The database and slot streamed from, once `prepare()` has run.
        self.identity: Identity | None = None
        #: The server's WAL position when `prepare()` identified it.
        self.wal_end = 0
        #: The history epoch the cursors carry: the identity's, unless the caller (the Redis
        #: bus, which keeps its history across restarts) sets another before `run()`.
        self.epoch = NO_EPOCH

    async def prepare(self, *, exclusive: bool = False) -> int:
        """Check and set up the database; returns the slot's confirmed position.

        `exclusive`: fail when another process streams from the slot (single-node `serve`;
        on the Redis bus a standby waits for the reader lock instead).

        Raises:
            SetupError: what is missing, with the statement to run.
        """
        requirements = setup_requirements(self._settings, self._config, exclusive=exclusive)
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            report = await setup.ensure(conn, requirements)
        self.tables = tuple(report.watched)
        self.identity, self.wal_end = await identify(self._dsn, self._settings.slot)
        self.epoch = self.identity.epoch()
        return report.slot.confirmed_flush_lsn or 0 if report.slot else 0

    async def run(self, start_lsn: int | None = None) -> None:
        """Stream until cancelled; `start_lsn` is `prepare()`'s answer when the caller ran it."""
        if start_lsn is None:
            start_lsn = await self.prepare()
        # Logged here, not in prepare(): `walcast serve` also prepares once before it opens
        # its port, to fail fast, and the set-up is one event to the reader of the log.
        log.info(
            "replication set up: slot=%s publication=%s tables=%s epoch=%s",
            self._settings.slot,
            self._settings.publication,
            ",".join(self.tables) or "(none)",
            self.epoch,
        )
        self.router.epoch = self.epoch
        self.retention = retention = RetentionWindow(
            self._config.historySeconds + HISTORY_TRIM_SLACK, start_lsn, self._clock
        )
        marker = uuid.uuid4().hex
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)", (SYNC_PREFIX, marker)
            )
        self.reader = reader = ReplicationReader(
            self._dsn,
            slot=self._settings.slot,
            publication=self._settings.publication,
            read_ahead_bytes=self._settings.read_ahead_bytes,
        )
        reader.retain_from(start_lsn)
        route, route_change = self.router.route, self.router.route_change
        sink, metrics = self._sink, self._metrics
        publish, mark_position = sink.publish, sink.mark_position
        count = metrics.changes.counts  #: walcast_changes_total, a plain dict
        timer = time.perf_counter
        turn_ends = timer() + YIELD_SECONDS
        ended = 0  #: the end of the last transaction handled, for the retention window

        def bookkeeping() -> None:
            """Per batch rather than per transaction: what the slot may forget."""
            if ended:
                retention.record(ended)
                reader.retain_from(retention.retained())

        try:
            async for batch in reader.batches():
                i, size = 0, len(batch)
                while i < size:
                    item = batch[i]
                    if type(item) is RowChange:  # a run of them, counted, routed, published
                        i = publish_changes(batch, i, RowChange, count, route_change, publish)
                    else:
                        i += 1
                        if type(item) is TransactionEnd:
                            ended = item.end_lsn
                            mark_position(ended)
                        elif type(item) is LogicalMessage:
                            self._message(item, marker, start_lsn)
                        else:
                            route(item)
                    if timer() >= turn_ends:
                        # Neither the reader (data keeps arriving) nor the local sink need
                        # await anything, so without this a catch-up or a large transaction
                        # would hold the event loop: no write pass, no /healthz, no heartbeat.
                        # A run of row changes is at most a batch's (`DECODE_SLICE` messages).
                        bookkeeping()
                        await asyncio.sleep(0)
                        turn_ends = timer() + YIELD_SECONDS
                bookkeeping()
                await sink.wait_for_room()
        finally:
            await reader.aclose()

    def _message(self, item: LogicalMessage, marker: str, start_lsn: int) -> None:
        """A logical message: a broadcast to route, or this pipeline's sync marker (caught up)."""
        if item.prefix != SYNC_PREFIX:
            events = self.router.route(item)
            if events:
                broadcasts = sum(isinstance(e, BroadcastEvent) for e in events)
                self._metrics.broadcasts.inc(broadcasts)
                self._sink.publish(events)
        elif item.content.decode(errors="replace") == marker:
            log.info("caught up with the WAL at %X", item.commit_lsn)
            # Before ready: a socket attaching before the marker's commit arrives must get a
            # `ready` cursor it can resume from.
            self._sink.mark_position(item.commit_lsn)
            self._on_ready(start_lsn)

    def tick(self) -> None:
        """Periodic upkeep: let the slot and the ready cursor follow an idle database."""
        reader, retention = self.reader, self.retention
        if reader is None or retention is None or not reader.handled_lsn:
            return
        retention.record(reader.handled_lsn)
        reader.retain_from(retention.retained())
        self._sink.mark_position(reader.handled_lsn)
        if reader.server_wal_end and reader.received_lsn:
            self._metrics.replication_lag.set(max(0, reader.server_wal_end - reader.received_lsn))

    async def refresh_slot_metrics(self) -> None:
        """`walcast_slot_retained_wal_bytes`: what the slot makes the server keep."""
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            status = await catalog.slot_status(conn, self._settings.slot)
        if status is not None and status.retained_wal_bytes is not None:
            self._metrics.retained_wal.set(status.retained_wal_bytes)
