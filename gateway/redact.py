"""Keep credentials out of aiohttp's own error log and error bodies.

When aiohttp's HTTP parser refuses a request (a bad request line, a header with a control
character, a line over 8190 bytes), it answers 400 itself, before any route or middleware runs,
and both its answer and its log quote the raw request line or header: for the WebSocket URL
that is `?ws_ticket=<ticket>`, for the broadcast API it can be `Authorization: Bearer
<ACCESS_TOKEN>`.

- `RedactParseErrors` rewrites those log records on `aiohttp.server` to the exception's class
  name only, at INFO (a client's malformed request is not a server error, and should not page
  anyone), and drops the traceback. Every other record passes untouched.
- The answer is built by aiohttp's `RequestHandler.handle_error` (for parser errors, and for an
  exception that escapes a handler: 500). aiohttp has no hook for it, so `install()` wraps that
  method: aiohttp still logs (through the filter) and decides when to answer; the body is
  replaced by a fixed JSON `{"error", "detail"}` chosen from the status and the exception's
  class. It never holds a byte of the request, nor a traceback, even in aiohttp's debug mode.

`install()` does both once per process; `make_app` calls it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

__all__ = ["RedactParseErrors", "error_body", "install"]

SERVER_LOGGER = logging.getLogger("aiohttp.server")

#: Most specific first: BadHttpMethod is a BadStatusLine.
_PARSE_ERRORS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "a request line or header is longer than the server accepts"),
    (BadHttpMethod, "not an HTTP request: invalid method"),
    (BadStatusLine, "malformed request line"),
    (InvalidURLError, "malformed URL"),
    (InvalidHeader, "malformed header"),
    (HttpProcessingError, "malformed HTTP request"),
)


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


def error_body(status: int, exc: BaseException | None) -> bytes:
    """The JSON body of aiohttp's own error answers: fixed text, nothing from the request."""
    if status >= 500:
        error, detail = "internal error", "the server could not answer; the cause is in its log"
    else:
        error = "bad request"
        detail = next(
            (text for kind, text in _PARSE_ERRORS if isinstance(exc, kind)),
            "malformed HTTP request",
        )
    return orjson.dumps({"error": error, "detail": detail})


_aiohttp_handle_error = RequestHandler.handle_error


def _handle_error(
    self: RequestHandler,
    request: Any,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    # aiohttp's own: it logs, and raises if a response has started; its body (which quotes
    # the request) is dropped.
    _aiohttp_handle_error(self, request, status, exc, None)
    response = web.Response(
        status=status, body=error_body(status, exc), content_type="application/json"
    )
    response.force_close()
    return response


def install() -> None:
    if not any(isinstance(f, RedactParseErrors) for f in SERVER_LOGGER.filters):
        SERVER_LOGGER.addFilter(RedactParseErrors())
    if RequestHandler.handle_error is not _handle_error:
        setattr(RequestHandler, "handle_error", _handle_error)  # noqa: B010 (mypy: a method)
