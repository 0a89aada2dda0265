"""Configuration: the realtime config (a TOML file) and the process settings (the environment).

Both are validated with pydantic at the edge, then handed inward as plain, frozen objects. Errors
name the file, the table and the key, because the person reading them is editing that file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cdc.progress import READ_AHEAD_BYTES
from gateway.errors import ConfigError

__all__ = [
    "MIN_SECRET_BYTES",
    "RESERVED_NAMESPACES",
    "ConfigError",
    "MaskRule",
    "NamespaceConfig",
    "RealtimeConfig",
    "Settings",
    "TableConfig",
    "load_realtime_config",
    "parse_realtime_config",
]

#: Broadcast namespaces walcast keeps for its own events (`auth:token-invalidated`).
RESERVED_NAMESPACES = frozenset({"auth"})
#: The shortest `ACCESS_TOKEN` secret accepted: HMAC-SHA256 keys want 256 bits.
MIN_SECRET_BYTES = 32

MaskType = Literal["email", "phone", "ssn", "creditCard", "name", "redact", "custom"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ShowRule(_Strict):
    """Who sees a masked column raw: holders of any of `roles`, and the row's owner if `or`."""

    roles: tuple[str, ...] = ()
    or_: Literal["owner"] | None = Field(default=None, alias="or")


class MaskRule(_Strict):
    type: MaskType
    show: ShowRule = ShowRule()
    fn: str | None = None

    @model_validator(mode="after")
    def _custom_needs_fn(self) -> MaskRule:
        if self.type == "custom" and not self.fn:
            raise ValueError('type "custom" needs fn = "package.module:function"')
        if self.fn is not None and ":" not in self.fn:
            raise ValueError('fn must look like "package.module:function"')
        return self


class TableConfig(_Strict):
    """How one table's changes are routed, filtered and masked."""

    schema_name: str = Field(default="public", exclude=True)
    table_name: str = Field(default="", exclude=True)
    organizationColumn: str = "organizationId"
    requiredRoles: tuple[str, ...] = ()
    userColumn: str | None = None
    ownerColumn: str | None = None
    fields: tuple[str, ...] | None = None
    onInsert: bool = True
    onUpdate: bool = True
    onDelete: bool = True
    masking: dict[str, MaskRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _owner_rule_needs_owner_column(self) -> TableConfig:
        for column, rule in self.masking.items():
            if rule.show.or_ == "owner" and not self.ownerColumn:
                raise ValueError(f'masking.{column}: show.or = "owner" needs ownerColumn')
        return self

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_name}.{self.table_name}"

    def named_columns(self) -> dict[str, tuple[str, ...]]:
        """Each config key that names columns of the table → the columns it names."""
        keys: dict[str, tuple[str, ...]] = {"organizationColumn": (self.organizationColumn,)}
        if self.userColumn:
            keys["userColumn"] = (self.userColumn,)
        if self.ownerColumn:
            keys["ownerColumn"] = (self.ownerColumn,)
        if self.fields is not None:
            keys["fields"] = tuple(self.fields)
        if self.masking:
            keys["masking"] = tuple(self.masking)
        return keys


class NamespaceConfig(_Strict):
    """A declared broadcast namespace: events named `namespace:event` (defineRealtime())."""

    events: tuple[str, ...] | None = None
    requiredRoles: tuple[str, ...] = ()


class RealtimeConfig(_Strict):
    manageReplicaIdentity: bool = False
    historySeconds: float = Field(default=120.0, gt=0)
    historyMaxEvents: int = Field(default=100_000, gt=0)
    historyMaxTotalEvents: int = Field(default=500_000, gt=0)
    historyMaxBytes: int = Field(default=256 * 1024 * 1024, gt=0)
    tables: dict[str, TableConfig] = Field(default_factory=dict)
    namespaces: dict[str, NamespaceConfig] = Field(default_factory=dict)

    @field_validator("tables", mode="before")
    @classmethod
    def _qualify_table_names(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        qualified: dict[str, Any] = {}
        for key, body in value.items():
            schema, _, table = key.rpartition(".")
            schema = schema or "public"
            if not table:
                raise ValueError(f"table name {key!r} is empty")
            name = f"{schema}.{table}"
            if name in qualified:
                raise ValueError(f"table {name!r} is configured twice")
            if isinstance(body, Mapping):
                for internal in ("schema_name", "table_name"):
                    if internal in body:
                        raise ValueError(f"table {name!r}: unknown key {internal!r}")
                body = {**body, "schema_name": schema, "table_name": table}
            qualified[name] = body
        return qualified

    @field_validator("namespaces")
    @classmethod
    def _no_reserved_namespace(cls, value: dict[str, NamespaceConfig]) -> Any:
        for name in value:
            if name in RESERVED_NAMESPACES:
                raise ValueError(
                    f"namespace {name!r} is reserved for walcast's own events"
                    f" ({name}:token-invalidated); choose another name"
                )
        return value

    def table(self, schema: str, name: str) -> TableConfig | None:
        return self.tables.get(f"{schema}.{name}")


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid realtime config"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"] if part not in ("schema_name",))
        location = location.replace("tables.", "tables.", 1)
        lines.append(f"  {location or '(top level)'}: {item['msg']}")
    return "\n".join(lines)


def parse_realtime_config(data: Mapping[str, Any], source: str = "<config>") -> RealtimeConfig:
    """Validate an already-parsed TOML document."""
    try:
        return RealtimeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_realtime_config(path: str | os.PathLike[str] | None) -> RealtimeConfig:
    """Read and validate the TOML file at `path`; no path means an empty config."""
    if path is None:
        return RealtimeConfig()
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_realtime_config(data, source)


class Settings(BaseModel):
    """Process settings; `from_env` reads them from the environment (`DATABASE_URL`, ...)."""

    # Errors never repeat the input: it may be a secret or a URL with a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    database_url: str | None = None
    access_tokens: tuple[str, ...] = ()
    config_path: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=4000, ge=0, le=65535)
    redis_url: str | None = None
    slot: str = Field(default="walcast", pattern=r"^[a-z0-9_]{1,63}$")
    publication: str = Field(default="walcast", pattern=r"^[A-Za-z0-9_]{1,63}$")
    heartbeat_seconds: float = Field(default=25.0, gt=0)
    max_send_buffer: int = Field(default=4 * 1024 * 1024, gt=0)
    #: ``since=`` replays running at once on a node (the others queue), and how long a
    #: replaying socket may take nothing before it is closed as a slow consumer (gateway.hubs).
    max_replays: int = Field(default=4, ge=1)
    replay_stall_seconds: float = Field(default=10.0, gt=0)
    #: Under load, frames wait up to this long after a write pass to go out together
    #: (gateway.fanout); 0 writes on the next loop turn.
    write_coalesce_ms: float = Field(default=0.5, ge=0, le=50)
    max_broadcast_bytes: int = Field(default=256 * 1024, gt=0)
    #: Bytes of replication messages the reader takes ahead of the pipeline (cdc.progress).
    read_ahead_bytes: int = Field(default=READ_AHEAD_BYTES, ge=1024, le=64 * 1024 * 1024)
    #: DoS limits (docs/security.md); 0 disables a limit. Over a limit, the upgrade gets 429.
    max_connections_per_user: int = Field(default=100, ge=0)
    max_connections_per_org: int = Field(default=10_000, ge=0)
    handshake_rate: float = Field(default=50.0, ge=0)
    handshake_burst: int = Field(default=500, ge=0)
    #: Connection limits (gateway.server): over the per-address cap, 429 and close; 0 disables
    #: it. Keep-alive outlasts common client pools and load balancers (60 s), like nginx's 75 s.
    max_connections_per_address: int = Field(default=512, ge=0)
    idle_timeout_seconds: float = Field(default=10.0, gt=0)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=75.0, gt=0)
    #: Token buckets on the HTTP API, 0 disables: `WALCAST_TICKET_RATE` requests per second
    #: (`WALCAST_TICKET_BURST` saved up) per client address on POST ws-ticket, and
    #: `WALCAST_BROADCAST_RATE` (`WALCAST_BROADCAST_BURST`) per client address and per access
    #: token on the broadcast API. Over a limit, the request gets 429 with Retry-After.
    ticket_rate: float = Field(default=20.0, ge=0)
    ticket_burst: int = Field(default=200, ge=0)
    broadcast_rate: float = Field(default=200.0, ge=0)
    broadcast_burst: int = Field(default=2000, ge=0)
    jwt_session_secret: str | None = None
    jwt_session_jwks: str | None = None
    #: ``snapshot=true`` (gateway.snapshot): rows per snapshot at most (over it, an error frame
    #: instead of rows), and snapshots running at once per node (the rest wait).
    snapshot_max_rows: int = Field(default=10_000, gt=0)
    max_snapshots: int = Field(default=4, gt=0)

    @field_validator("access_tokens")
    @classmethod
    def _secrets_long_enough(cls, secrets: tuple[str, ...]) -> tuple[str, ...]:
        for number, secret in enumerate(secrets, 1):
            size = len(secret.encode())
            if size < MIN_SECRET_BYTES:
                which = f"secret {number} of {len(secrets)} in " if len(secrets) > 1 else ""
                raise ValueError(
                    f"{which}ACCESS_TOKEN is {size} bytes long; each secret must be at least"
                    f" {MIN_SECRET_BYTES} bytes. Make one with `openssl rand -hex 32` or"
                    ' `python -c "import secrets; print(secrets.token_hex(32))"`'
                )
        return secrets

    @property
    def signing_secret(self) -> str:
        if not self.access_tokens:
            raise ConfigError("ACCESS_TOKEN is not set")
        return self.access_tokens[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Each field from its variable (`_env_name`); unset or empty means the default."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"access_tokens": split_secrets(env.get("ACCESS_TOKEN", ""))}
        for key in cls.model_fields:
            if key == "access_tokens":
                continue
            raw = env.get(_env_name(key))
            if raw or (raw is not None and key in _EMPTY_IS_REFUSED):
                values[key] = raw
        values.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {_settings_errors(exc)}") from None


#: Fields whose variable is not `WALCAST_<FIELD>` (`access_tokens` is split from ACCESS_TOKEN).
_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "config_path": "WALCAST_CONFIG",
    "redis_url": "REDIS_URL",
}
#: Names PostgreSQL objects are made with: an empty one is refused, never taken as the default.
_EMPTY_IS_REFUSED = frozenset({"slot", "publication"})


def _env_name(field: str) -> str:
    """The environment variable a Settings field is read from."""
    return _ENV_NAMES.get(field, f"WALCAST_{field.upper()}")


def _settings_errors(exc: ValidationError) -> str:
    """One line per error; a validator's own message (it names its variable) stands alone."""
    details = []
    for error in exc.errors():
        if error["type"] == "value_error":
            details.append(str(error["ctx"]["error"]))
        else:
            details.append(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}")
    return "; ".join(details)


def split_secrets(raw: str) -> tuple[str, ...]:
    """`ACCESS_TOKEN` may hold several comma-separated secrets: sign with the first, accept any."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())
