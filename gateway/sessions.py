"""Who may ask for a ticket: session stores behind `POST /realtime/v1/ws-ticket`.

The endpoint does two things with a store: `authenticate(bearer token)` → the `Session`, then
`roles_of(user, organization)` → the member's roles, or None for "not a member" (403).

Two stores:

- `BetterAuthSessionStore` reads Better Auth's tables in the application's own PostgreSQL:
  ``"session"(id, token, "userId", "expiresAt", "activeOrganizationId")`` and
  ``member("organizationId", "userId", role)``, where `role` may hold several comma-separated
  roles. A session is valid while ``"expiresAt" > now()`` on the database's clock. A Better Auth
  *signed* token (``<token>.<signature>``, the cookie form) is accepted too: its token part is
  looked up when the whole string is not found (the signature only protects the cookie; the
  token itself is the credential). The session's ``id`` — never its token — becomes the
  ticket's ``sid``, which live revocation matches against deleted ``"session"`` rows.
- `JwtSessionStore` verifies a JWT the application's identity provider issued: HS256 with a
  shared secret, or any key of a JWKS (RS256/ES256 need the `cryptography` package; ``oct``
  keys work without it) read from a file or fetched from a URL (cached; refetched after
  `jwks_cache_seconds`, or early — at most every `JWKS_MIN_REFRESH_SECONDS` — when a token names
  an unknown ``kid``). The token must carry ``exp``. Claim names are configurable
  (`ClaimNames`). The token asserts one organization and the user's roles in it, so
  `roles_of` answers for that organization only and None for any other. Without a configured
  `audience`, ``aud`` is not checked, except that walcast's own tickets (``aud = walcast:ws``)
  are never accepted as sessions.

Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import jwt

from gateway.errors import ConfigError, SessionStoreError
from gateway.tickets import AUDIENCE as TICKET_AUDIENCE

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "BetterAuthSessionStore",
    "ClaimNames",
    "JwtSessionStore",
    "Session",
    "SessionStore",
    "SessionStoreError",
    "parse_roles",
]

logger = logging.getLogger(__name__)

#: Bearer tokens longer than this are refused without a query or a signature check.
MAX_TOKEN_LENGTH = 8192
#: Earliest refetch of a JWKS URL after the previous one, when a token names an unknown kid.
JWKS_MIN_REFRESH_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated session.

    Attributes:
        session_id: the session's id (Better Auth ``"session".id``, or the JWT's ``sid``).
        active_organization_id: the organization a ticket is for when the request names none.
        roles: the roles the credential itself states for `active_organization_id` (JWT
            sessions); None when the store looks them up (`roles_of`).
    """

    user_id: str
    session_id: str | None
    active_organization_id: str | None
    roles: frozenset[str] | None = None


class SessionStore(Protocol):
    async def authenticate(self, token: str) -> Session | None:
        """The session a bearer token stands for; None if unknown, expired or invalid."""
        ...

    async def roles_of(
        self, user_id: str, organization_id: str, *, session: Session | None = None
    ) -> frozenset[str] | None:
        """The user's roles in the organization (possibly empty); None if not a member.

        `session`, when given, is the session the request authenticated with; stores whose
        credentials carry the roles (JWT) answer from it.
        """
        ...


def parse_roles(raw: str | Sequence[str] | None) -> frozenset[str]:
    """Roles from ``"owner, recruiter"`` or ``["owner", "recruiter"]``: trimmed, no empties."""
    if raw is None:
        return frozenset()
    parts = raw.split(",") if isinstance(raw, str) else raw
    return frozenset(part.strip() for part in parts if isinstance(part, str) and part.strip())


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


class BetterAuthSessionStore:
    """Sessions and memberships from Better Auth's tables, through an asyncpg pool.

    Args:
        pool: an `asyncpg.Pool` on the application database.
        schema: the schema holding Better Auth's tables; None: the connection's search_path.
    """

    def __init__(self, pool: asyncpg.Pool, *, schema: str | None = None) -> None:
        self._pool = pool
        prefix = f"{quote_ident(schema)}." if schema else ""
        session_table = prefix + quote_ident("session")
        member_table = prefix + quote_ident("member")
        # Only quoted identifiers are interpolated; every value travels as a parameter.
        self._session_sql = (
            f'SELECT id, "userId", "activeOrganizationId" FROM {session_table} '  # noqa: S608
            'WHERE token = $1 AND "expiresAt" > now()'
        )
        self._roles_sql = (
            f'SELECT role FROM {member_table} WHERE "userId" = $1 AND "organizationId" = $2'  # noqa: S608
        )

    async def authenticate(self, token: str) -> Session | None:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        row = await self._pool.fetchrow(self._session_sql, token)
        if row is None and "." in token:
            unsigned = token.rpartition(".")[0]
            if unsigned:
                row = await self._pool.fetchrow(self._session_sql, unsigned)
        if row is None:
            return None
        return Session(
            user_id=row["userId"],
            session_id=row["id"],
            active_organization_id=row["activeOrganizationId"],
        )

    async def roles_of(
        self, user_id: str, organization_id: str, *, session: Session | None = None
    ) -> frozenset[str] | None:
        rows = await self._pool.fetch(self._roles_sql, user_id, organization_id)
        if not rows:
            return None
        roles: set[str] = set()
        for row in rows:
            roles |= parse_roles(row["role"])
        return frozenset(roles)


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Which JWT claims hold what; `organization` names are tried in order."""

    user: str = "sub"
    organization: tuple[str, ...] = ("org", "activeOrganizationId")
    roles: str = "roles"
    session: str = "sid"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | Sequence[str]]) -> ClaimNames:
        """From ``{"user": "uid", "organization": "tenant", ...}``; unknown keys are errors."""
        unknown = set(mapping) - {"user", "organization", "roles", "session"}
        if unknown:
            raise ConfigError(f"unknown JWT claim mapping keys: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            if key == "organization":
                values[key] = (value,) if isinstance(value, str) else tuple(value)
            elif isinstance(value, str):
                values[key] = value
            else:
                raise ConfigError(f"JWT claim mapping {key!r} must be a claim name")
        return cls(**values)


def _parse_jwks(text: str, source: str) -> jwt.PyJWKSet:
    try:
        return jwt.PyJWKSet.from_json(text)
    except jwt.exceptions.MissingCryptographyError:
        raise ConfigError(
            f"{source}: the JWKS holds RSA/EC keys, which need the 'cryptography' package"
        ) from None
    except (ValueError, jwt.PyJWTError) as exc:
        raise ConfigError(f"{source}: not a usable JWKS: {exc}") from None


def _number(value: object) -> float | None:
    """`value` as a float if it is a JSON number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class JwtSessionStore:
    """Sessions from signed JWTs (see the module docstring).

    Args:
        secret: HS256 secret; tokens whose header says HS256 are verified with it.
        jwks_path: a JWKS file; re-read when its modification time changes.
        claims: claim names (`ClaimNames`, or a mapping for `ClaimNames.from_mapping`).
        jwks_url: a JWKS URL, fetched with aiohttp and cached.
        audience: required ``aud``, if set. issuer: required ``iss``, if set.
        leeway: clock-skew allowance in seconds for ``exp`` and ``nbf``.
        clock: seconds since the epoch.

    Raises:
        ConfigError: no key source, or an unreadable/unusable JWKS file.
    """

    def __init__(
        self,
        secret: str | None = None,
        jwks_path: str | os.PathLike[str] | None = None,
        *,
        claims: ClaimNames | Mapping[str, str | Sequence[str]] | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 5.0,
        clock: Callable[[], float] = time.time,
        jwks_cache_seconds: float = 300.0,
        http_timeout: float = 5.0,
        max_cached_memberships: int = 10_000,
    ) -> None:
        if not secret and jwks_path is None and jwks_url is None:
            raise ConfigError("JWT sessions need a secret, a JWKS file or a JWKS URL")
        self._secret = secret or None
        self._jwks_path = os.fspath(jwks_path) if jwks_path is not None else None
        self._jwks_url = jwks_url
        if claims is None:
            claims = ClaimNames()
        elif not isinstance(claims, ClaimNames):
            claims = ClaimNames.from_mapping(claims)
        self._claims = claims
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._clock = clock
        self._jwks_cache_seconds = jwks_cache_seconds
        self._http_timeout = http_timeout
        self._keys: jwt.PyJWKSet | None = None
        self._keys_mtime: float | None = None
        self._keys_fetched_at = -float("inf")
        self._fetch_lock = asyncio.Lock()
        self._memberships: OrderedDict[tuple[str, str], tuple[frozenset[str], float]] = (
            OrderedDict()
        )
        self._max_memberships = max_cached_memberships
        if self._jwks_path is not None:
            self._load_jwks_file()

    @classmethod
    def from_config(
        cls, *, secret: str | None = None, jwks: str | None = None, **options: Any
    ) -> JwtSessionStore:
        """`jwks` is a file path or an ``http(s)://`` URL (`WALCAST_JWT_SESSION_JWKS`)."""
        if jwks and jwks.startswith(("http://", "https://")):
            return cls(secret, None, jwks_url=jwks, **options)
        return cls(secret, jwks or None, **options)

    # -- keys ----------------------------------------------------------------------------

    def _load_jwks_file(self) -> None:
        assert self._jwks_path is not None
        try:
            mtime = os.stat(self._jwks_path).st_mtime
            with open(self._jwks_path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{self._jwks_path}: cannot read JWKS: {exc.strerror}") from None
        self._keys = _parse_jwks(text, self._jwks_path)
        self._keys_mtime = mtime

    def _reload_jwks_file_if_changed(self) -> None:
        assert self._jwks_path is not None
        try:
            mtime = os.stat(self._jwks_path).st_mtime
        except OSError:
            return
        if mtime != self._keys_mtime:
            try:
                self._load_jwks_file()
            except ConfigError as exc:
                logger.warning("keeping the previous JWKS: %s", exc)

    async def _fetch_jwks(self) -> None:
        assert self._jwks_url is not None
        self._keys_fetched_at = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self._http_timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as client,
                client.get(self._jwks_url) as response,
            ):
                response.raise_for_status()
                text = await response.text()
            self._keys = _parse_jwks(text, self._jwks_url)
        except (aiohttp.ClientError, TimeoutError, ConfigError) as exc:
            logger.warning("cannot refresh the JWKS from %s: %s", self._jwks_url, exc)
            if self._keys is None:
                raise SessionStoreError("session keys unavailable") from None

    async def _key_for(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._find_key(kid)
        if key is not None and not self._jwks_stale():
            return key
        if self._jwks_path is not None:
            self._reload_jwks_file_if_changed()
        elif self._jwks_url is not None:
            since = time.monotonic() - self._keys_fetched_at
            if self._jwks_stale() or (key is None and since >= JWKS_MIN_REFRESH_SECONDS):
                async with self._fetch_lock:
                    # Another request may have refreshed while this one waited.
                    since = time.monotonic() - self._keys_fetched_at
                    if self._jwks_stale() or (key is None and since >= JWKS_MIN_REFRESH_SECONDS):
                        await self._fetch_jwks()
        return self._find_key(kid)

    def _jwks_stale(self) -> bool:
        if self._jwks_url is None:
            return False
        return time.monotonic() - self._keys_fetched_at >= self._jwks_cache_seconds

    def _find_key(self, kid: str | None) -> jwt.PyJWK | None:
        if self._keys is None:
            return None
        keys = list(self._keys)
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        for key in keys:
            if key.key_id == kid:
                return key
        return None

    # -- verification --------------------------------------------------------------------

    async def _verify(self, token: str) -> dict[str, Any] | None:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg == "none" or not (kid is None or isinstance(kid, str)):
            return None
        key: str | jwt.PyJWK
        if alg == "HS256" and self._secret is not None:
            key = self._secret
        elif self._jwks_path is not None or self._jwks_url is not None:
            found = await self._key_for(kid)
            if found is None or found.algorithm_name != alg:
                return None
            key = found
        else:
            return None
        options: Any = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
            "require": [],
        }
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=options,
                audience=self._audience,
                issuer=self._issuer,
            )
        except jwt.PyJWTError:
            return None
        return payload if isinstance(payload, dict) else None

    def _check_times_and_audience(self, payload: dict[str, Any], now: float) -> bool:
        expires_at = _number(payload.get("exp"))
        if expires_at is None or now >= expires_at + self._leeway:
            return False
        if "nbf" in payload:
            not_before = _number(payload["nbf"])
            if not_before is None or not_before > now + self._leeway:
                return False
        audience = payload.get("aud")
        if audience == TICKET_AUDIENCE or (
            isinstance(audience, list) and TICKET_AUDIENCE in audience
        ):
            return False
        return True

    async def authenticate(self, token: str) -> Session | None:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        payload = await self._verify(token)
        now = self._clock()
        if payload is None or not self._check_times_and_audience(payload, now):
            return None
        names = self._claims
        user_id = payload.get(names.user)
        if not isinstance(user_id, str) or not user_id:
            return None
        organization_id: str | None = None
        for name in names.organization:
            candidate = payload.get(name)
            if isinstance(candidate, str) and candidate:
                organization_id = candidate
                break
        raw_roles = payload.get(names.roles)
        if raw_roles is not None and not isinstance(raw_roles, str | list):
            return None
        roles = parse_roles(raw_roles)
        session_id = payload.get(names.session)
        if session_id is not None and not isinstance(session_id, str):
            return None
        if organization_id is not None:
            self._remember(user_id, organization_id, roles, float(payload["exp"]))
        return Session(
            user_id=user_id,
            session_id=session_id,
            active_organization_id=organization_id,
            roles=roles if organization_id is not None else None,
        )

    def _remember(
        self, user_id: str, organization_id: str, roles: frozenset[str], exp: float
    ) -> None:
        key = (user_id, organization_id)
        self._memberships[key] = (roles, exp)
        self._memberships.move_to_end(key)
        while len(self._memberships) > self._max_memberships:
            self._memberships.popitem(last=False)

    async def roles_of(
        self, user_id: str, organization_id: str, *, session: Session | None = None
    ) -> frozenset[str] | None:
        """Roles from the token: `session`'s when given, else from the latest verified token of
        this user for this organization that has not expired. Other organizations: None."""
        if session is not None:
            if session.user_id != user_id or session.active_organization_id != organization_id:
                return None
            return session.roles if session.roles is not None else frozenset()
        entry = self._memberships.get((user_id, organization_id))
        if entry is None:
            return None
        roles, expires_at = entry
        if self._clock() >= expires_at + self._leeway:
            del self._memberships[(user_id, organization_id)]
            return None
        return roles
