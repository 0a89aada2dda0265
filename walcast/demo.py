"""`walcast demo`: the one-command first run.

With no `DATABASE_URL` (or `--database-url`), it starts an embedded PostgreSQL
(`walcast.embedded`), applies the migrations and the demo schema (a small recruiting app:
candidates, applications, notifications), creates one organization with three users (owner,
recruiter, hiring manager) and their Better Auth sessions, and runs walcast with the demo
realtime config (`walcast/demo_config.toml`) and a random `ACCESS_TOKEN`. A background writer
commits demo rows every `--interval` seconds and, like an application would, pushes
`screening:*` broadcasts through the broadcast API (`walcast.client.Realtime`). The live page at
`/` (gateway/static) lets you pick a user, watch the events arrive with that user's roles and
masks, and fire a broadcast of your own.

The terminal shows what matters to a first run (the URL, warnings); the per-request access log
is off unless `--access-log` is given.

Two demo-only endpoints back the page; nothing but `walcast demo` mounts them:

- `GET /demo/api/users`: the demo organization, its users **with their session tokens** (so the
  page can ask for tickets as any of them), and the realtime config the page explains;
- `POST /demo/api/broadcast`: forwards `{event, payload, targetRoles?, targetUserId?}` to the real
  broadcast API server-side, so `ACCESS_TOKEN` never reaches the browser.

Ctrl-C (SIGINT), SIGTERM or SIGHUP closes the sockets, stops the reader and the writer, stops
the embedded server and deletes its directory. Against a server of your own (`--database-url`)
the demo uses its own slot and publication (`walcast_demo`) and drops the slot on exit, so
nothing is left retaining WAL; the demo tables and rows stay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import signal
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import psycopg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import migrations
from gateway.accesslog import ACCESS_LOGGER
from gateway.config import RealtimeConfig, Settings, parse_realtime_config
from gateway.state import STATE
from walcast.app import make_app
from walcast.client import BroadcastError, Realtime, RealtimeError, UnreachableError
from walcast.embedded import EmbeddedPostgres, EmbeddedUnavailable, start_embedded
from walcast.serve import UsageError, run_until_stopped

__all__ = ["DEMO_SLOT", "DemoOrg", "DemoUser", "DemoWriter", "load_demo_config", "run_demo"]

log = logging.getLogger(__name__)

DEMO_SLOT = "walcast_demo"
ORG_ID = "org_acme"
ORG_NAME = "Acme Recruiting"
#: (id, name, roles) of the demo users; roles as Better Auth stores them (comma-separated).
USERS = (
    ("u_olivia", "Olivia Owens", "owner"),
    ("u_riley", "Riley Reyes", "recruiter"),
    ("u_harper", "Harper Hale", "hiring-manager"),
)
STAGES = ("applied", "screening", "interview", "offer", "hired")
FINAL_STAGES = ("hired", "rejected")
READY_TIMEOUT = 60.0
#: Ctrl-C, `kill`, and closing the terminal: each stops the demo cleanly.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_FIRST = ("Ada", "Grace", "Alan", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances")
_LAST = ("Lovelace", "Hopper", "Turing", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen")
_DOMAINS = ("example.com", "mail.example.org", "example.net")


@dataclass(frozen=True)
class DemoUser:
    id: str
    name: str
    roles: str
    session_token: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "roles": self.roles.split(","),
            "sessionToken": self.session_token,
        }


@dataclass(frozen=True)
class DemoOrg:
    id: str
    name: str
    users: tuple[DemoUser, ...]

    def user_ids(self, role: str) -> list[str]:
        return [user.id for user in self.users if role in user.roles.split(",")]


def load_demo_config() -> RealtimeConfig:
    """The realtime config shipped as `walcast/demo_config.toml`."""
    text = resources.files("walcast").joinpath("demo_config.toml").read_text(encoding="utf-8")
    return parse_realtime_config(tomllib.loads(text), "walcast/demo_config.toml")


def static_dir() -> Path:
    """The live page's files (gateway/static), served at `/` and `/static/`."""
    return Path(str(resources.files("gateway").joinpath("static")))


def seed_demo(dsn: str) -> DemoOrg:
    """Create (or reuse) the demo organization and users; every run gets fresh session tokens."""
    users = []
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO organization (id, name, slug) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (ORG_ID, ORG_NAME, "acme"),
        )
        for user_id, name, roles in USERS:
            email = f"{name.split()[0].lower()}@acme.example"
            conn.execute(
                'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING',
                (user_id, name, email),
            )
            conn.execute(
                'INSERT INTO member (id, "organizationId", "userId", role)'
                " VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role",
                (f"mem_{user_id}", ORG_ID, user_id, roles),
            )
            token = secrets.token_urlsafe(32)
            conn.execute(
                'INSERT INTO "session" (id, token, "userId", "expiresAt", "activeOrganizationId")'
                " VALUES (%s, %s, %s, now() + interval '1 day', %s)",
                (f"ses_{secrets.token_hex(8)}", token, user_id, ORG_ID),
            )
            users.append(DemoUser(user_id, name, roles, token))
    return DemoOrg(ORG_ID, ORG_NAME, tuple(users))


# -- the writer ----------------------------------------------------------------------------------


@dataclass
class _Application:
    id: str
    candidate_id: str
    candidate: str
    stage: str
    assignee: str
    progress: int = 0  #: of the screening, in percent (screening:progress broadcasts)


@dataclass
class DemoWriter:
    """Commits one demo change per `step()`: new candidates, stage moves, deletions,
    notifications, and `screening:*` broadcasts through `broadcast` (the public API).

    It only touches rows it created itself, and keeps at most `max_in_flight` applications open
    so a long-running demo stays small.
    """

    org: DemoOrg
    broadcast: Callable[[dict[str, Any]], Awaitable[None]]  #: through the public broadcast API
    rng: random.Random = field(default_factory=random.Random)
    max_in_flight: int = 8
    in_flight: list[_Application] = field(default_factory=list)
    finished: list[_Application] = field(default_factory=list)

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> str:
        """One change; returns the name of what it did (for debug logs and tests)."""
        roll = self.rng.random()
        if len(self.in_flight) < 2 or (roll < 0.3 and len(self.in_flight) < self.max_in_flight):
            await self._new_candidate(conn)
            return "insert"
        if self.finished and roll < 0.45:
            await self._delete(conn)
            return "delete"
        screening = [
            app for app in self.in_flight if app.stage == "screening" and app.progress < 90
        ]
        if screening and roll < 0.6:
            app = self.rng.choice(screening)
            app.progress += 30
            await self.broadcast(
                {
                    "event": "screening:progress",
                    "payload": {"applicationId": app.id, "percent": app.progress},
                }
            )
            return "broadcast"
        await self._advance(conn, self.rng.choice(self.in_flight))
        return "update"

    async def _new_candidate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        candidate_id, app_id = f"cnd_{secrets.token_hex(4)}", f"app_{secrets.token_hex(4)}"
        creator = rng.choice(self.org.user_ids("recruiter") + self.org.user_ids("owner"))
        assignee = rng.choice(self.org.user_ids("hiring-manager") + self.org.user_ids("recruiter"))
        ssn = f"{rng.randint(100, 899):03d}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
        async with conn.transaction():
            await conn.execute(
                'INSERT INTO candidates (id, "organizationId", name, email, ssn, phone,'
                ' "createdBy") VALUES (%s, %s, %s, %s, %s, %s, %s)',
                (
                    candidate_id,
                    self.org.id,
                    f"{first} {last}",
                    f"{first}.{last}@{rng.choice(_DOMAINS)}".lower(),
                    ssn,
                    f"+1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
                    creator,
                ),
            )
            await conn.execute(
                'INSERT INTO applications (id, "organizationId", "candidateId", stage,'
                ' "assigneeId") VALUES (%s, %s, %s, %s, %s)',
                (app_id, self.org.id, candidate_id, "applied", assignee),
            )
            await self._notify(conn, assignee, f"New application from {first} {last}")
        self.in_flight.append(
            _Application(app_id, candidate_id, f"{first} {last}", "applied", assignee)
        )

    async def _advance(self, conn: psycopg.AsyncConnection[Any], app: _Application) -> None:
        before = app.stage
        rejected = before != "applied" and self.rng.random() < 0.2
        app.stage = "rejected" if rejected else STAGES[STAGES.index(before) + 1]
        score = round(self.rng.uniform(40, 99), 2)
        async with conn.transaction():
            await conn.execute(
                'UPDATE applications SET stage = %s, score = %s, "updatedAt" = now() WHERE id = %s',
                (app.stage, score, app.id),
            )
            await self._notify(conn, app.assignee, f"{app.candidate} moved to {app.stage}")
        if app.stage in FINAL_STAGES:
            self.in_flight.remove(app)
            self.finished.append(app)
        if app.stage == "screening":
            await self.broadcast(
                {"event": "screening:started", "payload": {"applicationId": app.id}}
            )
        elif before == "screening":
            await self.broadcast(
                {
                    "event": "screening:complete",
                    "payload": {"applicationId": app.id, "passed": not rejected, "score": score},
                }
            )

    async def _delete(self, conn: psycopg.AsyncConnection[Any]) -> None:
        app = self.finished.pop(0)
        async with conn.transaction():
            await conn.execute("DELETE FROM applications WHERE id = %s", (app.id,))
            await conn.execute("DELETE FROM candidates WHERE id = %s", (app.candidate_id,))

    async def _notify(self, conn: psycopg.AsyncConnection[Any], user: str, message: str) -> None:
        await conn.execute(
            'INSERT INTO notifications ("organizationId", "userId", message) VALUES (%s, %s, %s)',
            (self.org.id, user, message),
        )


# -- the demo endpoints --------------------------------------------------------------------------


@dataclass
class DemoState:
    org: DemoOrg
    interval: float
    access_token: str  #: stays server-side: the page never sees it
    url: str = ""
    #: Set once the site listens (the writer's broadcasts go through the public API).
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    realtime: Realtime | None = None

    def listen(self, url: str) -> None:
        """The site listens at `url`: broadcasts may go through its public API from now on."""
        self.url = url
        self.realtime = Realtime(url, self.access_token)
        self.listening.set()

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send `body` (event, payload, targets) to the demo organization; walcast's answer.

        Raises:
            RealtimeError: refused (`BroadcastError`) or not reached (`UnreachableError`).
        """
        await self.listening.wait()
        assert self.realtime is not None
        return await self.realtime.post({"organizationId": self.org.id, **body})

    async def close(self) -> None:
        if self.realtime is not None:
            await self.realtime.close()


DEMO = web.AppKey("walcast_demo", DemoState)
routes = web.RouteTableDef()


class DemoBroadcast(BaseModel):
    """What the page may send; the organization is always the demo's."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(min_length=1, max_length=100)
    payload: Any = Field(default_factory=dict)
    targetRoles: list[str] | None = None
    targetUserId: str | None = Field(default=None, min_length=1, max_length=100)


def _config_summary(config: RealtimeConfig) -> dict[str, Any]:
    tables = {
        table.table_name: {
            "requiredRoles": list(table.requiredRoles),
            "userColumn": table.userColumn,
            "ownerColumn": table.ownerColumn,
            "masking": {
                column: {
                    "type": rule.type,
                    "showRoles": list(rule.show.roles),
                    "showOwner": rule.show.or_ == "owner",
                }
                for column, rule in table.masking.items()
            },
        }
        for table in config.tables.values()
    }
    namespaces = {
        name: {
            "events": list(ns.events) if ns.events is not None else None,
            "requiredRoles": list(ns.requiredRoles),
        }
        for name, ns in config.namespaces.items()
    }
    return {"tables": tables, "namespaces": namespaces}


@routes.get("/demo/api/users")
async def demo_users(request: web.Request) -> web.Response:
    """Demo only: hands out the demo users' session tokens so the page can act as any of them."""
    demo = request.app[DEMO]
    return web.json_response(
        {
            "organization": {"id": demo.org.id, "name": demo.org.name},
            "users": [user.as_json() for user in demo.org.users],
            "config": _config_summary(request.app[STATE].config),
        },
        headers={"Cache-Control": "no-store"},
    )


@routes.post("/demo/api/broadcast")
async def demo_broadcast(request: web.Request) -> web.Response:
    """Demo only: a custom broadcast from the page, sent server-side with `ACCESS_TOKEN`."""
    try:
        ask = DemoBroadcast.model_validate(orjson.loads(await request.read()))
    except orjson.JSONDecodeError as exc:
        return web.json_response({"error": "invalid JSON", "detail": str(exc)}, status=400)
    except ValidationError as exc:
        detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return web.json_response({"error": "invalid body", "detail": detail}, status=400)
    try:
        answer = await request.app[DEMO].broadcast(ask.model_dump(exclude_none=True))
    except BroadcastError as exc:  # the real API's refusal, relayed as it is
        return web.json_response(exc.body, status=exc.status)
    except UnreachableError as exc:
        return web.json_response({"error": "bad gateway", "detail": str(exc)}, status=502)
    return web.json_response(answer, status=202)


async def _demo_context(app: web.Application) -> AsyncIterator[None]:
    """Owns the demo's broadcast client and the writer task (cancelled, then awaited)."""
    demo = app[DEMO]
    writer = asyncio.create_task(_write_forever(app), name="walcast-demo-writer")
    try:
        yield
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await demo.close()


async def _write_forever(app: web.Application) -> None:
    demo, state = app[DEMO], app[STATE]
    dsn = state.settings.database_url
    assert dsn is not None

    async def broadcast(body: dict[str, Any]) -> None:
        try:
            await demo.broadcast(body)
        except RealtimeError as exc:
            log.warning("demo broadcast failed: %s", exc)

    writer = DemoWriter(demo.org, broadcast)
    await demo.listening.wait()
    await state.readiness.wait()
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while True:
                    action = await writer.step(conn)
                    log.debug("demo write: %s", action)
                    await asyncio.sleep(demo.interval)  # pacing, not synchronization
        except (psycopg.Error, OSError) as exc:
            log.warning("demo writer: %s; retrying", type(exc).__name__)
            await asyncio.sleep(max(demo.interval, 1.0))


# -- running it ----------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _page_url(host: str, port: int) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}/"
    if address.is_unspecified:
        return f"http://127.0.0.1:{port}/"
    return f"http://[{host}]:{port}/" if address.version == 6 else f"http://{host}:{port}/"


async def _serve(
    settings: Settings, config: RealtimeConfig, org: DemoOrg, interval: float, *, embedded: bool
) -> None:
    app = make_app(settings, config, static_dir=static_dir())
    app[DEMO] = demo = DemoState(org, interval, settings.signing_secret)
    app.add_routes(routes)
    app.cleanup_ctx.append(_demo_context)

    async def started(url: str, stop: asyncio.Event) -> None:
        demo.listen(_page_url(settings.host, int(url.rsplit(":", 1)[1])))
        await _until_ready(app, stop)
        if stop.is_set():
            return
        if not _is_loopback(settings.host):
            log.warning("the demo page hands out session tokens: keep it on a trusted network")
        stopping = "stops it and deletes the demo data" if embedded else "stops it"
        print(f"walcast demo: open {demo.url}  (Ctrl-C {stopping})", flush=True)

    await run_until_stopped(app, settings.host, settings.port, started, signals=_STOP_SIGNALS)


async def _until_ready(app: web.Application, stop: asyncio.Event) -> None:
    state = app[STATE]
    waiters = [asyncio.ensure_future(state.readiness.wait()), asyncio.ensure_future(stop.wait())]
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    if not done:
        raise UsageError(f"walcast did not become ready: {state.readiness.reason}")


def _drop_slot(dsn: str, slot: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND NOT active",
            (slot,),
        )


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_demo(args: argparse.Namespace) -> None:
    """The `walcast demo` command; returns once stopped, with every temporary file removed."""
    if not args.interval > 0:
        raise UsageError("--interval must be a positive number of seconds")
    # Until the event loop takes over, SIGTERM and SIGHUP raise, so the finally blocks run.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in _STOP_SIGNALS[1:]}
    embedded: EmbeddedPostgres | None = None
    dsn: str | None = None
    try:
        env = Settings.from_env(database_url=args.database_url, host=args.host, port=args.port)
        dsn = env.database_url
        if dsn is None:
            try:
                embedded = start_embedded()
            except EmbeddedUnavailable as exc:
                raise UsageError(str(exc)) from None
            dsn = embedded.dsn
        else:
            log.info("demo: using the PostgreSQL from DATABASE_URL/--database-url")
        migrations.apply(dsn, demo=True)
        org = seed_demo(dsn)
        settings = Settings(
            database_url=dsn,
            access_tokens=(secrets.token_urlsafe(32),),
            host=env.host,
            port=env.port,
            slot=DEMO_SLOT,
            publication=DEMO_SLOT,
        )
        config = load_demo_config()
        if not args.access_log:  # one line per request drowns the demo's own messages
            ACCESS_LOGGER.setLevel(logging.WARNING)
        asyncio.run(_serve(settings, config, org, args.interval, embedded=embedded is not None))
    finally:
        # A second Ctrl-C must not interrupt the clean-up and leave the data directory behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if embedded is not None:
            embedded.stop()
        elif dsn is not None:
            _drop_slot(dsn, DEMO_SLOT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
