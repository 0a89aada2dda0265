"""Whether this node may take sockets, and if not, why: one object that /readyz and the
WebSocket upgrade read, and that each part of the node reports its own condition to.

A node is ready when none of its conditions fails. Each part owns one condition: the CDC
pipeline (or the reader role) says whether replication streams and has caught up, the Redis
feed whether Redis answers, shutdown that the node is going away. A condition starts failing
("starting", "connecting to Redis") when its part exists, so a node is never ready before the
parts it has are.
"""

from __future__ import annotations

import asyncio
from enum import Enum

__all__ = ["Condition", "Readiness"]


class Condition(Enum):
    """What a node needs before it takes sockets; the first failing one names the reason."""

    #: The node is shutting down (SIGTERM): it takes no new sockets.
    SHUTDOWN = "shutdown"
    #: The CDC pipeline (or, on a reader, the reader role) streams and has caught up.
    REPLICATION = "replication"
    #: The node's feed reaches Redis (Redis bus only).
    REDIS = "redis"


class Readiness:
    """Named conditions, each met or failing with a reason; ready when none fails."""

    def __init__(self, failing: dict[Condition, str] | None = None) -> None:
        """`failing`: the conditions this node has, with the reason they fail at start."""
        self._failing: dict[Condition, str] = dict(failing or {})
        self._ready = asyncio.Event()
        if not self._failing:
            self._ready.set()

    def fail(self, condition: Condition, reason: str) -> None:
        self._failing[condition] = reason
        self._ready.clear()

    def clear(self, condition: Condition) -> None:
        """`condition` is met now."""
        self._failing.pop(condition, None)
        if not self._failing:
            self._ready.set()

    def report(self, condition: Condition, ok: bool, reason: str = "") -> None:
        """`clear` when `ok`, else `fail` with `reason`: for parts that report both ways."""
        if ok:
            self.clear(condition)
        else:
            self.fail(condition, reason)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def reason(self) -> str:
        """Why the node is not ready ('' when it is): the first failing condition's reason."""
        for condition in Condition:
            reason = self._failing.get(condition)
            if reason is not None:
                return reason
        return ""

    async def wait(self) -> None:
        """Return once the node is ready."""
        await self._ready.wait()
