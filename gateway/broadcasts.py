"""What a broadcast message is, for the side that writes it and the side that reads it.

The broadcast API writes each broadcast into the WAL with `pg_logical_emit_message(true,
'walcast', content)`, and the router delivers what it reads back. Any database role may call
`pg_logical_emit_message`, so the router must tell walcast's own messages from forged ones:
the content carries an HMAC-SHA256 over the JSON body, with a key derived from `ACCESS_TOKEN`.

The signed format, version 1 (ASCII up to the body):

    v1.<tag>.<body>

* `body`: the broadcast as JSON (`organizationId`, `event`, `payload`, `targetRoles`,
  `targetUserId`).
* `tag`: base64url, unpadded, of HMAC-SHA256(key, body).
* `key`: HMAC-SHA256(secret, "walcast broadcast v1"): a key for this purpose and this version
  only, so the ticket key (the secret itself) is never reused, and a later format gets keys of
  its own.

Rotation: `ACCESS_TOKEN` may hold several secrets; messages are signed with the first and
verified against every one, in constant time. Keep a retired secret configured for at least
`historySeconds` after the new one is first: broadcasts signed with it are still in the WAL,
and a restart reads them again.

Also here, because both sides apply it: who a broadcast may reach. `auth:` events are walcast's
own (`auth:token-invalidated` before a 4403 close) and can never be broadcast; an event named
`namespace:event` needs a declared namespace, whose `requiredRoles` bound `targetRoles`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from gateway.config import RESERVED_NAMESPACES, RealtimeConfig

__all__ = ["BroadcastSigner", "broadcast_key", "namespace_roles", "target_roles"]

_VERSION = b"v1."
_KEY_LABEL = b"walcast broadcast v1"
_TAG_LENGTH = 43  # base64url of 32 bytes, unpadded


def broadcast_key(secret: str) -> bytes:
    """The key that signs version-1 broadcast messages, derived from one `ACCESS_TOKEN` secret."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _tag(key: bytes, body: bytes) -> bytes:
    digest = hmac.new(key, body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


class BroadcastSigner:
    """Signs broadcast bodies with the first secret; verifies them with any of the secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._keys = tuple(broadcast_key(secret) for secret in secrets)

    def sign(self, body: bytes) -> bytes:
        """The message content for `body`: `v1.<tag>.<body>`."""
        if not self._keys:
            raise ValueError("no secret to sign with: ACCESS_TOKEN is not set")
        return _VERSION + _tag(self._keys[0], body) + b"." + body

    def verify(self, content: bytes) -> bytes | None:
        """The body of a validly signed message; None for anything else (unsigned, forged,
        another format version, or signed with a secret that is not configured)."""
        if not content.startswith(_VERSION):
            return None
        signed = content[len(_VERSION) :]
        tag, body = signed[:_TAG_LENGTH], signed[_TAG_LENGTH + 1 :]
        if signed[_TAG_LENGTH : _TAG_LENGTH + 1] != b".":
            return None
        valid = False
        for key in self._keys:  # every key, no early exit: timing says nothing about which
            valid |= hmac.compare_digest(tag, _tag(key, body))
        return body if valid else None


def namespace_roles(config: RealtimeConfig, event: str) -> tuple[str, ...] | str:
    """The roles an event's namespace requires (none for an event without one), or why the
    event may not be broadcast: a reserved namespace, or one the config does not declare."""
    namespace, sep, name = event.partition(":")
    if not sep:
        return ()
    if namespace in RESERVED_NAMESPACES:
        return f"the {namespace}: namespace is reserved for walcast's own events"
    declared = config.namespaces.get(namespace)
    if declared is None:
        return f"namespace {namespace!r} is not declared in the realtime config"
    if declared.events is not None and name not in declared.events:
        return f"event {name!r} is not declared in namespace {namespace!r}"
    return declared.requiredRoles


def target_roles(
    namespace: str, required: tuple[str, ...], asked: Sequence[str] | None
) -> tuple[str, ...] | str:
    """Who a broadcast reaches: the namespace's `requiredRoles` bound `targetRoles`.

    No roles means every member, so the rule is written here once: absent or empty
    `targetRoles` mean the namespace's roles (an empty list never widens them); otherwise the
    intersection, and an intersection that is empty (nobody) is an error message, not "everyone".
    """
    if not asked:
        return required
    if not required:
        return tuple(dict.fromkeys(asked))
    both = tuple(role for role in dict.fromkeys(asked) if role in required)
    if not both:
        return (
            f"targetRoles share no role with the requiredRoles of namespace {namespace!r} "
            f"({', '.join(required)}): nobody would receive it"
        )
    return both
