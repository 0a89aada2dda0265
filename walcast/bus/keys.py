"""The Redis bus's key names and entry ids, in one place: every process that shares a prefix
(readers, gateway nodes, the ticket store) must agree on them.

Keys (`prefix` defaults to ``walcast:``, env ``WALCAST_REDIS_PREFIX``)::

    {prefix}org:{organizationId}   stream: that organization's events
    {prefix}all                    stream: events for every organization (TRUNCATE)
    {prefix}control                stream: access revocations, read by every node
    {prefix}epoch                  stream: the history's epoch and the database it belongs to,
                                   one entry per epoch started (the last one is current)
    {prefix}floor                  cursor: where the history in Redis begins
    {prefix}position               cursor: everything below it has been published
    {prefix}wake:{node}            stream: wakes a node's blocking read (see `walcast.bus.feed`)
    {prefix}jti:{jti}              single-use ticket ids (`gateway.tickets.RedisJtiStore`)
    {prefix}started                when the history of single-use ticket ids began (seconds
                                   since the epoch): older tickets are refused

An entry's id is its cursor key, ``{commit_lsn}-{position}``, so stream order is cursor order.
``floor`` and ``position`` hold cursors without an epoch: they are only ever compared within
the current one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cdc.cursors import CursorKey

__all__ = ["BusKeys", "parse_stream_id", "prefix_from_env", "stream_id"]


def prefix_from_env(env: Mapping[str, str] | None = None) -> str:
    """The key prefix: ``WALCAST_REDIS_PREFIX`` or ``walcast:``."""
    env = os.environ if env is None else env
    return env.get("WALCAST_REDIS_PREFIX") or "walcast:"


@dataclass(frozen=True)
class BusKeys:
    prefix: str = "walcast:"

    def org(self, organization_id: str) -> str:
        return f"{self.prefix}org:{organization_id}"

    def wake(self, node: str) -> str:
        return f"{self.prefix}wake:{node}"

    @property
    def shared(self) -> str:
        return f"{self.prefix}all"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def floor(self) -> str:
        return f"{self.prefix}floor"

    @property
    def position(self) -> str:
        return f"{self.prefix}position"

    @property
    def jti(self) -> str:
        return f"{self.prefix}jti:"

    @property
    def started(self) -> str:
        return f"{self.prefix}started"


def stream_id(key: CursorKey) -> str:
    return f"{key[0]}-{key[1]}"


def parse_stream_id(text: bytes | str) -> CursorKey:
    raw = text.decode() if isinstance(text, bytes) else text
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)
