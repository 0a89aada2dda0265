"""The OpenAPI 3 description of walcast's HTTP API, served at `GET /openapi.json`.

The document is data, built once at import, and it is a contract: tests/test_openapi.py runs
schemathesis against a live walcast with it, so every status code and body the gateway can
answer must be listed here, and nothing listed here may be a lie. When you change a handler in
gateway/http.py or gateway/websocket.py, change this document in the same commit.

`python -m gateway.openapi` prints it (JSON) for clients that want a file.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from aiohttp import web

__all__ = ["OPENAPI", "routes"]

routes = web.RouteTableDef()

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


def _limited(description: str) -> dict[str, Any]:
    """A 429 or 503: the error body, and `Retry-After`, which such an answer always carries."""
    response = _error(description)
    response["headers"] = {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return response


_UNAVAILABLE = "PostgreSQL or Redis is down or unreachable"


_IDENTIFIER = {"type": "string", "minLength": 1, "maxLength": 256}
_OPTIONAL_IDENTIFIER = {**_IDENTIFIER, "nullable": True}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every failure: a short fixed `error` and a `detail` (text, a list of "
        "field errors, or a number); never a ticket, a secret or a row value.",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {}},
    },
    "TicketRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "organizationId": {**_OPTIONAL_IDENTIFIER, "pattern": "^[^\\u0000]*$"},
        },
    },
    "TicketResponse": {
        "type": "object",
        "additionalProperties": False,
        "required": ["wsTicket", "expiresIn"],
        "properties": {
            "wsTicket": {
                "type": "string",
                "description": "an HS256 JWT, valid for 60 s and usable once",
                "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
            },
            "expiresIn": {"type": "integer", "enum": [60]},
        },
    },
    "BroadcastRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["event"],
        "properties": {
            "organizationId": {
                **_OPTIONAL_IDENTIFIER,
                "description": "required here or as the organizationId query parameter",
            },
            "event": {
                **_IDENTIFIER,
                "description": "`namespace:event` names must be declared in the realtime config",
            },
            "payload": {
                "description": "any JSON value, arrays and objects nested at most 64 levels; "
                "default {}"
            },
            "targetRoles": {
                "type": "array",
                "items": {"type": "string"},
                "nullable": True,
                "description": "only members with one of these roles; within a namespace, "
                "bounded by its requiredRoles (absent or empty: the namespace's roles)",
            },
            "targetUserId": _OPTIONAL_IDENTIFIER,
            "userId": {**_OPTIONAL_IDENTIFIER, "description": "alias of targetUserId"},
        },
    },
    "BroadcastAccepted": {
        "type": "object",
        "additionalProperties": False,
        "required": ["accepted", "lsn"],
        "properties": {
            "accepted": {"type": "boolean", "enum": [True]},
            "lsn": {"type": "string", "pattern": "^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "time"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}, "time": {"type": "number"}},
    },
    "Ready": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ready"]}},
    },
    "NotReady": {
        "type": "object",
        "required": ["status", "reason"],
        "properties": {
            "status": {"type": "string", "enum": ["not ready"]},
            "reason": {"type": "string"},
        },
    },
}

_TICKET_OPERATION = {
    "operationId": "createWsTicket",
    "summary": "Mint a 60-second, single-use WebSocket ticket for the session's user",
    "security": [{"session": []}],
    "requestBody": {
        "required": False,
        "content": {_JSON: {"schema": _ref("TicketRequest")}},
    },
    "responses": {
        "200": {
            "description": "a ticket for the organization (default: the session's active one)",
            "content": {_JSON: {"schema": _ref("TicketResponse")}},
        },
        "400": _error("invalid body, or no organization given and none active"),
        "401": _error("no, invalid or expired session"),
        "403": _error("the user is not a member of the organization"),
        "413": _error("body over the size limit"),
        "429": _limited("too many ws-ticket requests from this address"),
        "503": _limited(f"{_UNAVAILABLE}, or no session store is configured"),
    },
}

_WEBSOCKET_OPERATION = {
    "operationId": "openWebSocket",
    "summary": "Open the event socket (RFC 6455 upgrade); every check happens before the upgrade",
    "parameters": [
        {
            "name": "ws_ticket",
            "in": "query",
            "required": True,
            "description": "a ticket from POST /realtime/v1/ws-ticket (or minted with "
            "ACCESS_TOKEN); given exactly once",
            "schema": {"type": "string"},
        },
        {
            "name": "organizationId",
            "in": "query",
            "required": False,
            "description": "must equal the ticket's organization; absent means the ticket's",
            "schema": {"type": "string"},
        },
        {
            "name": "since",
            "in": "query",
            "required": False,
            "description": "resume after this event id (replay, then `ready`)",
            "schema": {"type": "string"},
        },
        {"name": "Upgrade", "in": "header", "schema": {"type": "string", "enum": ["websocket"]}},
        {"name": "Connection", "in": "header", "schema": {"type": "string", "enum": ["Upgrade"]}},
        {"name": "Sec-WebSocket-Key", "in": "header", "schema": {"type": "string"}},
        {
            "name": "Sec-WebSocket-Version",
            "in": "header",
            "schema": {"type": "string", "enum": ["13"]},
        },
    ],
    "responses": {
        "101": {"description": "switching protocols: the socket is open; `ready` follows"},
        "400": _error("not a WebSocket upgrade, or a parameter given twice"),
        "401": _error("missing, malformed, forged, expired, reused or revoked ticket"),
        "403": _error("organizationId differs from the ticket's organization"),
        "429": _limited(
            "too many handshakes from this address, or too many open sockets for this user "
            "in this organization, or for this organization"
        ),
        "503": _limited(
            "the node is not streaming from PostgreSQL yet (or is shutting down), or the "
            "ticket store (Redis) is unreachable"
        ),
    },
}

_BROADCAST_OPERATION = {
    "summary": "Publish a custom event through the WAL to an organization's sockets",
    "security": [{"accessToken": []}, {"internalSecret": []}],
    "parameters": [
        {
            "name": "organizationId",
            "in": "query",
            "required": False,
            "description": "the organization, when the body does not name it",
            "schema": {"type": "string"},
        }
    ],
    "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("BroadcastRequest")}}},
    "responses": {
        "202": {
            "description": "durably written (pg_logical_emit_message committed) at `lsn`",
            "content": {_JSON: {"schema": _ref("BroadcastAccepted")}},
        },
        "400": _error(
            "invalid body (a payload nested deeper than 64 levels included), no organization, "
            "an undeclared namespace event, or targetRoles outside the namespace's requiredRoles"
        ),
        "401": _error("wrong or missing access token"),
        "413": _error("body (or the message built from it) over the size limit"),
        "429": _limited("too many broadcasts from this address, or with this access token"),
        "503": _limited(f"{_UNAVAILABLE}, or no database is configured"),
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "walcast",
        "version": "1",
        "description": "PostgreSQL changes and custom broadcasts as access-controlled "
        'WebSocket events. Errors are JSON `{"error", "detail"}`.',
    },
    "paths": {
        "/realtime/v1/ws-ticket": {"post": _TICKET_OPERATION},
        "/realtime/v1/websocket": {"get": _WEBSOCKET_OPERATION},
        "/realtime/v1/broadcast": {"post": {**_BROADCAST_OPERATION, "operationId": "broadcast"}},
        "/realtime/v1/api/broadcast": {
            "post": {**_BROADCAST_OPERATION, "operationId": "broadcastAlias"}
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up",
                "responses": {
                    "200": {
                        "description": "alive",
                        "content": {_JSON: {"schema": _ref("Health")}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Replication is streaming: sockets may attach",
                "responses": {
                    "200": {"description": "ready", "content": {_JSON: {"schema": _ref("Ready")}}},
                    "503": {
                        "description": "not streaming (starting, reconnecting, shutting down)",
                        "content": {_JSON: {"schema": _ref("NotReady")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3", "content": {_JSON: {"schema": {}}}}
                },
            }
        },
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "session": {
                "type": "http",
                "scheme": "bearer",
                "description": "a session token from the session store",
            },
            "accessToken": {"type": "http", "scheme": "bearer", "description": "ACCESS_TOKEN"},
            "internalSecret": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Internal-Secret",
                "description": "ACCESS_TOKEN",
            },
        },
    },
}

_BODY = orjson.dumps(OPENAPI)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type=_JSON)


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(OPENAPI, option=orjson.OPT_INDENT_2).decode() + "\n")
