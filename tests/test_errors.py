"""One error tree: everything walcast raises on purpose is a `WalcastError`, caught at any depth."""

from __future__ import annotations

import pytest

from cdc.errors import ProtocolError, ReplicationError, UnknownRelationError, WalcastError
from gateway.config import ConfigError, Settings, parse_realtime_config
from gateway.errors import (
    GatewayError,
    JtiStoreFullError,
    JtiStoreUnavailableError,
    MaskError,
    SessionStoreError,
    TicketError,
)
from walcast.client import AuthenticationError, BroadcastError, RealtimeError, UnreachableError
from walcast.embedded import EmbeddedUnavailable
from walcast.serve import UsageError

#: (error, its parent in the tree)
TREE = [
    (ProtocolError, WalcastError),
    (UnknownRelationError, ProtocolError),
    (ReplicationError, WalcastError),
    (ConfigError, WalcastError),
    (MaskError, ConfigError),
    (GatewayError, WalcastError),
    (TicketError, GatewayError),
    (JtiStoreUnavailableError, GatewayError),
    (JtiStoreFullError, GatewayError),
    (SessionStoreError, GatewayError),
    (UsageError, WalcastError),
    (EmbeddedUnavailable, WalcastError),
    (RealtimeError, WalcastError),
    (AuthenticationError, RealtimeError),
    (BroadcastError, RealtimeError),
    (UnreachableError, RealtimeError),
]


@pytest.mark.parametrize(("error", "parent"), TREE, ids=[e.__name__ for e, _ in TREE])
def test_every_error_hangs_from_walcast_error(
    error: type[Exception], parent: type[Exception]
) -> None:
    assert error.__bases__[0] is parent


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TicketError, 401),
        (JtiStoreUnavailableError, 503),
        (JtiStoreFullError, 503),
        (SessionStoreError, 503),
    ],
)
def test_gateway_errors_carry_their_http_status(error: type[GatewayError], status: int) -> None:
    raised = error("refused")
    assert (raised.status, raised.reason, str(raised)) == (status, "refused", "refused")


def test_config_errors_are_still_value_errors() -> None:
    """Callers written as `except ValueError` keep catching a bad config or bad settings."""
    with pytest.raises(ValueError, match="requiredRole"):
        parse_realtime_config({"tables": {"public.a": {"requiredRole": ["x"]}}}, "realtime.toml")
    with pytest.raises(ValueError, match="invalid settings: port"):
        Settings.from_env({"WALCAST_PORT": "not-a-port"})
    with pytest.raises(WalcastError):
        Settings.from_env({"WALCAST_PORT": "not-a-port"})


def test_embedded_unavailable_is_still_a_runtime_error() -> None:
    assert issubclass(EmbeddedUnavailable, RuntimeError)
