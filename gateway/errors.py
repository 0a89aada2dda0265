"""The gateway's errors: its branch of the one tree rooted at `cdc.errors.WalcastError`.

    WalcastError
     ├── ConfigError  (also a ValueError)   the realtime config or the settings are invalid
     │    └── MaskError                     a custom mask's `fn` cannot be imported or called
     └── GatewayError  .status, .reason     refused with an HTTP status
          ├── TicketError               401  missing, malformed, forged, expired or reused ticket
          ├── JtiStoreUnavailableError  503  the shared jti store (Redis) cannot be reached
          ├── JtiStoreFullError         503  the in-memory jti store is full of live tickets
          └── SessionStoreError         503  the session store cannot answer (JWKS unreachable)

Every check that can fail happens before the WebSocket upgrade, so each `GatewayError` carries
the HTTP status the client is answered with. A socket that is already open is never closed by
raising: it is closed with a `gateway.protocol.CloseCode`.

`ConfigError` stays a `ValueError` so that callers written as `except ValueError` (and pydantic
validators, which turn a `ValueError` into a validation message) keep working.
"""

from __future__ import annotations

from cdc.errors import WalcastError

__all__ = [
    "ConfigError",
    "GatewayError",
    "JtiStoreFullError",
    "JtiStoreUnavailableError",
    "MaskError",
    "SessionStoreError",
    "StaleTicketError",
    "TicketError",
]


class ConfigError(WalcastError, ValueError):
    """The realtime config or the settings are invalid; the message says where and why."""


class MaskError(ConfigError):
    """A custom mask's `fn` cannot be imported or is not callable."""


class GatewayError(WalcastError):
    """An error the gateway answers with an HTTP status.

    Args:
        reason: short, fixed text safe to send to the client: never a token, secret or value.
    """

    status: int = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TicketError(GatewayError):
    """The ticket is missing, malformed, forged, expired, for another audience, or reused."""

    status = 401


class StaleTicketError(TicketError):
    """The ticket was issued before what this server remembers began: it may have been used,
    or its roles revoked, without the server knowing. The client should fetch a new ticket."""

    def __init__(self, since: str = "this server started") -> None:
        super().__init__(f"ticket issued before {since}: fetch a new ticket")


class JtiStoreUnavailableError(GatewayError):
    """The shared jti store (Redis) cannot be reached: refuse rather than risk a replay."""

    status = 503


class JtiStoreFullError(GatewayError):
    """The in-memory jti store holds its maximum of unexpired tickets; refuse rather than forget."""

    status = 503


class SessionStoreError(GatewayError):
    """The session store cannot answer right now (e.g. the JWKS URL is unreachable)."""

    status = 503
