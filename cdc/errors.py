"""The errors the CDC layer raises, in one tree so callers can catch at the right depth.

    WalcastError
     ├── ProtocolError          the replication stream or a pgoutput message is malformed
     │    └── UnknownRelationError   a row message names a relation OID never described
     └── ReplicationError       the server refused something (wal_level, slot busy, bad option)

Sans-IO modules raise `ProtocolError` with the LSN of the offending message where known; the
transport translates server errors into `ReplicationError` once, at the boundary.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "ReplicationError", "UnknownRelationError", "WalcastError"]


class WalcastError(Exception):
    """Base class of every error walcast raises on purpose."""


class ProtocolError(WalcastError):
    """Malformed input from the replication stream.

    Args:
        message: what is wrong, in words a maintainer can act on.
        lsn: the WAL position of the message being decoded, when known.
    """

    def __init__(self, message: str, *, lsn: int | None = None) -> None:
        super().__init__(message if lsn is None else f"{message} (at LSN {lsn:X})")
        self.lsn = lsn


class UnknownRelationError(ProtocolError):
    """A row message refers to a relation OID that no Relation message has described."""


class ReplicationError(WalcastError):
    """The server refused a replication request, or is not set up for logical replication."""
