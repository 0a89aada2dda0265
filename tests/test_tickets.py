"""Tickets (spec §5): mint/verify with an injected clock, rotation, and single-use jti stores."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis

from gateway.tickets import (
    AUDIENCE,
    LEEWAY_SECONDS,
    GatewayError,
    JtiStoreFullError,
    MemoryJtiStore,
    RedisJtiStore,
    StaleTicketError,
    TicketError,
    mint_ticket,
    redeem_ticket,
    verify_ticket,
)

SECRET = "s3cret-for-tests-0123456789abcdefghijkl-0123456789abcdefghijklmnopq"
OLD_SECRET = "old-secret-for-tests-0123456789abcdefgh-0123456789abcdefghijklmnop"
NOW = 1_800_000_000.0


def _mint(**overrides: Any) -> str:
    secret = overrides.pop("secret", SECRET)
    args: dict[str, Any] = {
        "user_id": "u_1",
        "organization_id": "org_1",
        "roles": ["recruiter", "owner"],
        "now": NOW,
    }
    args.update(overrides)
    return mint_ticket(secret, **args)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _payload(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "u_1",
        "org": "org_1",
        "roles": ["recruiter"],
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": "j-1",
        "aud": AUDIENCE,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not _DROP}


_DROP = object()


def _reason(token: str, secrets: tuple[str, ...] = (SECRET,), now: float = NOW) -> str:
    with pytest.raises(TicketError) as info:
        verify_ticket(token, secrets, now=now)
    assert info.value.status == 401
    assert isinstance(info.value, GatewayError)
    # Never echo the credential or the secret.
    assert len(token) < 5 or token not in str(info.value)
    assert all(secret not in str(info.value) for secret in secrets)
    return info.value.reason


# -- mint + verify -------------------------------------------------------------------------


def test_valid_ticket_round_trips() -> None:
    token = _mint(session_id="sess_1")
    claims = verify_ticket(token, [SECRET], now=NOW + 30)
    assert claims.user_id == "u_1"
    assert claims.organization_id == "org_1"
    assert claims.roles == frozenset({"recruiter", "owner"})
    assert claims.session_id == "sess_1"
    assert claims.expires_at == NOW + 60
    assert len(claims.jti) >= 16


def test_minted_claims_match_the_spec() -> None:
    payload = _payload(_mint(roles=["a", "b", "a"]))
    assert set(payload) == {"sub", "org", "roles", "iat", "exp", "jti", "aud"}
    assert payload["aud"] == "walcast:ws"
    assert payload["exp"] - payload["iat"] == 60
    assert payload["roles"] == ["a", "b"]
    header = json.loads(base64.urlsafe_b64decode(_mint().split(".")[0] + "=="))
    assert header["alg"] == "HS256"


def test_any_language_can_mint_a_ticket() -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert verify_ticket(token, [SECRET], now=NOW).jti == "j-1"


def test_jtis_are_unique() -> None:
    assert len({verify_ticket(_mint(), [SECRET], now=NOW).jti for _ in range(50)}) == 50


def test_session_id_is_optional() -> None:
    assert verify_ticket(_mint(), [SECRET], now=NOW).session_id is None


def test_empty_roles_are_allowed() -> None:
    assert verify_ticket(_mint(roles=[]), [SECRET], now=NOW).roles == frozenset()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"roles": "owner"}, TypeError),
        ({"roles": ["owner", 3]}, TypeError),
        ({"user_id": ""}, ValueError),
        ({"organization_id": ""}, ValueError),
        ({"ttl": 0}, ValueError),
        ({"secret": ""}, ValueError),
    ],
)
def test_mint_refuses_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        _mint(**kwargs)


# -- time ----------------------------------------------------------------------------------


def test_expired_ticket() -> None:
    token = _mint()
    verify_ticket(token, [SECRET], now=NOW + 60)  # inside the leeway
    assert _reason(token, now=NOW + 60 + LEEWAY_SECONDS) == "ticket expired"
    assert _reason(token, now=NOW + 3600) == "ticket expired"
    assert LEEWAY_SECONDS <= 2


def test_ticket_from_the_future() -> None:
    token = _mint(now=NOW + 30)
    verify_ticket(token, [SECRET], now=NOW + 30 - LEEWAY_SECONDS)
    assert _reason(token, now=NOW) == "ticket issued in the future"


def test_lifetime_is_capped() -> None:
    token = _mint(ttl=3600)
    assert _reason(token) == "ticket lifetime too long"
    assert verify_ticket(token, [SECRET], now=NOW, max_lifetime=3600).user_id == "u_1"


# -- signatures ----------------------------------------------------------------------------


def test_wrong_signature() -> None:
    assert _reason(_mint(secret="another-secret-entirely-0123456789abc")) == "bad signature"


def test_tampered_payload() -> None:
    header, _, signature = _mint().split(".")
    forged = _claims(roles=["owner", "admin"])
    token = f"{header}.{_b64(json.dumps(forged).encode())}.{signature}"
    assert _reason(token) == "bad signature"


def test_tampered_signature() -> None:
    token = _mint()
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert _reason(flipped) == "bad signature"


def test_alg_none_is_refused() -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    assert _reason(f"{header}.{body}.") == "unsupported algorithm"
    assert _reason(f"{header}.{body}.{_b64(b'x')}") == "unsupported algorithm"


def test_other_hmac_algorithms_are_refused() -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS512")
    assert _reason(token) == "unsupported algorithm"


@pytest.mark.parametrize(
    "token",
    ["", "x", "a.b", "a.b.c", "....", "é.é.é", "x" * 5000, "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.x"],
)
def test_malformed_tokens(token: str) -> None:
    assert _reason(token) in {"malformed ticket", "bad signature"}


def test_non_object_payload() -> None:
    token = jwt.api_jws.encode(b"[1, 2]", SECRET, algorithm="HS256")
    assert _reason(token) == "malformed ticket"


def test_rotation_sign_with_first_accept_any() -> None:
    old_token = _mint(secret=OLD_SECRET)
    new_token = _mint()
    rotated = (SECRET, OLD_SECRET)
    assert verify_ticket(old_token, rotated, now=NOW).user_id == "u_1"
    assert verify_ticket(new_token, rotated, now=NOW).user_id == "u_1"
    # After the old secret is dropped, its tickets stop working.
    assert _reason(old_token, secrets=(SECRET,)) == "bad signature"


def test_no_secret_configured() -> None:
    assert _reason(_mint(), secrets=()) == "no ticket secret configured"


# -- claims --------------------------------------------------------------------------------


def test_wrong_audience() -> None:
    for audience in ("walcast:other", ["walcast:ws"], None):
        token = jwt.encode(_claims(aud=audience), SECRET, algorithm="HS256")
        assert _reason(token) == "wrong audience"


@pytest.mark.parametrize("claim", ["sub", "org", "roles", "iat", "exp", "jti", "aud"])
def test_missing_claims(claim: str) -> None:
    token = jwt.encode(_claims(**{claim: _DROP}), SECRET, algorithm="HS256")
    assert _reason(token) == f"missing claim: {claim}"


@pytest.mark.parametrize(
    "claim, value",
    [
        ("sub", 7),
        ("sub", ""),
        ("org", ["org_1"]),
        ("jti", None),
        ("jti", "j" * 500),
        ("roles", "recruiter"),
        ("roles", ["ok", 1]),
        ("iat", "1800000000"),
        ("exp", True),
        ("sid", 5),
    ],
)
def test_claims_with_wrong_types(claim: str, value: Any) -> None:
    token = jwt.encode(_claims(**{claim: value}), SECRET, algorithm="HS256")
    assert _reason(token) == f"invalid claim: {claim}"


# -- single use ----------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_store_refuses_a_reused_jti() -> None:
    store = MemoryJtiStore(clock=_Clock(NOW))
    token = _mint()
    await redeem_ticket(token, [SECRET], store, now=NOW)
    with pytest.raises(TicketError) as info:
        await redeem_ticket(token, [SECRET], store, now=NOW + 1)
    assert info.value.reason == "ticket already used"
    await redeem_ticket(_mint(), [SECRET], store, now=NOW)


async def test_memory_store_forgets_expired_entries() -> None:
    clock = _Clock(NOW)
    store = MemoryJtiStore(clock=clock)
    assert await store.claim("a", NOW + 60, NOW)
    assert await store.claim("b", NOW + 10, NOW)
    assert not await store.claim("a", NOW + 60, NOW)
    clock.now = NOW + 10 + LEEWAY_SECONDS
    assert await store.claim("c", NOW + 70, NOW)
    assert len(store) == 2  # "b" pruned
    clock.now = NOW + 60 + LEEWAY_SECONDS
    assert await store.claim("a", NOW + 120, NOW)  # the old "a" could no longer verify anyway


async def test_memory_store_is_bounded_and_fails_closed() -> None:
    clock = _Clock(NOW)
    store = MemoryJtiStore(max_entries=3, clock=clock)
    for jti in "abc":
        assert await store.claim(jti, NOW + 60, NOW)
    with pytest.raises(JtiStoreFullError) as info:
        await store.claim("d", NOW + 60, NOW)
    assert info.value.status == 503
    assert not await store.claim("a", NOW + 60, NOW)  # still remembered
    clock.now = NOW + 120
    assert await store.claim("d", NOW + 180, NOW)
    assert len(store) == 1


async def test_memory_store_refuses_tickets_issued_before_it_started() -> None:
    """A restarted process has forgotten which tickets were used: older ones are refused,
    compared on real-valued times (an iat in whole seconds is not rounded up)."""
    store = MemoryJtiStore(clock=_Clock(NOW + 0.5))
    for issued_at in (NOW - 30, NOW, NOW + 0.499):
        with pytest.raises(StaleTicketError) as info:
            await store.claim(f"j{issued_at}", issued_at + 60, issued_at)
        assert info.value.status == 401
        assert "fetch a new ticket" in info.value.reason
    assert await store.claim("fresh", NOW + 60.5, NOW + 0.5)
    with pytest.raises(StaleTicketError):
        await redeem_ticket(_mint(now=NOW), [SECRET], store, now=NOW + 1)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - depends on the environment
        await client.aclose()
        pytest.skip(f"no Redis at {redis_url}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    prefix = f"walcast:test:{uuid.uuid4().hex}:jti:"
    yield prefix
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


def _redis_store(
    redis_client: aioredis.Redis, redis_prefix: str, now: float = NOW
) -> RedisJtiStore:
    return RedisJtiStore(
        redis_client, prefix=redis_prefix, started_key=f"{redis_prefix}started", clock=_Clock(now)
    )


async def test_redis_store_refuses_a_reused_jti(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = _redis_store(redis_client, redis_prefix)
    token = _mint()
    claims = await redeem_ticket(token, [SECRET], store, now=NOW)
    with pytest.raises(TicketError, match="ticket already used"):
        await redeem_ticket(token, [SECRET], store, now=NOW)
    # A second node sharing the Redis refuses it too.
    other_node = _redis_store(redis_client, redis_prefix)
    assert not await other_node.claim(claims.jti, claims.expires_at, claims.issued_at)
    ttl = await redis_client.ttl(f"{redis_prefix}{claims.jti}")
    assert 60 <= ttl <= 60 + LEEWAY_SECONDS


async def test_redis_store_key_expires_with_the_ticket(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = _redis_store(redis_client, redis_prefix)
    assert await store.claim("soon", NOW - 30, NOW)  # already past: still kept for a second
    assert await redis_client.ttl(f"{redis_prefix}soon") == 1


async def test_redis_store_default_prefix(redis_client: aioredis.Redis) -> None:
    jti = f"test-{uuid.uuid4().hex}"
    store = RedisJtiStore(redis_client)
    had_start = await redis_client.exists("walcast:started")
    try:
        assert await store.claim(jti, time.time() + 60, time.time() + LEEWAY_SECONDS)
        assert await redis_client.exists(f"walcast:jti:{jti}")
        assert await redis_client.exists("walcast:started")
    finally:
        await redis_client.delete(f"walcast:jti:{jti}")
        if not had_start:
            await redis_client.delete("walcast:started")


async def test_redis_store_unreachable_is_a_503_error() -> None:
    import socket

    import redis.asyncio as aioredis

    from gateway.tickets import JtiStoreUnavailableError, RedisJtiStore

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        store = RedisJtiStore(client)
        with pytest.raises(JtiStoreUnavailableError) as caught:
            await store.claim("some-jti", time.time() + 60, time.time())
        assert caught.value.status == 503
    finally:
        await client.aclose()


async def test_redis_store_refuses_tickets_older_than_its_history(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Redis lost its data (the start key is gone with the jti keys): the next claim starts a
    new history in the same Lua call, and every older ticket, possibly used, is refused."""
    store = _redis_store(redis_client, redis_prefix)
    assert await store.claim("used", NOW + 60, NOW)
    assert float(await redis_client.get(f"{redis_prefix}started")) == NOW
    await redis_client.delete(f"{redis_prefix}used", f"{redis_prefix}started")  # data lost
    later = _redis_store(redis_client, redis_prefix, now=NOW + 5)
    with pytest.raises(StaleTicketError):
        await later.claim("used", NOW + 60, NOW)
    with pytest.raises(StaleTicketError):
        await later.claim("whole-second", NOW + 64, NOW + 4)  # iat in whole seconds
    assert not await redis_client.exists(f"{redis_prefix}used")
    assert await later.claim("fresh", NOW + 65, NOW + 5)
