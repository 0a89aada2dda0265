"""The cyclic collector as `walcast serve` sets it up (`walcast.serve.prepare_collector`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from walcast.serve import prepare_collector


@pytest.fixture
def collector() -> Iterator[list[int]]:
    """The generations collected while the test runs; the collector is restored afterwards."""
    threshold = gc.get_threshold()
    collected: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    try:
        prepare_collector()
        gc.callbacks.append(record)
        yield collected
    finally:
        if record in gc.callbacks:
            gc.callbacks.remove(record)
        gc.set_threshold(*threshold)
        gc.unfreeze()


def test_start_up_objects_are_out_of_the_collectors_sight(collector: list[int]) -> None:
    assert gc.get_freeze_count() > 10_000  # this process's modules, test machinery and all


def test_reader_batches_held_then_handled_set_off_no_collection(collector: list[int]) -> None:
    """A catch-up in miniature: each batch's rows live until the batch is handled. At Python's
    default threshold every batch of this size would set off young collections."""
    for _ in range(100):
        batch = [(i, {"id": i, "title": "row", "tags": ["a"]}) for i in range(1_000)]
        del batch
    assert collector == []


def test_real_growth_is_still_collected(collector: list[int]) -> None:
    kept = [[i] for i in range(30_000)]  # the process keeps what it makes: collections run
    assert 0 in collector
    assert len(kept) == 30_000
