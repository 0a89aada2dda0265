"""Property-based fuzzing (hypothesis, bounded) of everything that parses untrusted input.

- the ticket parser: random text and mutated real tickets raise `TicketError` and nothing else;
  forged or re-signed payloads with wrong claims too;
- the realtime config loader: random TOML-shaped documents raise `ConfigError` and nothing else;
- masking: any value, any rule, never an exception, and a masked value keeps no more of the raw
  value than its rule allows; `TablePolicy.shape` sends only allow-listed columns, masked;
- the WebSocket query string, against a live walcast: random parameters get a 4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import http.client
import string
import time
import urllib.parse
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, MaskRule, TableConfig, parse_realtime_config
from gateway.masking import REDACTED, mask_value
from gateway.policy import TablePolicy
from gateway.tickets import AUDIENCE, TicketClaims, TicketError, mint_ticket, verify_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
SECRETS = ("fuzz-secret-0123456789abcdefghijklmnop", "fuzz-old-secret-0123456789abcdefghij")
NOW = 1_800_000_000.0

# -- tickets ---------------------------------------------------------------------------------


def _valid_ticket() -> str:
    return mint_ticket(SECRETS[0], user_id="u", organization_id="o", roles=["r"], now=NOW)


def _verify(token: Any) -> TicketClaims | None:
    try:
        claims = verify_ticket(token, SECRETS, now=NOW + 1)
    except TicketError as exc:
        assert exc.status == 401
        assert len(token) < 8 or token not in exc.reason  # never echoes the token
        return None
    assert isinstance(claims.user_id, str) and isinstance(claims.organization_id, str)
    assert all(isinstance(role, str) for role in claims.roles)
    return claims


ORIGINAL = _valid_ticket()


@st.composite
def mutated_tickets(draw: st.DrawFn) -> str:
    token = ORIGINAL
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "segments", "swap", "pad"]))
    if kind == "flip":
        index = draw(st.integers(0, len(token) - 1))
        char = draw(st.characters(codec="ascii").filter(lambda c: c != token[index]))
        return token[:index] + char + token[index + 1 :]
    if kind == "truncate":
        return token[: draw(st.integers(0, len(token) - 1))]
    if kind == "insert":
        index = draw(st.integers(0, len(token)))
        return token[:index] + draw(st.text(min_size=1, max_size=20)) + token[index:]
    parts = token.split(".")
    if kind == "segments":
        count = draw(st.integers(0, 6))
        return ".".join(draw(st.sampled_from(parts)) for _ in range(count))
    if kind == "swap":
        return ".".join(draw(st.permutations(parts)))
    return token + "." * draw(st.integers(1, 3)) + draw(st.text(max_size=10))


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=100).map(repr), mutated_tickets()))
def test_ticket_parser_only_raises_ticket_error(token: str) -> None:
    claims = _verify(token)
    # A mutation may be a no-op (the same segments, or base64 padding bits): it may then verify,
    # but only as the very ticket it came from.
    assert claims is None or claims == _verify(ORIGINAL)


CLAIM_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def signed_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    good: dict[str, Any] = {
        "sub": "u",
        "org": "o",
        "roles": ["r"],
        "iat": NOW,
        "exp": NOW + 60,
        "jti": "j",
        "aud": AUDIENCE,
    }
    payload = dict(good)
    for name in draw(st.sets(st.sampled_from([*good, "sid"]), min_size=1, max_size=4)):
        if draw(st.booleans()):
            payload.pop(name, None)
        else:
            payload[name] = draw(CLAIM_VALUES)
    header = {"alg": draw(st.sampled_from(["HS256", "HS256", "HS512", "none"]))}
    if draw(st.booleans()):
        header["kid"] = draw(st.text(max_size=5))
    return payload, header


@FUZZ
@given(signed_payloads(), st.sampled_from(SECRETS))
def test_correctly_signed_bad_claims_only_raise_ticket_error(
    signed: tuple[dict[str, Any], dict[str, Any]], secret: str
) -> None:
    payload, header = signed
    algorithm = header.pop("alg")
    try:
        token = jwt.encode(
            payload, None if algorithm == "none" else secret, algorithm=algorithm, headers=header
        )
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # not encodable (e.g. NaN in strict JSON): nothing to send
    claims = _verify(token)
    if claims is not None:  # accepted: then every claim was right
        assert algorithm == "HS256"
        assert payload["aud"] == AUDIENCE and isinstance(payload["roles"], list)
        assert payload["exp"] - payload["iat"] <= 60


# -- config ----------------------------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "tables",
        "namespaces",
        "historySeconds",
        "historyMaxEvents",
        "historyMaxTotalEvents",
        "manageReplicaIdentity",
        "public.applications",
        "notes",
        ".",
        "",
        "a.b.c",
        "organizationColumn",
        "requiredRoles",
        "userColumn",
        "ownerColumn",
        "fields",
        "onInsert",
        "masking",
        "type",
        "show",
        "roles",
        "or",
        "fn",
        "events",
        "schema_name",
        "email",
        "custom",
        "os:system",
    ]
)
TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["email", "ssn", "owner", "custom", "redact", "nope", "math:sqrt"]),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=25,
)


@FUZZ
@given(st.dictionaries(KEYS, TOML_VALUES, max_size=5))
def test_config_loader_only_raises_config_error(document: dict[str, Any]) -> None:
    try:
        parse_realtime_config(document, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: invalid realtime config")


# -- masking ---------------------------------------------------------------------------------

ANY_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(),
        st.from_regex(r"[a-z.]{0,8}@[a-z.]{0,12}", fullmatch=True),
        st.from_regex(r"[0-9 ()+-]{0,20}", fullmatch=True),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
RULES = [MaskRule(type=kind) for kind in ("email", "phone", "ssn", "creditCard", "name", "redact")]


def _text_of(value: Any) -> str:
    # The mask's text form of a non-string (spec §8: "masked on their text form").
    from gateway.masking import text_form

    return text_form(value)


@FUZZ
@given(st.sampled_from(RULES), ANY_VALUE)
def test_masks_never_raise_and_keep_only_what_the_rule_keeps(rule: MaskRule, value: Any) -> None:
    masked = mask_value(rule, value)
    if value is None or value == "":
        assert masked == value
        return
    text = _text_of(value)
    if rule.type == "redact":
        assert masked == REDACTED
    elif rule.type in ("phone", "ssn", "creditCard"):
        digits = [c for c in text if c.isdecimal()]
        if len(digits) < 4:
            assert masked is value
        else:
            assert masked == "*" * (len(digits) - 4) + "".join(digits[-4:])
    elif rule.type == "name":
        words, masked_words = text.split(), masked.split()
        assert len(words) == len(masked_words)
        for word, shown in zip(words, masked_words, strict=True):
            assert shown[0] == word[0] and set(shown[1:]) == {"*"}
            assert len(shown) == max(2, len(word))
    elif rule.type == "email":
        local, at, domain = text.rpartition("@")
        if not at or "." not in domain:
            assert masked is value
        else:
            name, _, tld = domain.rpartition(".")
            shown_local, _, shown_domain = masked.rpartition("@")
            shown_name, _, shown_tld = shown_domain.rpartition(".")
            assert shown_tld == tld
            for part, shown in ((local, shown_local), (name, shown_name)):
                if not part:  # an empty local part or name becomes a single star
                    assert shown == "*"
                else:
                    assert shown[:1] == part[:1] and set(shown[1:]) == {"*"}
                    assert len(shown) == max(2, len(part))


ROW_VALUES = st.one_of(st.none(), st.text(max_size=12), st.integers(), st.booleans())
COLUMNS = ["id", "ssn", "email", "name", "notes", "secret"]


@FUZZ
@given(
    st.dictionaries(st.sampled_from(COLUMNS), ROW_VALUES, max_size=6),
    st.one_of(st.none(), st.lists(st.sampled_from(COLUMNS), unique=True, max_size=4)),
    st.sets(st.sampled_from(["ssn", "email", "name"])),
)
def test_policy_shape_sends_only_allow_listed_columns_masked(
    row: dict[str, Any], fields: list[str] | None, raw: set[str]
) -> None:
    table = TableConfig.model_validate(
        {
            "fields": fields,
            "masking": {
                "ssn": {"type": "ssn"},
                "email": {"type": "email"},
                "name": {"type": "name"},
                "secret": {"type": "redact"},
            },
        }
    )
    policy = TablePolicy(table)
    before = dict(row)
    shaped = policy.shape(row, frozenset(raw))
    assert shaped is not None
    assert row == before  # the event's row is shared by every visibility class: never edited
    allowed = set(COLUMNS if fields is None else fields)
    assert set(shaped) == set(row) & allowed
    for column, value in shaped.items():
        rule = table.masking.get(column)
        if rule is None or column in raw:
            assert value == row[column]
        else:
            assert value == mask_value(rule, row[column])
            if column == "secret" and row[column] not in (None, ""):
                assert value == REDACTED


# -- the WebSocket query string, live --------------------------------------------------------

PARAM_NAMES = st.sampled_from(["ws_ticket", "organizationId", "since", "x", "", "ws_ticket[]"])
PARAM_VALUES = st.one_of(
    st.text(max_size=40),
    st.just("VALID"),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=400),
)
RAW_TAILS = st.sampled_from(["", "&", "&&", "=", "%", "%zz", "%00", "%ff%fe", "&=&=", "?", ";"])


@pytest.mark.integration
async def test_websocket_query_string_fuzz_never_5xx(gw: Gateway) -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    seen: dict[int, int] = {}

    @settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=6),
        RAW_TAILS,
        st.booleans(),
    )
    def probe(params: list[tuple[str, str]], tail: str, upgrade: bool) -> None:
        pairs = []
        for name, value in params:
            if value == "VALID":
                value = mint_ticket(
                    ACCESS_TOKEN, user_id="fz", organization_id="org-fz", roles=["owner"]
                )
            pairs.append(f"{urllib.parse.quote(name)}={urllib.parse.quote(value)}")
        target = "/realtime/v1/websocket?" + "&".join(pairs) + tail
        headers = {"Upgrade": "websocket", "Connection": "Upgrade"} if upgrade else {}
        if upgrade:
            headers["Sec-WebSocket-Version"] = "13"  # no key: the upgrade itself never completes
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        seen[response.status] = seen.get(response.status, 0) + 1
        assert 400 <= response.status < 500, (response.status, target, body[:200])
        assert ACCESS_TOKEN.encode() not in body

    started = time.monotonic()
    await asyncio.to_thread(probe)
    assert 401 in seen, seen  # and every answer was a 4xx (checked per request)
    assert time.monotonic() - started < 60
