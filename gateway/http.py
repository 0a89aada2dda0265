"""The plain HTTP endpoints of spec §4: ws-ticket, broadcast, health, readiness, metrics.

Every body is validated with pydantic; every failure is a JSON `{"error", "detail"}` with a 4xx
status that says what was wrong. Secrets are compared in constant time and never echoed.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cdc.lsn import format_lsn, parse_lsn
from gateway.config import RealtimeConfig
from gateway.events import BROADCAST_PREFIX
from gateway.state import STATE, GatewayState
from gateway.tickets import DEFAULT_TTL, mint_ticket

__all__ = ["BroadcastRequest", "error_response", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def error_response(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, dumps=_dumps)


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
        raise _http(413, "payload too large", "the body exceeds the configured limit") from None
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
    """The body of POST /realtime/v1/broadcast (spec §4)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    organizationId: str | None = Field(default=None, min_length=1, max_length=256)
    event: str = Field(min_length=1, max_length=256)
    payload: Any = Field(default_factory=dict)
    targetRoles: list[str] | None = None
    targetUserId: str | None = Field(default=None, min_length=1, max_length=256)
    userId: str | None = Field(default=None, min_length=1, max_length=256)


def _authorized_internal(request: web.Request, state: GatewayState) -> bool:
    presented = _bearer(request) or request.headers.get("X-Internal-Secret", "")
    if not presented:
        return False
    supplied = presented.encode()
    # Check every secret, without stopping early, so timing says nothing about which matched.
    matched = False
    for secret in state.settings.access_tokens:
        matched |= hmac.compare_digest(supplied, secret.encode())
    return matched


def check_namespace(config: RealtimeConfig, event: str) -> tuple[str, ...] | str:
    """The namespace's default target roles, or an error message for an undeclared event."""
    namespace, sep, name = event.partition(":")
    if not sep:
        return ()
    declared = config.namespaces.get(namespace)
    if declared is None:
        return f"namespace {namespace!r} is not declared in the realtime config"
    if declared.events is not None and name not in declared.events:
        return f"event {name!r} is not declared in namespace {namespace!r}"
    return declared.requiredRoles


async def broadcast(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not _authorized_internal(request, state):
        return error_response(401, "unauthorized", "wrong or missing access token")
    if (request.content_length or 0) > state.settings.max_broadcast_bytes:
        return error_response(413, "payload too large", state.settings.max_broadcast_bytes)
    try:
        ask = BroadcastRequest.model_validate(await _json_body(request))
    except ValidationError as exc:
        return error_response(400, "invalid body", _validation_detail(exc))
    organization = ask.organizationId or request.query.get("organizationId")
    if not organization:
        return error_response(400, "invalid body", "organizationId is required")
    namespace_roles = check_namespace(state.config, ask.event)
    if isinstance(namespace_roles, str):
        return error_response(400, "undeclared event", namespace_roles)
    roles = ask.targetRoles if ask.targetRoles is not None else list(namespace_roles)
    message = orjson.dumps(
        {
            "organizationId": organization,
            "event": ask.event,
            "payload": ask.payload,
            "targetRoles": roles,
            "targetUserId": ask.targetUserId or ask.userId,
        }
    )
    if len(message) > state.settings.max_broadcast_bytes:
        return error_response(413, "payload too large", state.settings.max_broadcast_bytes)
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
