"""GET /realtime/v1/websocket: authenticate the ticket, then attach the socket to its org's hub.

Every check happens before the upgrade, so a browser sees a failed handshake with the HTTP
status (401 bad ticket, 403 wrong organization) rather than an open socket that closes.

A node that is not ready (starting, catching up, Redis unreachable) answers 503 with
`Retry-After` before it looks at the ticket: until it has rebuilt its view of revocations it
cannot tell a stale ticket from a good one, and the ticket is not used up. Tickets issued
before the node's view of revocations began, or before its single-use store started, get 401
and the client fetches a new one. The revocation check runs again just before the socket
joins its hub, with no await in between, so an access change handled during the handshake
closes the socket (4403) before any event reaches it.

`tables=`, `filter=` and `snapshot=` (gateway.subscriptions) are checked before the upgrade
too: 400 for a malformed or unknown one, 403 for a table or column the caller's roles may not
see. Filtered columns' types are looked up in the catalog (503 if the database cannot answer).
A snapshot (gateway.snapshot) runs after ``ready``, beside the read loop.

After the upgrade the socket is only read for `ping` (answered `pong`); anything else gets an
error frame. Heartbeats are aiohttp's: a ping every `heartbeat_seconds`, and a peer that does
not answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
from aiohttp import WSMsgType, web

from gateway.config import Settings
from gateway.fanout import Connection
from gateway.http import error_response, too_many_requests
from gateway.limits import ConnectionLimiter, HandshakeRateLimiter
from gateway.protocol import CloseCode, error_frame, revoked_frame, text_frame
from gateway.readiness import Readiness
from gateway.snapshot import Snapshots, column_types
from gateway.state import STATE, GatewayState
from gateway.subscriptions import (
    ALL,
    Subscription,
    SubscriptionError,
    SubscriptionRequest,
    compile_subscription,
    parse_subscription,
)
from gateway.tickets import (
    JtiStoreFullError,
    JtiStoreUnavailableError,
    TicketClaims,
    TicketError,
    verify_ticket,
)

__all__ = ["LIMITS", "UpgradeLimits", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_CLIENT_FRAME = 64 * 1024
NOT_READY_RETRY_SECONDS = 1  #: `Retry-After` of the 503 a node that is not ready answers
_PONG = text_frame(b"pong")
_UNSUPPORTED = error_frame("unsupported message: only the text 'ping' is understood")


class UpgradeLimits:
    """The handshake rate limiter and connection counts of one app (see gateway.limits), and
    its snapshot slots (gateway.snapshot)."""

    def __init__(self, settings: Settings) -> None:
        self.handshakes = HandshakeRateLimiter(settings.handshake_rate, settings.handshake_burst)
        self.connections = ConnectionLimiter(
            settings.max_connections_per_user, settings.max_connections_per_org
        )
        self.snapshots = Snapshots(
            max_rows=settings.snapshot_max_rows, concurrency=settings.max_snapshots
        )


LIMITS = web.AppKey("walcast_upgrade_limits", UpgradeLimits)


def _not_ready(readiness: Readiness) -> web.Response:
    response = error_response(503, "not ready", readiness.reason or "not ready")
    response.headers["Retry-After"] = str(NOT_READY_RETRY_SECONDS)
    return response


@routes.get("/realtime/v1/websocket")
async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    limits = request.app[LIMITS]
    refused = limits.handshakes.allow(request.remote or "")
    if refused is not None:
        return too_many_requests(refused)
    if not state.readiness.ready:
        return _not_ready(state.readiness)
    query = request.query
    tickets = query.getall("ws_ticket", [])
    if len(tickets) != 1 or not tickets[0]:
        return error_response(401, "unauthorized", "exactly one ws_ticket is required")
    try:
        claims = verify_ticket(tickets[0], state.settings.access_tokens, now=time.time())
        state.registry.check_ticket(claims)
    except TicketError as exc:
        return error_response(401, "unauthorized", exc.reason)
    organizations = query.getall("organizationId", [])
    if len(organizations) > 1 or (organizations and organizations[0] != claims.organization_id):
        return error_response(403, "forbidden", "organizationId does not match the ticket")
    since_values = query.getall("since", [])
    if len(since_values) > 1:
        return error_response(400, "invalid request", "since may be given once")
    since = since_values[0] if since_values else None
    try:
        asked = parse_subscription(
            query.getall("tables", []),
            query.getall("filter", []),
            query.getall("snapshot", []),
            config=state.config,
            roles=claims.roles,
            policies=state.registry.policies,
        )
        subscription = await _compile(state, asked)
    except SubscriptionError as exc:
        detail = exc.message
        return error_response(
            exc.status, "forbidden" if exc.status == 403 else "invalid request", detail
        )
    except _Unavailable as exc:
        return error_response(503, "unavailable", str(exc))
    ws = web.WebSocketResponse(
        heartbeat=state.settings.heartbeat_seconds,
        compress=False,
        max_msg_size=MAX_CLIENT_FRAME,
    )
    if not ws.can_prepare(request).ok:
        return error_response(400, "not a WebSocket request", "expected an Upgrade: websocket")
    refused = limits.connections.reserve(claims.organization_id, claims.user_id)
    if refused is not None:
        return too_many_requests(refused)
    try:
        return await _open(request, claims, since, ws, subscription, asked.snapshot)
    finally:
        limits.connections.release(claims.organization_id, claims.user_id)


class _Unavailable(Exception):
    """What a subscription needs from the database cannot be had now (503)."""


async def _compile(state: GatewayState, asked: SubscriptionRequest) -> Subscription:
    if asked.default:
        return ALL
    if state.pool is None and (asked.filters or asked.snapshot):
        raise _Unavailable("filters and snapshots need the database, and this node has none")
    wanted = asked.columns_to_type()
    types = {}
    if wanted:
        assert state.pool is not None
        try:
            types = await column_types(state.pool, wanted)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("could not read column types: %s", type(exc).__name__)
            raise _Unavailable("the database cannot be reached, try again") from None
    return compile_subscription(asked, types)


async def _open(
    request: web.Request,
    claims: TicketClaims,
    since: str | None,
    ws: web.WebSocketResponse,
    subscription: Subscription,
    snapshot: bool,
) -> web.StreamResponse:
    state = request.app[STATE]
    registry = state.registry
    try:
        claimed = await state.jti_store.claim(claims.jti, claims.expires_at, claims.issued_at)
        # The claim may have waited on Redis: what the node knows may have changed meanwhile.
        if claimed:
            registry.check_ticket(claims)
    except (JtiStoreFullError, JtiStoreUnavailableError) as exc:
        return error_response(exc.status, "unavailable", exc.reason)
    except TicketError as exc:
        return error_response(401, "unauthorized", exc.reason)
    if not claimed:
        return error_response(401, "unauthorized", "ticket already used")
    if not state.readiness.ready:
        return _not_ready(state.readiness)

    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the client went away during the handshake
        return ws
    conn = Connection(
        ws,
        transport,
        user_id=claims.user_id,
        organization_id=claims.organization_id,
        roles=claims.roles,
        session_id=claims.session_id,
        max_send_buffer=state.settings.max_send_buffer,
        on_slow=lambda _conn: state.metrics.slow_consumers.inc(),
        writes=state.registry.writes,
        subscription=subscription,
    )
    snapshotting: asyncio.Task[None] | None = None
    try:
        # No await between this check and the attach's first step: an access change handled
        # while the handshake was written closes the socket before any event reaches it.
        reason = registry.revocation(claims)
        if reason is not None:
            conn.write(revoked_frame(reason))
            conn.close(CloseCode.ACCESS_REVOKED, reason)
        else:
            hub = registry.hub(conn.organization_id)
            if snapshot:
                hub.hold_at_ready.add(conn)
            await registry.attach(conn, since)
            if snapshot and conn in hub.held:
                # No await since `ready`: this is the position the socket was held at.
                cursor = registry.position_cursor()
                assert state.pool is not None
                snapshotting = asyncio.create_task(
                    request.app[LIMITS].snapshots.send(
                        conn, hub, cursor, state.pool, state.config, registry.policies
                    )
                )
        async for message in ws:
            if message.type is WSMsgType.TEXT and message.data.strip() == "ping":
                conn.write(_PONG)
            elif message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                conn.write(_UNSUPPORTED)
    finally:
        if snapshotting is not None:
            snapshotting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await snapshotting
        registry.detach(conn)
        conn.closed = True
    return ws
