"""Denial-of-service limits: how fast one client may call an endpoint (the WebSocket upgrade,
ws-ticket, broadcast), and how many sockets one user, and one organization, may hold open at once.

Every limit is checked before the work it protects, and a refusal is an HTTP 429 (with
`Retry-After`), so a refused client never costs a database query, a socket, a hub slot or a
ticket: the ticket is claimed only after the connection slot is reserved, and a refused ticket
stays usable until it expires.

- `RateLimiter`: one token bucket per key: a client address (the TCP peer, never a header a
  client could forge) or a credential's digest: `rate` tokens per second, at most `burst` saved
  up. Memory is bounded: at most `max_keys` buckets, the least recently seen dropped first (a
  dropped key starts again with a full bucket, so the bound fails open, never closed, for real
  clients). `HandshakeRateLimiter` is the one on the upgrade.
- `ConnectionLimiter`: counts of open (or opening) sockets per (organization, user) and per
  organization. `reserve` counts the socket in before the handshake's first await, so concurrent
  handshakes cannot overshoot; `release` (in the handler's `finally`) counts it out.

A limit of 0 means "no limit". Pure: no I/O, the clock is a parameter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectionLimiter", "HandshakeRateLimiter", "LimitExceeded", "RateLimiter"]


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Why a handshake was refused, and when it is worth trying again."""

    reason: str
    retry_after: int


class RateLimiter:
    """A token bucket per key; `allow(key)` spends one token. `reason` is what a refusal says."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        reason: str = "too many requests from this address",
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 0 or max_keys <= 0:
            raise ValueError("rate and burst must be >= 0, max_keys > 0")
        self.reason = reason
        self.rate = rate
        self.burst = max(burst, 1) if rate else burst
        self._max_keys = max_keys
        self._clock = clock
        #: address -> (tokens, last refill time); insertion order is recency order.
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> LimitExceeded | None:
        """None if `key` may go ahead now, else how long it should wait."""
        if not self.rate:
            return None
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            refused = None
        else:
            self._buckets[key] = (tokens, now)
            refused = LimitExceeded(self.reason, _ceil((1.0 - tokens) / self.rate))
        while len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return refused


class HandshakeRateLimiter(RateLimiter):
    """The WebSocket upgrade's bucket per client address."""

    def __init__(self, rate: float, burst: int, **options: Any) -> None:
        options.setdefault("reason", "too many handshakes from this address")
        super().__init__(rate, burst, **options)


class ConnectionLimiter:
    """Open-socket counts per (organization, user) and per organization."""

    def __init__(self, per_user: int, per_org: int) -> None:
        if per_user < 0 or per_org < 0:
            raise ValueError("limits must be >= 0")
        self.per_user = per_user
        self.per_org = per_org
        self._users: dict[tuple[str, str], int] = {}
        self._orgs: dict[str, int] = {}

    def count(self, organization: str, user: str | None = None) -> int:
        if user is None:
            return self._orgs.get(organization, 0)
        return self._users.get((organization, user), 0)

    def reserve(self, organization: str, user: str) -> LimitExceeded | None:
        """Count one more socket in, or say which limit it would break (and count nothing)."""
        key = (organization, user)
        users = self._users.get(key, 0)
        orgs = self._orgs.get(organization, 0)
        if self.per_user and users >= self.per_user:
            return LimitExceeded("too many connections for this user in this organization", 5)
        if self.per_org and orgs >= self.per_org:
            return LimitExceeded("too many connections for this organization", 5)
        self._users[key] = users + 1
        self._orgs[organization] = orgs + 1
        return None

    def release(self, organization: str, user: str) -> None:
        key = (organization, user)
        users = self._users.get(key, 0) - 1
        if users > 0:
            self._users[key] = users
        else:
            self._users.pop(key, None)
        orgs = self._orgs.get(organization, 0) - 1
        if orgs > 0:
            self._orgs[organization] = orgs
        else:
            self._orgs.pop(organization, None)


def _ceil(seconds: float) -> int:
    whole = int(seconds)
    return whole + (whole < seconds) or 1
