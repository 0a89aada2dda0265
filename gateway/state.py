"""What the handlers share, as typed aiohttp app keys (one `GatewayState` per app).

Built complete by the app's assembler (`walcast.app`): the registry with its history, the
ticket store and the readiness conditions are chosen there, for the event source the node
has. Only what needs a running loop to open (the database pool, and the session store that
reads through it) is set by a cleanup context at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from gateway.config import RealtimeConfig, Settings
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics
from gateway.readiness import Readiness
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
    #: Whether sockets may attach and /readyz says 200, and if not, why.
    readiness: Readiness
    sessions: SessionStore | None = None
    pool: asyncpg.Pool | None = None


STATE = web.AppKey("walcast_state", GatewayState)
