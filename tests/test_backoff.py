"""The one back-off rule: capped exponential with full jitter."""

from __future__ import annotations

from cdc.backoff import full_jitter


def test_backoff_is_full_jitter_under_the_cap() -> None:
    delays = [full_jitter(attempt, 0.5, 4.0) for attempt in range(200) for _ in range(5)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert max(full_jitter(1, 0.5, 4.0) for _ in range(200)) <= 1.0
    assert max(delays) > 3.0  # the cap is reached, not just approached by the mean
    assert full_jitter(10_000, 0.5, 4.0) <= 4.0  # no overflow on huge attempt counts
