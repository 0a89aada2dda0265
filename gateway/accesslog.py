"""The access log: method, path, status and duration of each request, and nothing else.

aiohttp's default access log prints the request line, query string included, and the WebSocket
URL carries the ticket (`?ws_ticket=...`): a credential in the logs. This logger never looks at
the query string, the headers or the body. It writes to the `walcast.access` logger; with
`walcast serve`'s JSON logs each line looks like::

    {"ts": "...", "level": "info", "logger": "walcast.access",
     "msg": "GET /realtime/v1/websocket 101 5123.4ms", "method": "GET",
     "path": "/realtime/v1/websocket", "status": 101, "duration_ms": 5123.4}

A WebSocket request is logged when its handler returns, i.e. when the socket closes, so its
duration is the connection's lifetime. Probes (`/healthz`, `/readyz`, `/metrics`) are logged at
DEBUG, everything else at INFO.

`make_app` installs it through the application's `handler_args`, so every runner serving a walcast
app uses it, whatever `access_log_class` the runner was given.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

__all__ = ["ACCESS_LOGGER", "AccessLogger"]

ACCESS_LOGGER = logging.getLogger("walcast.access")
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogger(AbstractAccessLogger):
    """One record per request, with `method`, `path` (no query), `status`, `duration_ms`."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        path = request.rel_url.path  # never the query string: it may hold a ticket
        level = logging.DEBUG if path in PROBES else logging.INFO
        if not ACCESS_LOGGER.isEnabledFor(level):
            return
        duration_ms = round(time * 1000.0, 1)
        fields = {
            "method": request.method,
            "path": path,
            "status": response.status,
            "duration_ms": duration_ms,
        }
        ACCESS_LOGGER.log(
            level,
            "%s %s %s %.1fms",
            request.method,
            path,
            response.status,
            duration_ms,
            extra={"fields": fields},
        )

    @property
    def enabled(self) -> bool:
        return ACCESS_LOGGER.isEnabledFor(logging.INFO)
