"""Capped exponential back-off with full jitter: how every walcast component waits to retry.

"Full jitter" (a uniform draw between zero and the capped exponential) spreads the retries of
many clients or nodes that failed together, so a restarted server is not hit by all of them at
the same instant. One function, used by the replication reader, the Redis bus and the client.
"""

from __future__ import annotations

import random

__all__ = ["full_jitter"]


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (0-based): uniform in
    ``[0, min(cap, base * 2**attempt)]``."""
    return random.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 62)))
