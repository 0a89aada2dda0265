"""The access log never holds a ticket: a real walcast, a WebSocket connect, every log record."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest

from tests.fix_gateway import Gateway
from walcast.logs import JsonFormatter

pytestmark = pytest.mark.integration


class _Waiter(logging.Handler):
    """Sets an event when the access log records a request to `path`."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if record.name == "walcast.access" and fields.get("path") == self.path:
            self.seen.set()


def _record_text(record: logging.LogRecord) -> str:
    return " ".join([record.getMessage(), JsonFormatter().format(record), repr(vars(record))])


async def test_websocket_connect_does_not_log_the_ticket(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    waiter = _Waiter("/realtime/v1/websocket")
    logging.getLogger("walcast.access").addHandler(waiter)
    try:
        token = gw.add_member("u_log", "org_log", "owner")
        ticket = await gw.ticket(token, "org_log")
        sock = await gw.connect_ticket(ticket, "org_log")
        await sock.close()  # the access log writes a WebSocket request when it ends
        await asyncio.wait_for(waiter.seen.wait(), 10)
        # A refused handshake too (the ticket is now used: 401).
        waiter.seen.clear()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await gw.http.ws_connect(
                f"{gw.url}/realtime/v1/websocket",
                params={"ws_ticket": ticket, "organizationId": "org_log"},
            )
        assert refused.value.status == 401
        await asyncio.wait_for(waiter.seen.wait(), 10)
    finally:
        logging.getLogger("walcast.access").removeHandler(waiter)

    access = [r for r in caplog.records if r.name == "walcast.access"]
    statuses = [r.fields["status"] for r in access if r.fields["path"].endswith("/websocket")]  # type: ignore[attr-defined]
    assert statuses == [101, 401]
    for record in caplog.records:
        text = _record_text(record)
        assert ticket not in text, record.name
        assert token not in text, record.name
        assert "ws_ticket=" not in text, record.name


def test_access_log_lines_are_json_with_method_path_status_duration() -> None:
    record = logging.LogRecord("walcast.access", logging.INFO, "", 0, "GET /x 200 1.5ms", (), None)
    record.fields = {"method": "GET", "path": "/x", "status": 200, "duration_ms": 1.5}
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "GET /x 200 1.5ms"
    assert (line["method"], line["path"], line["status"], line["duration_ms"]) == (
        "GET",
        "/x",
        200,
        1.5,
    )
