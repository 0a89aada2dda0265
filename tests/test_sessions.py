"""Session stores (spec §6): Better Auth's tables on a real PostgreSQL, and JWT sessions."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import web
from psycopg.conninfo import conninfo_to_dict

import migrations
from gateway.config import ConfigError
from gateway.sessions import (
    BetterAuthSessionStore,
    ClaimNames,
    JwtSessionStore,
    Session,
    SessionStoreError,
    parse_roles,
    quote_ident,
)
from gateway.tickets import mint_ticket

NOW = 1_800_000_000.0
SECRET = "session-secret-0123456789abcdefghijklmnopqrstuvwxyz"


def test_parse_roles() -> None:
    assert parse_roles("owner, recruiter ,, admin,") == frozenset({"owner", "recruiter", "admin"})
    assert parse_roles(["a ", " b", "", 3]) == frozenset({"a", "b"})  # type: ignore[list-item]
    assert parse_roles("") == frozenset()
    assert parse_roles(None) == frozenset()


def test_quote_ident() -> None:
    assert quote_ident("session") == '"session"'
    assert quote_ident('we"ird') == '"we""ird"'


# -- Better Auth ---------------------------------------------------------------------------


def _connect_args(dsn: str) -> dict[str, Any]:
    """asyncpg takes URLs only; the test harness hands out libpq key=value strings."""
    params = conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password"}
    args: dict[str, Any] = {new: params[old] for old, new in names.items() if old in params}
    args["database"] = params.get("dbname")
    return args


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(**_connect_args(database_url))
    try:
        for name in migrations.schema_scripts():
            await conn.execute(migrations.read_script(name))
        await conn.execute(
            """
            INSERT INTO "user" (id, email) VALUES ('u_1', 'one@example.com'),
                ('u_2', 'two@example.com'), ('u_3', 'three@example.com');
            INSERT INTO organization (id, name) VALUES ('org_1', 'One'), ('org_2', 'Two');
            INSERT INTO "session" (id, token, "userId", "expiresAt", "activeOrganizationId")
            VALUES ('s_live', 'tok-live', 'u_1', now() + interval '1 hour', 'org_1'),
                   ('s_old', 'tok-old', 'u_1', now() - interval '1 second', 'org_1'),
                   ('s_noorg', 'tok-noorg', 'u_2', now() + interval '1 hour', NULL);
            INSERT INTO member (id, "organizationId", "userId", role)
            VALUES ('m_1', 'org_1', 'u_1', ' owner, recruiter ,,hiring-manager'),
                   ('m_2', 'org_2', 'u_1', 'member'),
                   ('m_3', 'org_1', 'u_2', '');
            """
        )
    finally:
        await conn.close()
    async with asyncpg.create_pool(
        **_connect_args(database_url), min_size=1, max_size=2
    ) as created:
        yield created


async def test_better_auth_valid_session(pool: asyncpg.Pool) -> None:
    store = BetterAuthSessionStore(pool)
    session = await store.authenticate("tok-live")
    assert session == Session(user_id="u_1", session_id="s_live", active_organization_id="org_1")


async def test_better_auth_session_without_active_org(pool: asyncpg.Pool) -> None:
    session = await BetterAuthSessionStore(pool).authenticate("tok-noorg")
    assert session is not None
    assert session.active_organization_id is None


async def test_better_auth_signed_cookie_token(pool: asyncpg.Pool) -> None:
    session = await BetterAuthSessionStore(pool).authenticate("tok-live.c2lnbmF0dXJl%3D")
    assert session is not None
    assert session.session_id == "s_live"


@pytest.mark.parametrize(
    "token", ["tok-old", "tok-old.sig", "unknown", "", ".", "tok-live-but-longer", "x" * 10000]
)
async def test_better_auth_refuses(pool: asyncpg.Pool, token: str) -> None:
    assert await BetterAuthSessionStore(pool).authenticate(token) is None


async def test_better_auth_roles(pool: asyncpg.Pool) -> None:
    store = BetterAuthSessionStore(pool)
    assert await store.roles_of("u_1", "org_1") == frozenset(
        {"owner", "recruiter", "hiring-manager"}
    )
    assert await store.roles_of("u_1", "org_2") == frozenset({"member"})
    assert await store.roles_of("u_2", "org_1") == frozenset()  # a member without roles
    assert await store.roles_of("u_2", "org_2") is None  # not a member
    assert await store.roles_of("u_3", "org_1") is None
    assert await store.roles_of("nobody", "nowhere") is None


async def test_better_auth_tables_in_another_schema(database_url: str) -> None:
    conn = await asyncpg.connect(**_connect_args(database_url))
    try:
        await conn.execute(
            """
            CREATE SCHEMA "Auth";
            CREATE TABLE "Auth"."session" (id text, token text, "userId" text,
                "expiresAt" timestamptz, "activeOrganizationId" text);
            CREATE TABLE "Auth".member ("organizationId" text, "userId" text, role text);
            INSERT INTO "Auth"."session" VALUES ('s', 't', 'u', now() + interval '1 hour', 'o');
            INSERT INTO "Auth".member VALUES ('o', 'u', 'admin,owner');
            """
        )
    finally:
        await conn.close()
    async with asyncpg.create_pool(**_connect_args(database_url), min_size=1, max_size=1) as pool:
        store = BetterAuthSessionStore(pool, schema="Auth")
        assert await store.authenticate("t") == Session("u", "s", "o")
        assert await store.roles_of("u", "o") == frozenset({"admin", "owner"})


# -- JWT -----------------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "u_1",
        "org": "org_1",
        "roles": ["owner", "recruiter"],
        "sid": "s_1",
        "exp": int(NOW) + 3600,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _token(key: str = SECRET, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), key, algorithm="HS256", headers=headers)


def _store(**options: Any) -> JwtSessionStore:
    options.setdefault("clock", _Clock(NOW))
    return JwtSessionStore(SECRET, **options)


async def test_jwt_valid_session() -> None:
    store = _store()
    session = await store.authenticate(_token())
    assert session == Session(
        user_id="u_1",
        session_id="s_1",
        active_organization_id="org_1",
        roles=frozenset({"owner", "recruiter"}),
    )
    assert await store.roles_of("u_1", "org_1", session=session) == {"owner", "recruiter"}
    assert await store.roles_of("u_1", "org_2", session=session) is None
    assert await store.roles_of("u_2", "org_1", session=session) is None
    # Without the session: the latest verified token of that user for that org.
    assert await store.roles_of("u_1", "org_1") == {"owner", "recruiter"}
    assert await store.roles_of("u_1", "org_2") is None


async def test_jwt_remembered_roles_expire_with_the_token() -> None:
    clock = _Clock(NOW)
    store = _store(clock=clock, leeway=0)
    assert await store.authenticate(_token(exp=int(NOW) + 10)) is not None
    clock.now = NOW + 10
    assert await store.roles_of("u_1", "org_1") is None


async def test_jwt_comma_separated_roles_and_fallback_org_claim() -> None:
    token = _token(org=None, activeOrganizationId="org_9", roles="a, b ,")
    session = await _store().authenticate(token)
    assert session is not None
    assert session.active_organization_id == "org_9"
    assert session.roles == frozenset({"a", "b"})


async def test_jwt_without_roles_or_org() -> None:
    session = await _store().authenticate(_token(roles=None, org=None, sid=None))
    assert session == Session("u_1", None, None, None)
    no_roles = await _store().authenticate(_token(roles=None))
    assert no_roles is not None
    assert no_roles.roles == frozenset()


async def test_jwt_claim_mapping() -> None:
    store = _store(
        claims={"user": "uid", "organization": "tenant", "roles": "perm", "session": "s"}
    )
    token = _token(
        sub=None, org=None, roles=None, sid=None, uid="u_7", tenant="t_1", perm=["x"], s="z"
    )
    assert await store.authenticate(token) == Session("u_7", "z", "t_1", frozenset({"x"}))
    with pytest.raises(ConfigError, match="unknown JWT claim mapping keys: usr"):
        ClaimNames.from_mapping({"usr": "uid"})


@pytest.mark.parametrize(
    "token",
    [
        _token(key="another-secret-0123456789abcdefghijklmnopqrstuvwxyz"),
        _token(exp=int(NOW) - 10),
        _token(exp=None),
        _token(exp="soon"),
        _token(nbf=int(NOW) + 600),
        _token(sub=None),
        _token(sub=5),
        _token(roles=7),
        _token(sid=["s"]),
        _token(aud="walcast:ws"),
        _token(aud=["x", "walcast:ws"]),
        "not a token",
        "",
        jwt.encode(_claims(), SECRET, algorithm="HS384"),
    ],
)
async def test_jwt_refuses(token: str) -> None:
    assert await _store().authenticate(token) is None


async def test_jwt_refuses_alg_none() -> None:
    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(_claims())}."
    assert await _store().authenticate(token) is None


async def test_jwt_refuses_walcast_tickets() -> None:
    ticket = mint_ticket(SECRET, user_id="u_1", organization_id="org_1", roles=["owner"], now=NOW)
    assert await _store().authenticate(ticket) is None


async def test_jwt_audience_and_issuer() -> None:
    store = _store(audience="my-app", issuer="https://idp.example")
    good = _token(aud="my-app", iss="https://idp.example")
    assert await store.authenticate(good) is not None
    assert await store.authenticate(_token(aud="other", iss="https://idp.example")) is None
    assert await store.authenticate(_token(aud="my-app", iss="https://evil.example")) is None
    assert await store.authenticate(_token()) is None


def test_jwt_needs_a_key_source() -> None:
    with pytest.raises(ConfigError, match="need a secret"):
        JwtSessionStore()


def _oct_jwk(secret: str, kid: str) -> dict[str, Any]:
    k = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
    return {"kty": "oct", "kid": kid, "k": k, "alg": "HS256"}


async def test_jwks_file_with_kid_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_oct_jwk(SECRET, "k1")]}))
    store = JwtSessionStore(None, str(path), clock=_Clock(NOW))
    assert await store.authenticate(_token(headers={"kid": "k1"})) is not None
    assert await store.authenticate(_token(headers={"kid": "k2"})) is None
    # A single key also verifies tokens without a kid.
    assert await store.authenticate(_token()) is not None

    new_secret = "rotated-secret-0123456789abcdefghijklmnopqrstuvwx"
    path.write_text(json.dumps({"keys": [_oct_jwk(SECRET, "k1"), _oct_jwk(new_secret, "k2")]}))
    import os

    os.utime(path, (NOW, NOW))
    token = _token(key=new_secret, headers={"kid": "k2"})
    assert await store.authenticate(token) is not None
    # Two keys: a token without kid is ambiguous.
    assert await store.authenticate(_token()) is None


def test_jwks_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read JWKS"):
        JwtSessionStore(None, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a usable JWKS"):
        JwtSessionStore(None, str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="not a usable JWKS"):
        JwtSessionStore(None, str(empty))


def test_jwks_rsa_keys_without_cryptography(tmp_path: Path) -> None:
    if jwt.algorithms.has_crypto:
        pytest.skip("cryptography is installed")
    path = tmp_path / "rsa.json"
    path.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}))
    with pytest.raises(ConfigError, match="cryptography"):
        JwtSessionStore(None, str(path))


async def test_jwks_file_rs256(tmp_path: Path) -> None:
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    public_jwk.update(kid="r1", alg="RS256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk]}))
    store = JwtSessionStore(None, str(path), clock=_Clock(NOW))
    token = jwt.encode(_claims(), private_key, algorithm="RS256", headers={"kid": "r1"})
    assert await store.authenticate(token) is not None
    # Algorithm confusion: an HS256 token "signed" with the public key must not pass.
    forged = _token(key=json.dumps(public_jwk), headers={"kid": "r1"})
    assert await store.authenticate(forged) is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_jwks_url_is_fetched_and_cached() -> None:
    requests: list[str] = []
    keys = {"keys": [_oct_jwk(SECRET, "k1")]}

    async def jwks(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.json_response(keys)

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        url = f"http://127.0.0.1:{port}/jwks.json"
        store = JwtSessionStore.from_config(jwks=url, clock=_Clock(NOW))
        assert await store.authenticate(_token(headers={"kid": "k1"})) is not None
        assert await store.authenticate(_token(headers={"kid": "k1"})) is not None
        assert len(requests) == 1
        # Unknown kid right after a fetch: no refetch storm.
        assert await store.authenticate(_token(headers={"kid": "k9"})) is None
        assert len(requests) == 1
    finally:
        await runner.cleanup()


async def test_jwks_url_unreachable() -> None:
    url = f"http://127.0.0.1:{_free_port()}/jwks.json"
    store = JwtSessionStore(None, None, jwks_url=url, http_timeout=2, clock=_Clock(NOW))
    with pytest.raises(SessionStoreError) as info:
        await store.authenticate(_token(headers={"kid": "k1"}))
    assert info.value.status == 503


def test_from_config_picks_file_or_url(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_oct_jwk(SECRET, "k1")]}))
    assert JwtSessionStore.from_config(jwks=str(path))._jwks_path == str(path)
    assert JwtSessionStore.from_config(jwks="https://idp.example/jwks")._jwks_url is not None
    assert JwtSessionStore.from_config(secret=SECRET)._secret == SECRET
