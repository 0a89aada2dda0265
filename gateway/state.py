"""What the handlers share, as typed aiohttp app keys (one `GatewayState` per app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from gateway.config import RealtimeConfig, Settings
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.sessions import SessionStore
from gateway.tickets import JtiStore

__all__ = ["STATE", "GatewayState"]


@dataclass
class GatewayState:
    settings: Settings
    config: RealtimeConfig
    metrics: Metrics
    registry: HubRegistry
    jti_store: JtiStore
    sessions: SessionStore | None = None
    pool: asyncpg.Pool | None = None
    #: Set once the node has caught up with the WAL: sockets may attach, /readyz says 200.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: Why the node is not ready, for /readyz.
    not_ready_reason: str = "starting"


STATE = web.AppKey("walcast_state", GatewayState)
