"""The plain HTTP endpoints: ws-ticket, broadcast, health, readiness, metrics.

Every body is validated with pydantic; every failure is a JSON `{"error", "detail"}` with a 4xx
status that says what was wrong. Secrets are compared in constant time and never echoed.

`install(app)` adds the routes, the rate limits of ws-ticket and broadcast (token buckets per
client address, and per access token for broadcast: 429 with `Retry-After`), and one middleware,
`unavailable_as_503`: the single place where "a dependency is down" (PostgreSQL, Redis, the
network to them) becomes 503 with `Retry-After` and a JSON body, for every route, instead of a
500 and a traceback. Handlers do not catch those errors themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
import orjson
import redis.exceptions
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdc.lsn import format_lsn, parse_lsn
from gateway.broadcasts import BroadcastSigner, namespace_roles, target_roles
from gateway.config import Settings
from gateway.events import BROADCAST_PREFIX
from gateway.limits import LimitExceeded, RateLimiter
from gateway.state import STATE, GatewayState
from gateway.tickets import DEFAULT_TTL, JtiStoreUnavailableError, mint_ticket

__all__ = [
    "API_LIMITS",
    "BROADCAST_SIGNER",
    "MAX_PAYLOAD_DEPTH",
    "RETRY_AFTER_SECONDS",
    "ApiLimits",
    "BroadcastRequest",
    "error_response",
    "install",
    "too_many_requests",
    "unavailable_as_503",
]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Deepest nesting of arrays and objects accepted in a broadcast payload.
MAX_PAYLOAD_DEPTH = 64
#: What a 503 tells the client to wait, in seconds.
RETRY_AFTER_SECONDS = 5

#: A dependency that is down, by the errors its clients raise, and the name a 503 gives it.
_UNAVAILABLE: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    (
        (
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
            asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
        ),
        "PostgreSQL",
    ),
    ((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError), "Redis"),
    ((JtiStoreUnavailableError,), "the ticket store"),
    ((OSError,), "a service walcast depends on"),  # refused, reset, unreachable, timed out
)
_UNAVAILABLE_TYPES = tuple(kind for kinds, _ in _UNAVAILABLE for kind in kinds)


def error_response(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, dumps=_dumps)


def too_many_requests(refused: LimitExceeded) -> web.Response:
    response = error_response(429, "too many requests", refused.reason)
    response.headers["Retry-After"] = str(refused.retry_after)
    return response


BROADCAST_SIGNER = web.AppKey("walcast_broadcast_signer", BroadcastSigner)


class ApiLimits:
    """The token buckets of ws-ticket and broadcast (see gateway.limits); 0 disables one."""

    def __init__(self, settings: Settings) -> None:
        self.tickets = RateLimiter(settings.ticket_rate, settings.ticket_burst)
        self.broadcasts = RateLimiter(settings.broadcast_rate, settings.broadcast_burst)
        self.broadcast_tokens = RateLimiter(
            settings.broadcast_rate,
            settings.broadcast_burst,
            reason="too many broadcasts with this access token",
        )


API_LIMITS = web.AppKey("walcast_api_limits", ApiLimits)


def install(app: web.Application) -> None:
    """Serve the endpoints of this module on `app`, with their limits and error mapping."""
    app[API_LIMITS] = ApiLimits(app[STATE].settings)
    app[BROADCAST_SIGNER] = BroadcastSigner(app[STATE].settings.access_tokens)
    app.middlewares.append(unavailable_as_503)
    app.add_routes(routes)


@web.middleware
async def unavailable_as_503(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A dependency that is down becomes 503 + `Retry-After` + JSON; every 503 gets the header."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 503:
            exc.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        raise
    except _UNAVAILABLE_TYPES as exc:
        if request.writer.output_size:  # an answer (a 101, say) has started: too late for one
            raise
        name = next(name for kinds, name in _UNAVAILABLE if isinstance(exc, kinds))
        log.warning(
            "%s %s: %s unavailable (%s: %s); answered 503",
            request.method,
            request.rel_url.path,  # never the query string: it may hold a ticket
            name,
            type(exc).__name__,
            exc,
        )
        response = error_response(503, "unavailable", f"{name} is unavailable; try again later")
    if response.status == 503 and not response.prepared:
        response.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return response


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _json_body(request: web.Request, *, optional: bool = False) -> Any:
    """The request's JSON body; raises a 400/413 response for anything that isn't JSON."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = f"the body exceeds the limit of {request.client_max_size} bytes"
        raise _http(413, "payload too large", limit) from None
    if not raw and optional:
        return None
    if not raw.strip():  # present but blank: not JSON, and not "no body" either
        raise _http(400, "invalid body", "send a JSON body" + (" or none" if optional else ""))
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _http(400, "invalid JSON", str(exc)) from None


def _http(status: int, error: str, detail: Any = None) -> web.HTTPException:
    exc_class = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        413: web.HTTPRequestEntityTooLarge,
        503: web.HTTPServiceUnavailable,
    }[status]
    # `text=`, not `body=`: aiohttp deprecates body, and 413's constructor sets a default text
    # that clashes with a body (ValueError, i.e. a 500).
    text = orjson.dumps({"error": error, "detail": detail}).decode()
    if exc_class is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(
            max_size=0, actual_size=0, text=text, content_type="application/json"
        )
    return exc_class(text=text, content_type="application/json")


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
    ]


# -- ws-ticket -------------------------------------------------------------------------------


class TicketRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No NUL: PostgreSQL text cannot hold one, and this value is a query parameter.
    organizationId: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[^\x00]*$"
    )


@routes.post("/realtime/v1/ws-ticket")
async def ws_ticket(request: web.Request) -> web.Response:
    state = request.app[STATE]
    refused = request.app[API_LIMITS].tickets.allow(request.remote or "")
    if refused is not None:  # before any work: a flood of bad tokens costs no query
        return too_many_requests(refused)
    token = _bearer(request)
    if token is None:
        return error_response(401, "unauthorized", "missing bearer session token")
    if "\x00" in token:  # no session token holds one, and PostgreSQL text cannot
        return error_response(401, "unauthorized", "invalid or expired session")
    body = await _json_body(request, optional=True)
    if body is None and (await request.read()).strip():
        return error_response(400, "invalid body", "the body must be a JSON object")
    try:
        ask = TicketRequest.model_validate({} if body is None else body)
    except ValidationError as exc:
        return error_response(400, "invalid body", _validation_detail(exc))
    if state.sessions is None:
        return error_response(503, "unavailable", "no session store configured")
    session = await state.sessions.authenticate(token)
    if session is None:
        return error_response(401, "unauthorized", "invalid or expired session")
    organization = ask.organizationId or session.active_organization_id
    if not organization:
        return error_response(400, "no organization", "pass organizationId or set an active one")
    roles = await state.sessions.roles_of(session.user_id, organization, session=session)
    if roles is None:
        return error_response(403, "forbidden", "not a member of this organization")
    ticket = mint_ticket(
        state.settings.signing_secret,
        user_id=session.user_id,
        organization_id=organization,
        roles=sorted(roles),
        session_id=session.session_id,
    )
    return web.json_response({"wsTicket": ticket, "expiresIn": DEFAULT_TTL})


# -- broadcast -------------------------------------------------------------------------------


class BroadcastRequest(BaseModel):
    """The body of POST /realtime/v1/broadcast."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    organizationId: str | None = Field(default=None, min_length=1, max_length=256)
    event: str = Field(min_length=1, max_length=256)
    payload: Any = Field(default_factory=dict)
    targetRoles: list[str] | None = None
    targetUserId: str | None = Field(default=None, min_length=1, max_length=256)
    userId: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("payload")
    @classmethod
    def _not_too_deep(cls, payload: Any) -> Any:
        if _nests_deeper(payload, MAX_PAYLOAD_DEPTH):
            raise ValueError(f"payload nests deeper than {MAX_PAYLOAD_DEPTH} levels")
        return payload


def _nests_deeper(value: Any, limit: int) -> bool:
    """True if arrays and objects in `value` nest more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _access_token(request: web.Request, state: GatewayState) -> str | None:
    """The presented access token if it is one of the configured secrets, else None."""
    presented = _bearer(request) or request.headers.get("X-Internal-Secret", "")
    if not presented:
        return None
    supplied = presented.encode()
    # Check every secret, without stopping early, so timing says nothing about which matched.
    matched = False
    for secret in state.settings.access_tokens:
        matched |= hmac.compare_digest(supplied, secret.encode())
    return presented if matched else None


async def broadcast(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limits = request.app[API_LIMITS]
    refused = limits.broadcasts.allow(request.remote or "")
    if refused is not None:
        return too_many_requests(refused)
    token = _access_token(request, state)
    if token is None:
        return error_response(401, "unauthorized", "wrong or missing access token")
    refused = limits.broadcast_tokens.allow(hashlib.sha256(token.encode()).hexdigest())
    if refused is not None:
        return too_many_requests(refused)
    too_large = f"the broadcast exceeds the limit of {state.settings.max_broadcast_bytes} bytes"
    if (request.content_length or 0) > state.settings.max_broadcast_bytes:
        return error_response(413, "payload too large", too_large)
    try:
        ask = BroadcastRequest.model_validate(await _json_body(request))
    except ValidationError as exc:
        return error_response(400, "invalid body", _validation_detail(exc))
    organization = ask.organizationId or request.query.get("organizationId")
    if not organization:
        return error_response(400, "invalid body", "organizationId is required")
    required = namespace_roles(state.config, ask.event)
    if isinstance(required, str):
        return error_response(400, "undeclared event", required)
    roles = target_roles(ask.event.partition(":")[0], required, ask.targetRoles)
    if isinstance(roles, str):
        return error_response(400, "invalid body", roles)
    body = orjson.dumps(
        {
            "organizationId": organization,
            "event": ask.event,
            "payload": ask.payload,
            "targetRoles": list(roles),
            "targetUserId": ask.targetUserId or ask.userId,
        }
    )
    if len(body) > state.settings.max_broadcast_bytes:
        return error_response(413, "payload too large", too_large)
    # Signed, so the router can tell it from a message any database role could write.
    message = request.app[BROADCAST_SIGNER].sign(body)
    if state.pool is None:
        return error_response(503, "unavailable", "no database connection")
    lsn_text = await state.pool.fetchval(
        "SELECT pg_logical_emit_message(true, $1, $2::text)::text",
        BROADCAST_PREFIX,
        message.decode(),
    )
    lsn = format_lsn(parse_lsn(lsn_text))
    return web.json_response({"accepted": True, "lsn": lsn}, status=202)


routes.post("/realtime/v1/broadcast")(broadcast)
routes.post("/realtime/v1/api/broadcast")(broadcast)


# -- operations ------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "time": time.time()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[STATE].readiness
    if readiness.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": readiness.reason}, status=503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
