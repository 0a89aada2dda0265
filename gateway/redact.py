"""Keep credentials out of aiohttp's own error log.

When aiohttp's HTTP parser refuses a request (a bad request line, a header with a control
character, a line over 8190 bytes), it logs "Error handling request" on `aiohttp.server` at
ERROR, with a traceback whose message quotes the raw request line or header: for the WebSocket
URL that is `?ws_ticket=<ticket>`, for the broadcast API it can be `Authorization: Bearer
<ACCESS_TOKEN>`. `RedactParseErrors` rewrites those records to the exception's class name only,
at INFO (a client's malformed request is not a server error, and should not page anyone), and
drops the traceback. Every other record passes untouched.

`install()` adds the filter to the `aiohttp.server` logger once; `make_app` calls it.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["RedactParseErrors", "install"]

SERVER_LOGGER = logging.getLogger("aiohttp.server")


class RedactParseErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if exc_info and isinstance(exc_info[1], HttpProcessingError):
            record.msg = "malformed HTTP request refused (%s)"
            record.args = (type(exc_info[1]).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
        return True


def install() -> None:
    if not any(isinstance(f, RedactParseErrors) for f in SERVER_LOGGER.filters):
        SERVER_LOGGER.addFilter(RedactParseErrors())
