"""WebSocket tickets: short-lived HS256 JWTs, verified at upgrade time, used once.

A ticket is what `POST /realtime/v1/ws-ticket` hands out and `GET /realtime/v1/websocket`
accepts. It is a plain JWT so that any application holding `ACCESS_TOKEN` can mint one in any
language::

    header   {"alg": "HS256", "typ": "JWT"}
    payload  {"sub": userId, "org": organizationId, "roles": [...], "iat": t, "exp": t + 60,
              "jti": random, "aud": "walcast:ws", "sid": sessionId (optional)}

Rules `verify_ticket` enforces, in this order:

1. the token is at most `MAX_TICKET_LENGTH` characters and is a well-formed JWS;
2. its header says `HS256` (`none` and every other algorithm are refused);
3. the signature matches one of the configured secrets (rotation: `ACCESS_TOKEN` may hold several
   comma-separated secrets; walcast signs with the first and accepts any);
4. every claim is present with the right type, and `aud` is exactly `"walcast:ws"`;
5. `iat <= now + LEEWAY_SECONDS`, `now < exp + LEEWAY_SECONDS`, and `exp - iat` is at most
   `max_lifetime` (default 60 s): a ticket minted elsewhere cannot live longer than one of ours.

`LEEWAY_SECONDS` (1 s) is the only clock-skew allowance; it covers a minting host whose clock is
slightly ahead or behind. Single use is the job of a `JtiStore`: `redeem_ticket` verifies, then
claims the `jti`, which is refused the second time. The in-memory store serves one node; the
Redis store is shared by every gateway node on the Redis bus.

A store remembers the tickets claimed since it started, no earlier: the in-memory one since the
process started, the Redis one since the Redis history started (a key set when missing, so a
Redis that lost its data starts anew). A ticket issued before that may have been used already,
so it is refused (`StaleTicketError`, 401: fetch a new ticket). Clients mint one ticket per
connect and a ticket lives 60 s, so this only ever costs a client one more ticket request. The
comparison is `iat < start` on the real-valued times: an `iat` in whole seconds is never
rounded in its favour.

This module is pure: the clock is a parameter, and nothing here does I/O except the Redis store,
which only awaits the client it is given. Error reasons are short fixed strings; they never
contain the token, a claim value or a secret.
"""

from __future__ import annotations

import heapq
import math
import secrets as _secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from gateway.errors import (
    GatewayError,
    JtiStoreFullError,
    JtiStoreUnavailableError,
    StaleTicketError,
    TicketError,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "DEFAULT_TTL",
    "LEEWAY_SECONDS",
    "MAX_TICKET_LENGTH",
    "GatewayError",
    "JtiStore",
    "JtiStoreFullError",
    "JtiStoreUnavailableError",
    "MemoryJtiStore",
    "RedisJtiStore",
    "StaleTicketError",
    "TicketClaims",
    "TicketError",
    "mint_ticket",
    "redeem_ticket",
    "verify_ticket",
]

ALGORITHM = "HS256"
AUDIENCE = "walcast:ws"
DEFAULT_TTL = 60
#: Clock-skew allowance, in seconds, on both `iat` and `exp` (documented bound: at most 2 s).
LEEWAY_SECONDS = 1.0
#: Longer tokens are refused before any parsing: a real ticket is a few hundred characters.
MAX_TICKET_LENGTH = 4096
#: Longest accepted `jti`; it becomes a key in the jti store.
MAX_JTI_LENGTH = 128

_REQUIRED_STRINGS = ("sub", "org", "jti")

# Every time-based check is done here with the injected clock; PyJWT's own checks would read the
# wall clock. PyJWT still verifies the signature (and only that).
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


@dataclass(frozen=True, slots=True)
class TicketClaims:
    """What a verified ticket says. `expires_at` is the `exp` claim (seconds since the epoch)."""

    user_id: str
    organization_id: str
    roles: frozenset[str]
    jti: str
    expires_at: float
    session_id: str | None = None
    issued_at: float = 0.0


def mint_ticket(
    secret: str,
    *,
    user_id: str,
    organization_id: str,
    roles: Sequence[str],
    session_id: str | None = None,
    now: float | None = None,
    ttl: int = DEFAULT_TTL,
) -> str:
    """Sign a ticket with `secret` (the first `ACCESS_TOKEN` secret).

    Args:
        roles: the user's roles in `organization_id`; a bare string is refused (it is a
            `Sequence[str]` too, and would become a list of letters).
        session_id: the session's id (never its token: a ticket's payload is readable).
        now: seconds since the epoch; `time.time()` when omitted.
        ttl: lifetime in seconds; `verify_ticket` refuses lifetimes over its `max_lifetime`.

    Raises:
        ValueError: empty secret, user, organization, or a non-positive ttl.
        TypeError: `roles` is a string or holds a non-string.
    """
    if not secret:
        raise ValueError("mint_ticket needs a non-empty secret")
    if not user_id or not organization_id:
        raise ValueError("mint_ticket needs user_id and organization_id")
    if isinstance(roles, str) or not all(isinstance(role, str) for role in roles):
        raise TypeError("roles must be a sequence of strings, not a string")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    # Millisecond precision, so a ticket minted just after an access change is told apart
    # from one minted just before it (see HubRegistry.is_revoked).
    issued_at = round(time.time() if now is None else now, 3)
    payload: dict[str, Any] = {
        "sub": user_id,
        "org": organization_id,
        "roles": list(dict.fromkeys(roles)),
        "iat": issued_at,
        "exp": issued_at + ttl,
        "jti": _secrets.token_urlsafe(16),
        "aud": AUDIENCE,
    }
    if session_id is not None:
        payload["sid"] = session_id
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_ticket(
    token: str,
    secrets: Sequence[str],
    *,
    now: float,
    max_lifetime: float = DEFAULT_TTL,
) -> TicketClaims:
    """Check a ticket's signature and claims (see the module docstring); no jti bookkeeping.

    Args:
        secrets: every accepted secret; a signature by any of them is valid.
        now: seconds since the epoch.
        max_lifetime: the longest `exp - iat` accepted.

    Raises:
        TicketError: with a short reason such as "bad signature" or "ticket expired".
    """
    if not isinstance(token, str) or not token or len(token) > MAX_TICKET_LENGTH:
        raise TicketError("malformed ticket")
    if not secrets:
        raise TicketError("no ticket secret configured")
    payload = _decode(token, secrets)
    claims = _claims_from(payload)
    issued_at = payload["iat"]
    if issued_at > now + LEEWAY_SECONDS:
        raise TicketError("ticket issued in the future")
    if now >= claims.expires_at + LEEWAY_SECONDS:
        raise TicketError("ticket expired")
    if claims.expires_at - issued_at > max_lifetime:
        raise TicketError("ticket lifetime too long")
    return claims


async def redeem_ticket(
    token: str,
    secrets: Sequence[str],
    store: JtiStore,
    *,
    now: float,
    max_lifetime: float = DEFAULT_TTL,
) -> TicketClaims:
    """`verify_ticket`, then claim its `jti` in `store`: what the WebSocket upgrade does.

    Raises:
        TicketError: invalid (see `verify_ticket`) or "ticket already used".
        StaleTicketError: issued before the store started.
        JtiStoreFullError: the in-memory store is full of unexpired tickets.
    """
    claims = verify_ticket(token, secrets, now=now, max_lifetime=max_lifetime)
    if not await store.claim(claims.jti, claims.expires_at, claims.issued_at):
        raise TicketError("ticket already used")
    return claims


def _decode(token: str, secrets: Sequence[str]) -> dict[str, Any]:
    # Rotation: try each secret in turn. PyJWT compares HMAC signatures with
    # hmac.compare_digest, so each attempt is constant-time in the signature; the secrets
    # themselves are never compared to anything.
    for secret in secrets:
        try:
            payload = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                options=_DECODE_OPTIONS,
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidAlgorithmError:
            raise TicketError("unsupported algorithm") from None
        except jwt.PyJWTError:
            raise TicketError("malformed ticket") from None
        if not isinstance(payload, dict):
            raise TicketError("malformed ticket")
        return payload
    raise TicketError("bad signature")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _claims_from(payload: dict[str, Any]) -> TicketClaims:
    for name in (*_REQUIRED_STRINGS, "roles", "iat", "exp", "aud"):
        if name not in payload:
            raise TicketError(f"missing claim: {name}")
    for name in _REQUIRED_STRINGS:
        if not isinstance(payload[name], str) or not payload[name]:
            raise TicketError(f"invalid claim: {name}")
    if len(payload["jti"]) > MAX_JTI_LENGTH:
        raise TicketError("invalid claim: jti")
    roles = payload["roles"]
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise TicketError("invalid claim: roles")
    for name in ("iat", "exp"):
        if not _is_number(payload[name]):
            raise TicketError(f"invalid claim: {name}")
    if payload["aud"] != AUDIENCE:
        raise TicketError("wrong audience")
    session_id = payload.get("sid")
    if session_id is not None and not isinstance(session_id, str):
        raise TicketError("invalid claim: sid")
    return TicketClaims(
        user_id=payload["sub"],
        organization_id=payload["org"],
        roles=frozenset(roles),
        jti=payload["jti"],
        expires_at=float(payload["exp"]),
        session_id=session_id,
        issued_at=float(payload["iat"]),
    )


class JtiStore(Protocol):
    """Remembers ticket ids until they expire, so that each ticket opens one socket only."""

    async def claim(self, jti: str, expires_at: float, issued_at: float) -> bool:
        """True the first time `jti` is claimed, False every later time (until it expires).

        Raises:
            StaleTicketError: `issued_at` is before the store started remembering.
        """
        ...


class MemoryJtiStore:
    """One node's jti store: a dict plus a heap of expiries, pruned on every claim.

    Entries are kept until `expires_at + LEEWAY_SECONDS`, the last moment `verify_ticket` could
    still accept the ticket. At most `max_entries` unexpired tickets are held; past that, claims
    raise `JtiStoreFullError` (fail closed) rather than forget a ticket that could be replayed.
    The store forgets everything when the process ends, so tickets issued before it was made
    (`started_at`, default: now) are refused.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
        started_at: float | None = None,
    ) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        self.started_at = clock() if started_at is None else started_at
        self._seen: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, jti: str, expires_at: float, issued_at: float) -> bool:
        if issued_at < self.started_at:
            raise StaleTicketError()
        # No await between the check and the insert: atomic on the event loop.
        now = self._clock()
        self._prune(now)
        if jti in self._seen:
            return False
        if len(self._seen) >= self._max_entries:
            raise JtiStoreFullError("too many tickets in flight")
        forget_at = expires_at + LEEWAY_SECONDS
        self._seen[jti] = forget_at
        heapq.heappush(self._expiries, (forget_at, jti))
        return True

    def _prune(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            forget_at, jti = heapq.heappop(self._expiries)
            if self._seen.get(jti) == forget_at:
                del self._seen[jti]


# KEYS: the start key, the jti key. ARGV: now, the ticket's iat, the jti key's ttl.
# Returns 1 (claimed), 0 (already used) or -1 (issued before the history's start). The start
# key is set when missing: a Redis that lost its data no longer knows which tickets were used,
# so it remembers from now on and refuses every older ticket, in the same step as the claim.
_CLAIM = """
local start = redis.call('GET', KEYS[1])
if not start then
  redis.call('SET', KEYS[1], ARGV[1])
  start = ARGV[1]
end
if tonumber(ARGV[2]) < tonumber(start) then return -1 end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return 1 end
return 0
"""


class RedisJtiStore:
    """The jti store shared by every gateway node: ``SET <prefix><jti> 1 NX EX <ttl>``, in one
    Lua call with the check of the start key (`started_key`: when the Redis history began).

    The jti key lives until the ticket could no longer verify (`expires_at + LEEWAY_SECONDS`,
    rounded up, at least one second), then Redis drops it. The bus's gateway nodes also set the
    start key when they connect to Redis, so that tickets minted after that are accepted.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "walcast:jti:",
        started_key: str = "walcast:started",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._started_key = started_key
        self._clock = clock
        self._claim = redis.register_script(_CLAIM)

    async def claim(self, jti: str, expires_at: float, issued_at: float) -> bool:
        from redis.exceptions import RedisError

        now = self._clock()
        ttl = max(1, math.ceil(expires_at + LEEWAY_SECONDS - now))
        try:
            answer = await self._claim(
                keys=[self._started_key, f"{self._prefix}{jti}"],
                args=[repr(now), repr(float(issued_at)), ttl],
            )
        except (RedisError, OSError):
            raise JtiStoreUnavailableError("ticket store unavailable") from None
        if answer == -1:
            raise StaleTicketError("the ticket store's history started")
        return bool(answer == 1)
