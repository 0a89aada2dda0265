"""walcast/config.py: the realtime config (spec §7) and the process settings (spec §9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config import (
    ConfigError,
    MaskRule,
    RealtimeConfig,
    Settings,
    load_realtime_config,
    parse_realtime_config,
    split_secrets,
)

NEW_SECRET = "new-secret-0123456789-0123456789-abc"
OLD_SECRET = "old-secret-0123456789-0123456789-abc"

SPEC_EXAMPLE = """
manageReplicaIdentity = false            # optional
historySeconds = 120                     # optional: resume window (§2, §3)
[tables."public.applications"]
organizationColumn = "organizationId"    # default "organizationId"; rows with NULL org are dropped
requiredRoles = ["hiring-manager", "recruiter", "owner"]   # absent/empty: every org member
userColumn = "assigneeId"                # optional: only that user receives the row's events
ownerColumn = "createdBy"                # optional: used by show.or = "owner"
fields = ["id", "candidateId", "stage", "ssn"]   # optional allow-list of columns sent
onInsert = true                          # defaults true
onUpdate = true
onDelete = true
[tables."public.applications".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
email = { type = "email", show = { roles = ["owner", "admin"], or = "owner" } }

[namespaces.screening]                   # the counterpart of defineRealtime()
events = ["started", "progress", "complete"]   # optional: any event when absent
requiredRoles = ["recruiter"]            # optional default targetRoles
"""


def _write(tmp_path: Path, text: str, name: str = "realtime.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(data: dict[str, Any], source: str = "realtime.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_realtime_config(data, source)
    return str(info.value)


# -- realtime config -----------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    config = load_realtime_config(_write(tmp_path, SPEC_EXAMPLE))
    assert config.manageReplicaIdentity is False
    assert config.historySeconds == 120
    table = config.table("public", "applications")
    assert table is not None
    assert table.qualified_name == "public.applications"
    assert table.requiredRoles == ("hiring-manager", "recruiter", "owner")
    assert table.userColumn == "assigneeId"
    assert table.ownerColumn == "createdBy"
    assert table.fields == ("id", "candidateId", "stage", "ssn")
    assert (table.onInsert, table.onUpdate, table.onDelete) == (True, True, True)
    assert table.masking["ssn"] == MaskRule(type="ssn", show={"roles": ["owner"]})  # type: ignore[arg-type]
    email = table.masking["email"]
    assert email.type == "email"
    assert email.show.roles == ("owner", "admin")
    assert email.show.or_ == "owner"
    screening = config.namespaces["screening"]
    assert screening.events == ("started", "progress", "complete")
    assert screening.requiredRoles == ("recruiter",)


def test_defaults() -> None:
    config = parse_realtime_config({"tables": {"applications": {}}, "namespaces": {"n": {}}})
    table = config.table("public", "applications")
    assert table is not None
    assert table.organizationColumn == "organizationId"
    assert table.requiredRoles == ()
    assert table.userColumn is None and table.ownerColumn is None and table.fields is None
    assert (table.onInsert, table.onUpdate, table.onDelete) == (True, True, True)
    assert table.masking == {}
    assert config.namespaces["n"].events is None
    assert config.manageReplicaIdentity is False
    assert config.historySeconds == 120


def test_no_path_means_an_empty_config() -> None:
    assert load_realtime_config(None) == RealtimeConfig()


def test_table_key_without_schema_means_public() -> None:
    config = parse_realtime_config(
        {"tables": {"applications": {}, "crm.contacts": {}, "a.b.c": {}}}
    )
    assert set(config.tables) == {"public.applications", "crm.contacts", "a.b.c"}
    table = config.table("public", "applications")
    assert table is not None
    assert (table.schema_name, table.table_name) == ("public", "applications")
    contacts = config.table("crm", "contacts")
    assert contacts is not None
    assert contacts.schema_name == "crm"
    assert config.table("crm", "applications") is None


def test_same_table_twice_is_an_error() -> None:
    message = _error({"tables": {"applications": {}, "public.applications": {}}})
    assert "configured twice" in message


def test_empty_table_name_is_an_error() -> None:
    assert "is empty" in _error({"tables": {"public.": {}}})


def test_unknown_table_key_names_file_table_and_key(tmp_path: Path) -> None:
    text = '[tables.applications]\norganizationColum = "orgId"\n'
    path = _write(tmp_path, text, "rt.toml")
    with pytest.raises(ConfigError) as info:
        load_realtime_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "tables.public.applications.organizationColum" in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"historySecond": 3}, "historySecond"),
        ({"namespaces": {"screening": {"event": ["a"]}}}, "namespaces.screening.event"),
        (
            {"tables": {"t": {"masking": {"ssn": {"type": "ssn", "hide": {}}}}}},
            "tables.public.t.masking.ssn.hide",
        ),
        (
            {"tables": {"t": {"masking": {"ssn": {"type": "ssn", "show": {"role": []}}}}}},
            "tables.public.t.masking.ssn.show.role",
        ),
    ],
)
def test_unknown_keys_anywhere_are_errors(data: dict[str, Any], where: str) -> None:
    message = _error(data)
    assert message.startswith("realtime.toml: invalid realtime config")
    assert where in message


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"historySeconds": 0}, "historySeconds"),
        ({"historyMaxTotalEvents": 0}, "historyMaxTotalEvents"),
        ({"tables": {"t": {"onInsert": "maybe"}}}, "tables.public.t.onInsert"),
        ({"tables": {"t": {"masking": {"c": {"type": "hash"}}}}}, "tables.public.t.masking.c.type"),
        ({"tables": {"t": 5}}, "tables.public.t"),
    ],
)
def test_invalid_values_name_the_key(data: dict[str, Any], where: str) -> None:
    assert where in _error(data)


def test_the_auth_namespace_is_reserved() -> None:
    message = _error({"namespaces": {"auth": {}}})
    assert "namespaces: Value error, namespace 'auth' is reserved for walcast's own events" in (
        message
    )


def test_custom_mask_needs_fn() -> None:
    message = _error({"tables": {"t": {"masking": {"ssn": {"type": "custom"}}}}})
    assert "tables.public.t.masking.ssn" in message
    assert 'type "custom" needs fn' in message


def test_custom_mask_fn_shape() -> None:
    message = _error({"tables": {"t": {"masking": {"ssn": {"type": "custom", "fn": "pkg.mod"}}}}})
    assert "package.module:function" in message
    config = parse_realtime_config(
        {"tables": {"t": {"masking": {"ssn": {"type": "custom", "fn": "pkg.mod:fn"}}}}}
    )
    assert config.tables["public.t"].masking["ssn"].fn == "pkg.mod:fn"


def test_show_or_owner_needs_owner_column() -> None:
    rule = {"type": "email", "show": {"or": "owner"}}
    message = _error({"tables": {"t": {"masking": {"email": rule}}}})
    assert "tables.public.t" in message
    assert 'masking.email: show.or = "owner" needs ownerColumn' in message
    ok = parse_realtime_config(
        {"tables": {"t": {"ownerColumn": "createdBy", "masking": {"email": rule}}}}
    )
    assert ok.tables["public.t"].masking["email"].show.or_ == "owner"


def test_show_or_accepts_only_owner() -> None:
    rule = {"type": "email", "show": {"or": "admin"}}
    assert "tables.public.t.masking.email.show.or" in _error(
        {"tables": {"t": {"ownerColumn": "c", "masking": {"email": rule}}}}
    )


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: file not found"):
        load_realtime_config(tmp_path / "missing.toml")
    bad = _write(tmp_path, "[tables\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_realtime_config(bad)


def test_internal_table_fields_cannot_be_set_from_the_file() -> None:
    # `schema_name` / `table_name` are filled in from the table key; written in the file they
    # are silently overwritten instead of being rejected as unknown keys.
    _error({"tables": {"applications": {"schema_name": "other"}}})


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"historySeconds = 60 # \xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        load_realtime_config(path)


# -- settings ------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.access_tokens == ()
    assert settings.config_path is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 4000
    assert settings.redis_url is None
    assert settings.slot == "walcast"
    assert settings.publication == "walcast"
    with pytest.raises(ConfigError, match="ACCESS_TOKEN is not set"):
        _ = settings.signing_secret


def test_settings_from_env() -> None:
    env = {
        "DATABASE_URL": "postgresql://localhost/app",
        "ACCESS_TOKEN": f" {NEW_SECRET} , {OLD_SECRET},,",
        "WALCAST_CONFIG": "/etc/walcast.toml",
        "WALCAST_HOST": "0.0.0.0",
        "WALCAST_PORT": "4100",
        "REDIS_URL": "redis://r:6379/1",
        "WALCAST_SLOT": "walcast_2",
        "WALCAST_PUBLICATION": "Pub_2",
        "WALCAST_HEARTBEAT_SECONDS": "5",
        "WALCAST_MAX_SEND_BUFFER": "1024",
        "WALCAST_WRITE_COALESCE_MS": "2.5",
        "WALCAST_MAX_BROADCAST_BYTES": "2048",
        "WALCAST_JWT_SESSION_SECRET": "jwt-secret",
        "WALCAST_JWT_SESSION_JWKS": "/etc/jwks.json",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://localhost/app"
    assert settings.access_tokens == (NEW_SECRET, OLD_SECRET)
    assert settings.signing_secret == NEW_SECRET
    assert settings.config_path == "/etc/walcast.toml"
    assert (settings.host, settings.port) == ("0.0.0.0", 4100)
    assert settings.redis_url == "redis://r:6379/1"
    assert (settings.slot, settings.publication) == ("walcast_2", "Pub_2")
    assert settings.heartbeat_seconds == 5.0
    assert settings.max_send_buffer == 1024
    assert settings.write_coalesce_ms == 2.5
    assert settings.max_broadcast_bytes == 2048
    assert settings.jwt_session_secret == "jwt-secret"
    assert settings.jwt_session_jwks == "/etc/jwks.json"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("secret", "ACCESS_TOKEN is 6 bytes long"),
        ("x" * 31, "ACCESS_TOKEN is 31 bytes long"),
        ("é" * 15, "ACCESS_TOKEN is 30 bytes long"),  # bytes, not characters
        (f"{NEW_SECRET},short", "secret 2 of 2 in ACCESS_TOKEN is 5 bytes long"),
        (f"tiny,{NEW_SECRET}", "secret 1 of 2 in ACCESS_TOKEN is 4 bytes long"),
    ],
)
def test_short_access_token_secrets_are_refused(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ACCESS_TOKEN": raw})
    assert str(caught.value) == (
        f"invalid settings: {message}; each secret must be at least 32 bytes. Make one with"
        ' `openssl rand -hex 32` or `python -c "import secrets; print(secrets.token_hex(32))"`'
    )
    # Never the secrets themselves, by either way of making settings.
    with pytest.raises(ValidationError) as direct:
        Settings(access_tokens=tuple(raw.split(",")))
    for secret in raw.split(","):
        if secret != "secret":  # that word is in the message
            assert secret not in str(caught.value) and secret not in str(direct.value)


def test_access_token_of_32_bytes_is_enough() -> None:
    assert Settings.from_env({"ACCESS_TOKEN": "x" * 32}).signing_secret == "x" * 32


def test_settings_empty_variables_mean_unset() -> None:
    env = {"DATABASE_URL": "", "ACCESS_TOKEN": " , ", "REDIS_URL": "", "WALCAST_CONFIG": ""}
    settings = Settings.from_env(env)
    assert settings.database_url is None
    assert settings.access_tokens == ()
    assert settings.redis_url is None
    assert settings.config_path is None


def test_settings_empty_host_means_default() -> None:
    assert Settings.from_env({"WALCAST_HOST": ""}).host == "127.0.0.1"


def test_settings_overrides_win_over_env() -> None:
    settings = Settings.from_env({"WALCAST_PORT": "4100"}, port=5000, host=None)
    assert settings.port == 5000
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"WALCAST_PORT": "http"}, "port"),
        ({"WALCAST_PORT": "70000"}, "port"),
        ({"WALCAST_SLOT": "Bad-Slot"}, "slot"),
        ({"WALCAST_PUBLICATION": "bad pub"}, "publication"),
        ({"WALCAST_HEARTBEAT_SECONDS": "0"}, "heartbeat_seconds"),
        ({"WALCAST_WRITE_COALESCE_MS": "-1"}, "write_coalesce_ms"),
        ({"WALCAST_WRITE_COALESCE_MS": "500"}, "write_coalesce_ms"),
    ],
)
def test_settings_errors_name_the_setting(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid settings: {key}"):
        Settings.from_env(env)


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match="portt"):
        Settings.from_env({}, portt=1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("one", ("one",)),
        ("one,two", ("one", "two")),
        (" one , two ,, ", ("one", "two")),
    ],
)
def test_split_secrets(raw: str, expected: tuple[str, ...]) -> None:
    assert split_secrets(raw) == expected
