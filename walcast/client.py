"""A Python asyncio client for walcast, for services and scripts (browsers speak the same
protocol with a few lines of JavaScript: ask for a ticket, open the socket, resume with `since`).

Two halves, matching the two sides of the protocol:

* `RealtimeClient` subscribes, as a user: it asks `POST /realtime/v1/ws-ticket` for a ticket
  with the user's session token, opens `GET /realtime/v1/websocket?ws_ticket=..&organizationId=..`
  and hands every message to your handlers. When the socket drops it reconnects with capped
  exponential back-off and full jitter, with a **fresh ticket every time** (tickets live 60 s and
  are single use), and resumes with `since=<last id>` so nothing is lost or repeated.
* `Realtime` publishes, as the application: `Realtime(REALTIME_URL, ACCESS_TOKEN).broadcast(...)`
  sends a custom event through `POST /realtime/v1/broadcast` and returns once the event is
  durable in the WAL. It is the one broadcast client: `walcast broadcast` and the demo use it.

Resume rules the client follows:

* the cursor to resume from is the `id` of the last `postgres_changes`/`broadcast` message
  handled, or the `cursor` of the last `ready`, whichever is later (after `ready`, every event
  this user may see up to that cursor has been delivered);
* `resync_required` means the server's history no longer reaches back to that cursor: the
  `on_resync` handler is called and the application should refetch its data; the `ready` that
  follows gives the new cursor;
* `auth:token-invalidated` (a `broadcast` event, followed by close code 4403) means the user's
  access changed. The `on_broadcast` handler sees it like any broadcast, and the client then
  reconnects with a fresh ticket: after a role change that ticket carries the new roles; after
  a removal or a revoked session the ticket endpoint answers 403/401 and `run()` raises
  `AuthenticationError`. Permanent refusals are never retried.

Handlers may be plain functions or coroutine functions; each receives the decoded message (a
dict). An exception in a handler is logged and the message counted as handled; the client keeps
running. Messages are handled one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from cdc.backoff import full_jitter
from cdc.errors import WalcastError
from gateway.config import split_secrets
from gateway.protocol import CloseCode
from gateway.tickets import mint_ticket

__all__ = [
    "AuthenticationError",
    "BroadcastError",
    "Handler",
    "Realtime",
    "RealtimeClient",
    "RealtimeError",
    "UnreachableError",
    "broadcast_body",
    "mint_ticket",
]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]

TICKET_PATH = "/realtime/v1/ws-ticket"
WEBSOCKET_PATH = "/realtime/v1/websocket"
BROADCAST_PATH = "/realtime/v1/broadcast"
#: Bounds the connect of every request; an open socket has no timeout (heartbeats watch it).
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10)
#: Bounds a whole ticket or broadcast request.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
#: Longest part of a non-JSON error answer kept in a `BroadcastError`.
MAX_ERROR_TEXT = 200


class RealtimeError(WalcastError):
    """Base class of the client's errors."""


class AuthenticationError(RealtimeError):
    """The server refused the session or the organization (401/403): retrying cannot help."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"walcast refused the connection ({status}): {detail}")
        self.status = status
        self.detail = detail


class BroadcastError(RealtimeError):
    """`POST /realtime/v1/broadcast` did not answer 202.

    Attributes:
        status: the HTTP status walcast answered with.
        body: its JSON answer (usually `{"error": ..., "detail": ...}`), or the start of the
            text when the answer was not JSON.
    """

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"broadcast refused ({status}): {body}")
        self.status = status
        self.body = body


class UnreachableError(RealtimeError):
    """walcast could not be reached, or the connection failed before its answer was read."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"cannot reach walcast at {url} ({type(cause).__name__})")
        self.url = url


class _Transient(Exception):
    """A failure worth retrying after a back-off (server down, restarting, 5xx, used ticket)."""


async def _call(handler: Handler | None, message: dict[str, Any]) -> None:
    if handler is None:
        return
    try:
        result = handler(message)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("walcast client: a handler raised on a %s message", message.get("type"))


async def _error_detail(response: aiohttp.ClientResponse) -> Any:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return response.reason
    if isinstance(body, dict):
        return body.get("detail") or body.get("error")
    return body


class RealtimeClient:
    """One user's subscription to one organization, kept alive across drops and restarts.

    Args:
        base_url: walcast's URL, e.g. `http://127.0.0.1:4000` (`ws://` is derived from it).
        session_token: the user's session token (Better Auth, or a JWT session), sent as
            `Authorization: Bearer` to the ticket endpoint only.
        organization_id: the organization to subscribe to.
        on_change / on_broadcast / on_system: handlers for `postgres_changes`, `broadcast` and
            `system` messages (`ready`, `resync_required`, `error`).
        on_resync: called with the `resync_required` message (after `on_system`).
        since: resume from this cursor on the first connection (e.g. one saved to disk).
        tables: only these tables' changes (`["public.applications", "notes"]`).
        filters: row filters, `"<table>:<column>=<op>.<value>"` (AND within a table).
        snapshot: on a connection without a cursor (the first, or after `resync_required`),
            ask for the current rows first: `on_snapshot` gets each `snapshot` message, then
            `on_system` gets `snapshot-complete`, then changes follow.
        backoff_base / backoff_cap: reconnect delay, seconds: full jitter over
            `min(cap, base * 2**attempt)`; the attempt count resets after each `ready`.
        heartbeat: seconds between client pings; a peer that does not answer is dropped.
        session: an `aiohttp.ClientSession` to use (not closed by the client).
    """

    def __init__(
        self,
        base_url: str,
        session_token: str,
        organization_id: str,
        *,
        on_change: Handler | None = None,
        on_broadcast: Handler | None = None,
        on_system: Handler | None = None,
        on_resync: Handler | None = None,
        since: str | None = None,
        tables: Sequence[str] | None = None,
        filters: Sequence[str] = (),
        snapshot: bool = False,
        on_snapshot: Handler | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        heartbeat: float | None = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        self.base_url = base_url.rstrip("/")
        self.organization_id = organization_id
        self._token = session_token
        self._handlers: Mapping[str, Handler | None] = {
            "postgres_changes": on_change,
            "broadcast": on_broadcast,
            "system": on_system,
            "snapshot": on_snapshot,
        }
        self._subscription: list[tuple[str, str]] = []
        if tables is not None:
            self._subscription.append(("tables", ",".join(tables)))
        self._subscription += [("filter", item) for item in filters]
        self._snapshot = snapshot
        #: This connection asked for a snapshot that has not completed: until it does, a
        #: reconnect must ask again rather than resume.
        self._snapshotting = False
        self._on_resync = on_resync
        self._cursor = since
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._heartbeat = heartbeat
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self._wake = asyncio.Event()  #: set by close(): cuts a back-off sleep short
        self._stopped = asyncio.Event()
        self._runner: asyncio.Task[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Set while a socket is open and has received `ready`; cleared when it drops.
        self.ready = asyncio.Event()
        #: Successful connections so far (each one used a ticket of its own).
        self.connections = 0

    @property
    def cursor(self) -> str | None:
        """Where a reconnect resumes from: save it to resume across process restarts."""
        return self._cursor

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> RealtimeClient:
        """Start `run()` in the background; leaving the block closes the client."""
        self._task = asyncio.create_task(self.run(), name="walcast-client")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reconnecting, close the socket, and wait until `run()` has returned.

        Safe to call from a handler (then `run()` returns once the handler does).
        """
        self._closing = True
        self._wake.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close()
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            await asyncio.shield(self._stopped.wait())
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, RealtimeError):
                await task
        if runner is None or runner is not asyncio.current_task():
            await self._close_session()

    async def _close_session(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self) -> None:
        """Connect, dispatch, reconnect; returns after `close()`.

        Raises:
            AuthenticationError: the session or the membership was refused (401/403).
            RuntimeError: `run()` is already running.
        """
        if self._runner is not None:
            raise RuntimeError("RealtimeClient.run() is already running")
        self._runner = asyncio.current_task()
        self._stopped.clear()
        attempt = 0
        try:
            while not self._closing:
                try:
                    connected = await self._connect_once()
                except _Transient as exc:
                    log.info("walcast client: connection failed (%s)", exc)
                    connected = False
                if self._closing:
                    break
                attempt = 0 if connected else attempt + 1
                delay = full_jitter(attempt, self._backoff_base, self._backoff_cap)
                log.info("walcast client: reconnecting in %.2fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self.ready.clear()
            self._runner = None
            self._stopped.set()
            if self._closing:
                await self._close_session()

    # -- one connection ----------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        return self._session

    async def fetch_ticket(self) -> str:
        """A new ticket for this user and organization (valid 60 s, usable once).

        Raises:
            AuthenticationError: 401 (bad or expired session), 403 (not a member), 400.
        """
        try:
            async with self._http().post(
                self.base_url + TICKET_PATH,
                data=orjson.dumps({"organizationId": self.organization_id}),
                timeout=REQUEST_TIMEOUT,
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "Content-Type": "application/json",
                },
            ) as response:
                if response.status == 200:
                    body = await response.json(content_type=None)
                    return str(body["wsTicket"])
                detail = await _error_detail(response)
                if response.status in (400, 401, 403):
                    raise AuthenticationError(response.status, detail)
                raise _Transient(f"ticket endpoint answered {response.status}")
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            raise _Transient(f"ticket request failed: {type(exc).__name__}") from None

    async def _connect_once(self) -> bool:
        """One ticket, one socket, until it closes; True if it got as far as `ready`."""
        ticket = await self.fetch_ticket()
        params = [("ws_ticket", ticket), ("organizationId", self.organization_id)]
        if self._cursor is not None:
            params.append(("since", self._cursor))
        elif self._snapshot:
            params.append(("snapshot", "true"))
            self._snapshotting = True
        params += self._subscription
        try:
            ws = await self._http().ws_connect(
                self.base_url + WEBSOCKET_PATH, params=params, heartbeat=self._heartbeat
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (400, 403):
                # A wrong organization, or tables/filters the server refuses: not transient.
                raise AuthenticationError(
                    exc.status, "organization or subscription refused"
                ) from None
            # 401 here is a ticket that expired or was used meanwhile: get a new one.
            raise _Transient(f"handshake refused ({exc.status})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Transient(f"connect failed: {type(exc).__name__}") from None
        self._ws = ws
        self.connections += 1
        got_ready = False
        try:
            if self._closing:
                return False
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    parsed = orjson.loads(message.data)
                except orjson.JSONDecodeError:
                    continue  # "pong" and anything else that is not an event
                if isinstance(parsed, dict):
                    got_ready |= await self._dispatch(parsed)
        finally:
            self._ws = None
            self.ready.clear()
            await ws.close()
        if ws.close_code == CloseCode.ACCESS_REVOKED:
            log.info("walcast client: access changed; reconnecting with a fresh ticket")
        else:
            log.info("walcast client: socket closed (code %s)", ws.close_code)
        return got_ready

    async def _dispatch(self, message: dict[str, Any]) -> bool:
        kind = message.get("type")
        await _call(self._handlers.get(kind) if isinstance(kind, str) else None, message)
        if kind == "system":
            event = message.get("event")
            if event == "resync_required":
                # The old cursor is dead (expired, or of another epoch, which does not compare
                # with the new one's ids): the `ready` that follows gives the new one.
                self._cursor = None
                await _call(self._on_resync, message)
            elif event in ("ready", "snapshot-complete"):
                payload = message.get("payload")
                cursor = payload.get("cursor") if isinstance(payload, dict) else None
                if event == "snapshot-complete":
                    self._snapshotting = False
                if not self._snapshotting:
                    self._advance(cursor)
                if event == "ready":
                    self.ready.set()
                    return True
        elif kind == "snapshot":
            pass  # rows carry no cursor
        else:
            self._advance(message.get("id"))
        return False

    def _advance(self, cursor: Any) -> None:
        # Within one epoch, string order is commit order.
        if isinstance(cursor, str) and (self._cursor is None or cursor > self._cursor):
            self._cursor = cursor


def broadcast_body(
    organization_id: str,
    event: str,
    payload: Any = None,
    target_roles: list[str] | None = None,
    target_user_id: str | None = None,
) -> dict[str, Any]:
    """The JSON body of `POST /realtime/v1/broadcast`; unset targets are left out."""
    body: dict[str, Any] = {
        "organizationId": organization_id,
        "event": event,
        "payload": {} if payload is None else payload,
    }
    if target_roles is not None:
        body["targetRoles"] = list(target_roles)
    if target_user_id is not None:
        body["targetUserId"] = target_user_id
    return body


class Realtime:
    """The application's side: push custom events with `REALTIME_URL` and `ACCESS_TOKEN`.

    Every failure is a `RealtimeError`: `BroadcastError` when walcast answered but refused,
    `UnreachableError` when it could not be reached.

    Args:
        url: walcast's base URL (`REALTIME_URL`).
        access_token: `ACCESS_TOKEN`; when it lists several comma-separated secrets, the first
            is used.
        session: an `aiohttp.ClientSession` to use (not closed by `close()`).
    """

    def __init__(
        self,
        url: str,
        access_token: str,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        secrets = split_secrets(access_token)
        if not secrets:
            raise ValueError("access_token is empty")
        self.url = url.rstrip("/")
        self._secret = secrets[0]
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Realtime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def broadcast(
        self,
        organization_id: str,
        event: str,
        payload: Any = None,
        target_roles: list[str] | None = None,
        target_user_id: str | None = None,
    ) -> str:
        """Send a custom event to an organization; returns its WAL position (`"0/16B3748"`).

        Returns once PostgreSQL has committed the event: it is durable and will reach every
        subscriber it targets, ordered with the writes around it.

        Raises:
            BroadcastError: walcast answered anything but 202 (wrong token, undeclared
                namespace event, payload too large, ...).
            UnreachableError: walcast could not be reached.
        """
        body = broadcast_body(organization_id, event, payload, target_roles, target_user_id)
        return str((await self.post(body))["lsn"])

    async def post(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST `body` (see `broadcast_body`) to the broadcast API; returns the 202 answer,
        `{"accepted": true, "lsn": "0/16B3748"}`.

        Raises:
            BroadcastError: any other answer.
            UnreachableError: walcast could not be reached.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        try:
            async with self._session.post(
                self.url + BROADCAST_PATH,
                data=orjson.dumps(body),
                timeout=REQUEST_TIMEOUT,
                headers={
                    "Authorization": f"Bearer {self._secret}",
                    "Content-Type": "application/json",
                },
            ) as response:
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = (await response.text(errors="replace"))[:MAX_ERROR_TEXT]
                if response.status != 202 or not isinstance(answer, dict):
                    raise BroadcastError(response.status, answer)
                return answer
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UnreachableError(self.url, exc) from None
