"""The root of walcast's errors, in one tree so callers can catch at the right depth.

Every error walcast raises on purpose is a `WalcastError`. This module (the bottom layer) holds
the root and the CDC layer's errors; each higher layer adds its branch next to its code::

    WalcastError                               cdc/errors.py
     ├── ProtocolError                         the replication stream or a pgoutput message is
     │    │                                    malformed (carries the LSN where known)
     │    └── UnknownRelationError             a row message names a relation OID never described
     ├── ReplicationError                      the server refused something (wal_level, slot
     │                                         busy, bad option)
     ├── ConfigError (also ValueError)         gateway/errors.py: invalid realtime config/settings
     │    └── MaskError                        a custom mask cannot be imported or called
     ├── GatewayError  .status                 gateway/errors.py: refused with an HTTP status
     │    ├── TicketError               401
     │    ├── JtiStoreUnavailableError  503
     │    ├── JtiStoreFullError         503
     │    └── SessionStoreError         503
     ├── UsageError                            walcast/serve.py: a mistake the user can fix;
     │                                         the CLI prints it and exits with status 2
     ├── EmbeddedUnavailable (also RuntimeError)  walcast/embedded.py: no PostgreSQL to embed
     └── RealtimeError                         walcast/client.py: the Python client's errors
          ├── AuthenticationError  .status     the session or organization was refused
          ├── BroadcastError  .status, .body   the broadcast API answered anything but 202
          └── UnreachableError                 walcast could not be reached at all

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
