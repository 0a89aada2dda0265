"""The cyclic collector as `walcast serve` sets it up (`walcast.serve.freeze_startup_objects`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from walcast.serve import freeze_startup_objects


@pytest.fixture
def frozen() -> Iterator[None]:
    try:
        freeze_startup_objects()
        yield
    finally:
        gc.unfreeze()


def test_start_up_objects_are_out_of_the_collectors_sight(frozen: None) -> None:
    assert gc.get_freeze_count() > 10_000  # this process's modules, test machinery and all
