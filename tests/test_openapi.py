"""The OpenAPI document (gateway/openapi.py) is the contract of spec §4: schemathesis generates
requests from it, valid and invalid, sends them to a live walcast, and checks every answer: no
5xx, a documented status code, the documented content type, headers and body schema, and a 4xx
for every request that breaks the schema.

The server runs on the test's event loop; schemathesis (which speaks `requests`, blocking) runs
in a worker thread, so the two talk over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openapi import OPENAPI
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway

pytestmark = pytest.mark.integration

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 40

SPEC_ENDPOINTS = {
    ("post", "/realtime/v1/ws-ticket"): {"200", "400", "401", "403"},
    ("get", "/realtime/v1/websocket"): {"101", "401", "403"},
    ("post", "/realtime/v1/broadcast"): {"202", "400", "401", "413"},
    ("post", "/realtime/v1/api/broadcast"): {"202", "400", "401", "413"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
}


def test_document_lists_every_spec_endpoint_and_status() -> None:
    paths = OPENAPI["paths"]
    for (method, path), statuses in SPEC_ENDPOINTS.items():
        operation = paths[path][method]
        assert statuses <= set(operation["responses"]), (method, path)
    ws = paths["/realtime/v1/websocket"]["get"]
    assert {"400", "429", "503"} <= set(ws["responses"])
    assert {p["name"] for p in ws["parameters"] if p["in"] == "query"} == {
        "ws_ticket",
        "organizationId",
        "since",
    }
    broadcast = OPENAPI["components"]["schemas"]["BroadcastRequest"]
    assert set(broadcast["properties"]) == {
        "organizationId",
        "event",
        "payload",
        "targetRoles",
        "targetUserId",
        "userId",
    }


async def _served_schema(gw: Gateway) -> Any:
    async with gw.http.get(f"{gw.url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document == OPENAPI
    return schemathesis.openapi.from_dict(document)


def _run(
    strategy: Any, examples: int, prepare: Callable[[Any], None] | None = None
) -> Counter[int]:
    """Send up to `examples` generated cases, validating each answer; count the statuses."""
    statuses: Counter[int] = Counter()
    session = requests.Session()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        if prepare is not None:
            prepare(case)
        response = case.call_and_validate(session=session, checks=CHECKS, timeout=10)
        statuses[response.status_code] += 1

    try:
        run()
    finally:
        session.close()
    return statuses


def _both(make: Callable[[GenerationMode], Any]) -> Any:
    return st.one_of(make(GenerationMode.POSITIVE), make(GenerationMode.NEGATIVE))


async def test_schemathesis_every_operation_anonymous(gw: Gateway) -> None:
    schema = await _served_schema(gw)
    schema.config.update(base_url=gw.url)
    strategy = _both(lambda mode: schema.as_strategy(generation_mode=mode))
    statuses = await asyncio.to_thread(_run, strategy, EXAMPLES * 3)
    assert statuses.total() >= EXAMPLES
    assert {200, 401} <= set(statuses), statuses


async def test_schemathesis_ws_ticket_with_a_real_session(gw: Gateway) -> None:
    token = gw.add_member("oa-user", "org-oa", "recruiter")
    schema = await _served_schema(gw)
    schema.config.update(base_url=gw.url)
    operation = schema["/realtime/v1/ws-ticket"]["POST"]
    headers = {"Authorization": f"Bearer {token}"}
    strategy = _both(lambda mode: operation.as_strategy(generation_mode=mode, headers=headers))

    def authenticate(case: Any) -> None:
        case.headers = {**(case.headers or {}), **headers}

    statuses = await asyncio.to_thread(_run, strategy, EXAMPLES, authenticate)
    # Past authentication: tickets for the active org, 400 for bad bodies (403 for others).
    assert {200, 400} <= set(statuses), statuses


async def test_schemathesis_broadcast_with_the_access_token(gw: Gateway) -> None:
    schema = await _served_schema(gw)
    schema.config.update(base_url=gw.url)
    for path in ("/realtime/v1/broadcast", "/realtime/v1/api/broadcast"):
        operation = schema[path]["POST"]
        for headers in (
            {"Authorization": f"Bearer {ACCESS_TOKEN}"},
            {"X-Internal-Secret": ACCESS_TOKEN},
        ):

            def fix(case: Any, headers: dict[str, str] = headers) -> None:
                case.headers = {
                    key: value
                    for key, value in (case.headers or {}).items()
                    if key.lower() not in ("authorization", "x-internal-secret")
                } | headers

            strategy = _both(
                lambda mode, op=operation, h=headers: op.as_strategy(
                    generation_mode=mode, headers=h
                )
            )
            statuses = await asyncio.to_thread(_run, strategy, EXAMPLES // 2, fix)
            assert {202, 400} <= set(statuses), statuses


async def test_schemathesis_websocket_with_real_tickets(gw: Gateway) -> None:
    """Valid tickets, generated everything else: the handshake answers 400/403/429, never 5xx."""
    schema = await _served_schema(gw)
    schema.config.update(base_url=gw.url)
    operation = schema["/realtime/v1/websocket"]["GET"]

    def fresh_ticket(case: Any) -> None:
        query = dict(case.query or {})
        query["ws_ticket"] = mint_ticket(
            ACCESS_TOKEN,
            user_id="oa-ws",
            organization_id="org-oa",
            roles=["owner"],
            now=time.time(),
        )
        case.query = query
        # requests cannot read a 101 answer, so no generated case may complete a real upgrade.
        case.headers = {k: v for k, v in (case.headers or {}).items() if k != "Sec-WebSocket-Key"}

    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    statuses = await asyncio.to_thread(_run, strategy, EXAMPLES, fresh_ticket)
    assert 400 in statuses and 401 not in statuses, statuses
    async with gw.http.get(f"{gw.url}/healthz") as response:
        assert response.status == 200
