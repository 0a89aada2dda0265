"""What a socket asks for: `tables=`, `filter=` and `snapshot=` on the WebSocket URL.

Pure: no I/O. The upgrade handler parses the parameters here, looks up the filtered columns'
types (the only fact it needs from the database), and compiles a `Subscription`: a frozen,
hashable value that the hubs group sockets by, next to their roles, so a frame is still built
once per (visibility class, subscription) and never once per socket.

Rules:

* ``tables=public.applications,notes`` keeps a socket's ``postgres_changes`` to those tables
  (no schema means ``public``). Not configured → 400; configured but hidden from the caller's
  roles (``requiredRoles``) → 403. Broadcasts are never filtered.
* ``filter=<table>:<column>=<op>.<value>``, repeatable, AND within a table. Ops: ``eq``,
  ``neq``, ``lt``, ``lte``, ``gt``, ``gte``, ``in.(a,b,"c,d")``, ``is.null``, ``not.is.null``.
  A column outside the table, outside its ``fields``, or of a type filters cannot compare
  (json, arrays, intervals, ...) → 400; a column the caller's roles see masked → 403 (the
  filter would otherwise reveal the raw value), also when only the row's owner sees it raw.
* Values compare as PostgreSQL compares the column's type: integers and numerics exactly
  (Decimal), floats as doubles (NaN above every number), timestamps as instants (a value
  without an offset is UTC), timestamps without time zone and dates as such (``infinity``
  included), booleans as PostgreSQL spells them, uuids in any spelling PostgreSQL accepts.
  Text compares by code point: the ``C`` collation, whatever the column's collation is.
  NULL satisfies nothing but ``is.null``; a row whose value cannot be read satisfies nothing.
* Filters apply after role filtering, to the unmasked row: an UPDATE whose old row matches
  and new row does not is delivered as a DELETE of the old row; the reverse as an INSERT of
  the new row; neither → nothing. So a client's copy equals exactly the filtered rows.

Every parse error is a `SubscriptionError` with the HTTP status and a message that names the
parameter; nothing else escapes (`tests/test_subscriptions.py` fuzzes the parser).
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.config import RealtimeConfig, TableConfig
from gateway.events import ChangeEvent
from gateway.policy import PolicyCache

__all__ = [
    "ALL",
    "ColumnKind",
    "FilterRequest",
    "Predicate",
    "Subscription",
    "SubscriptionError",
    "SubscriptionRequest",
    "column_kind",
    "compile_subscription",
    "parse_subscription",
]

MAX_FILTERS = 32  #: per socket
MAX_IN_VALUES = 100  #: per in.(...)
MAX_PARAMETER_LENGTH = 2048  #: characters per tables= or filter= value

_OPS = ("eq", "neq", "lt", "lte", "gt", "gte")


class SubscriptionError(Exception):
    """A bad ``tables``/``filter``/``snapshot`` parameter: 400, or 403 for what the caller may
    not see."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> SubscriptionError:
    return SubscriptionError(400, message)


class ColumnKind(enum.Enum):
    """How a column's values compare (see the module docstring)."""

    INTEGER = "integer"
    NUMERIC = "numeric"
    FLOAT = "float"
    BOOLEAN = "boolean"
    TIMESTAMPTZ = "timestamptz"
    TIMESTAMP = "timestamp"
    DATE = "date"
    TEXT = "text"
    UUID = "uuid"
    ENUM = "enum"  #: equality only: an enum's order is its declaration's, not its labels'


_KINDS_BY_TYPE = {
    "smallint": ColumnKind.INTEGER,
    "integer": ColumnKind.INTEGER,
    "bigint": ColumnKind.INTEGER,
    "numeric": ColumnKind.NUMERIC,
    "real": ColumnKind.FLOAT,
    "double precision": ColumnKind.FLOAT,
    "boolean": ColumnKind.BOOLEAN,
    "timestamp with time zone": ColumnKind.TIMESTAMPTZ,
    "timestamp without time zone": ColumnKind.TIMESTAMP,
    "date": ColumnKind.DATE,
    "text": ColumnKind.TEXT,
    "character varying": ColumnKind.TEXT,
    "name": ColumnKind.TEXT,
    "uuid": ColumnKind.UUID,
}


def column_kind(type_name: str, category: str) -> ColumnKind | None:
    """The kind of a column of type `type_name` (``format_type(oid, NULL)``) and
    ``pg_type.typcategory`` `category`; None: filters cannot compare it."""
    kind = _KINDS_BY_TYPE.get(type_name)
    if kind is None and category == "E":
        kind = ColumnKind.ENUM
    return kind


# --- values as PostgreSQL compares them -----------------------------------------------------

_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})
_NAN_KEY = (1, Decimal(0))  #: NaN sorts above every number, Infinity included


def _integer(text: str) -> Any:
    stripped = text.strip()
    if not stripped or not stripped.lstrip("+-").isdigit() or not stripped.isascii():
        raise ValueError
    return (0, Decimal(int(stripped)))


def _numeric(text: str) -> Any:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError from None
    if number.is_nan():
        return _NAN_KEY
    return (0, number)


def _float(text: str) -> Any:
    number = float(text.strip())  # ValueError for what is not a number
    return _NAN_KEY if math.isnan(number) else (0, number)


def _boolean(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError


def _infinite(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered == "infinity" or lowered == "+infinity":
        return (1, None)
    if lowered == "-infinity":
        return (-1, None)
    return None


def _timestamptz(text: str) -> Any:
    special = _infinite(text)
    if special is not None:
        return special
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (0, moment)


def _timestamp(text: str) -> Any:
    special = _infinite(text)
    if special is not None:
        return special
    return (0, datetime.fromisoformat(text.strip()).replace(tzinfo=None))


def _date(text: str) -> Any:
    special = _infinite(text)
    if special is not None:
        return special
    stripped = text.strip()
    try:
        return (0, date.fromisoformat(stripped))
    except ValueError:
        return (0, datetime.fromisoformat(stripped).date())


def _uuid(text: str) -> Any:
    return uuid.UUID(text.strip())


def _text(text: str) -> Any:
    return text


_PARSE: dict[ColumnKind, Callable[[str], Any]] = {
    ColumnKind.INTEGER: _integer,
    ColumnKind.NUMERIC: _numeric,
    ColumnKind.FLOAT: _float,
    ColumnKind.BOOLEAN: _boolean,
    ColumnKind.TIMESTAMPTZ: _timestamptz,
    ColumnKind.TIMESTAMP: _timestamp,
    ColumnKind.DATE: _date,
    ColumnKind.TEXT: _text,
    ColumnKind.UUID: _uuid,
    ColumnKind.ENUM: _text,
}


def _row_key(kind: ColumnKind, value: Any) -> Any:
    """The comparison key of a row's value (as `cdc.changes` or ``to_jsonb`` gave it); raises
    ValueError or TypeError if it cannot be read as `kind`."""
    if kind is ColumnKind.BOOLEAN:
        if isinstance(value, bool):
            return value
        raise TypeError
    if kind in (ColumnKind.INTEGER, ColumnKind.NUMERIC):
        if isinstance(value, bool):
            raise TypeError
        return _numeric(str(value))
    if kind is ColumnKind.FLOAT:
        return _float(str(value))
    if not isinstance(value, str):
        raise TypeError
    return _PARSE[kind](value)


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterRequest:
    """One ``filter=`` parameter, parsed but not yet checked against the table."""

    table: str  #: qualified: ``schema.table``
    column: str
    op: str  #: eq, neq, lt, lte, gt, gte, in, is.null, not.is.null
    values: tuple[str, ...]  #: the operand texts (several for in, none for the null tests)
    source: str  #: the parameter as given, for error messages


def _qualified(name: str) -> str:
    schema, _, table = name.strip().rpartition(".")
    return f"{schema or 'public'}.{table}"


def _split_list(body: str, where: str) -> tuple[str, ...]:
    """``a,b,"c,d"`` → ``("a", "b", "c,d")``; a double-quoted item may escape ``"`` and ``\\``."""
    items: list[str] = []
    index, size = 0, len(body)
    while True:
        if index < size and body[index] == '"':
            index += 1
            chars: list[str] = []
            while True:
                if index >= size:
                    raise _bad(f"{where}: unterminated quote in in.(...)")
                char = body[index]
                if char == "\\" and index + 1 < size:
                    chars.append(body[index + 1])
                    index += 2
                elif char == '"':
                    index += 1
                    break
                else:
                    chars.append(char)
                    index += 1
            items.append("".join(chars))
            if index < size and body[index] != ",":
                raise _bad(f"{where}: expected ',' after a quoted value in in.(...)")
        else:
            end = body.find(",", index)
            end = size if end < 0 else end
            item = body[index:end]
            if '"' in item:
                raise _bad(f"{where}: a quote may only start a value in in.(...)")
            items.append(item)
            index = end
        if index >= size:
            break
        index += 1  # the comma
    if len(items) > MAX_IN_VALUES:
        raise _bad(f"{where}: at most {MAX_IN_VALUES} values in in.(...)")
    return tuple(items)


def parse_filter(text: str) -> FilterRequest:
    """Parse one ``filter=`` value: ``<table>:<column>=<op>.<value>``.

    Raises:
        SubscriptionError: 400, naming what is wrong.
    """
    where = f"filter {text[:80]!r}"
    if len(text) > MAX_PARAMETER_LENGTH:
        raise _bad(f"filter: longer than {MAX_PARAMETER_LENGTH} characters")
    table, colon, rest = text.partition(":")
    if not colon or not table.strip() or table.strip().endswith("."):
        raise _bad(f"{where}: expected <table>:<column>=<op>.<value>")
    column, equals, condition = rest.partition("=")
    if not equals or not column:
        raise _bad(f"{where}: expected <table>:<column>=<op>.<value>")
    values: tuple[str, ...]
    if condition == "is.null":
        op, values = "is.null", ()
    elif condition == "not.is.null":
        op, values = "not.is.null", ()
    else:
        op, dot, operand = condition.partition(".")
        if not dot or op not in (*_OPS, "in"):
            raise _bad(
                f"{where}: unknown operator; use eq, neq, lt, lte, gt, gte, in.(a,b),"
                " is.null or not.is.null followed by '.' and a value"
            )
        if op == "in":
            if not (operand.startswith("(") and operand.endswith(")")) or len(operand) < 2:
                raise _bad(f"{where}: in takes a list: in.(a,b,c)")
            values = _split_list(operand[1:-1], where)
        else:
            values = (operand,)
    return FilterRequest(_qualified(table), column, op, values, text)


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """The parameters, checked against the config and the caller's roles; the filtered
    columns' types are still to be looked up (`columns_to_type`)."""

    tables: frozenset[str] | None  #: None: every table the caller may see
    filters: tuple[FilterRequest, ...]
    snapshot: bool

    @property
    def default(self) -> bool:
        """Nothing asked for: today's protocol exactly."""
        return self.tables is None and not self.filters and not self.snapshot

    def columns_to_type(self) -> dict[str, set[str]]:
        """Per table, the columns whose types `compile_subscription` needs."""
        wanted: dict[str, set[str]] = {}
        for item in self.filters:
            wanted.setdefault(item.table, set()).add(item.column)
        return wanted


def _visible_table(
    name: str, config: RealtimeConfig, roles: frozenset[str], policies: PolicyCache, where: str
) -> TableConfig:
    schema, _, table_name = name.partition(".")
    table = config.table(schema, table_name)
    if table is None:
        raise _bad(f"{where}: table {name!r} is not configured for realtime")
    if not policies.get(table).allows(roles):
        raise SubscriptionError(403, f"{where}: your roles may not see table {name!r}")
    return table


def parse_subscription(
    tables: Sequence[str],
    filters: Sequence[str],
    snapshot: Sequence[str],
    *,
    config: RealtimeConfig,
    roles: frozenset[str],
    policies: PolicyCache,
) -> SubscriptionRequest:
    """Check the query parameters' values (each list as `MultiDict.getall` gives it).

    Raises:
        SubscriptionError: 400 for what is malformed or unknown, 403 for a table the roles
            may not see or a column they see masked.
    """
    if len(tables) > 1:
        raise _bad("tables may be given once (a comma-separated list)")
    if len(snapshot) > 1:
        raise _bad("snapshot may be given once")
    if len(filters) > MAX_FILTERS:
        raise _bad(f"at most {MAX_FILTERS} filter parameters")
    wanted: frozenset[str] | None = None
    if tables:
        if len(tables[0]) > MAX_PARAMETER_LENGTH:
            raise _bad(f"tables: longer than {MAX_PARAMETER_LENGTH} characters")
        names = [part.strip() for part in tables[0].split(",")]
        if not all(names) or any(name.endswith(".") for name in names):
            raise _bad("tables: expected a comma-separated list of table names")
        wanted = frozenset(_qualified(name) for name in names)
        for name in sorted(wanted):
            _visible_table(name, config, roles, policies, "tables")
    take_snapshot = False
    if snapshot:
        flag = snapshot[0].strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise _bad("snapshot: expected true or false")
        take_snapshot = flag in ("true", "1")
    parsed = tuple(parse_filter(text) for text in filters)
    for item in parsed:
        where = f"filter {item.source[:80]!r}"
        if wanted is not None and item.table not in wanted:
            raise _bad(f"{where}: table {item.table!r} is not in tables=")
        table = _visible_table(item.table, config, roles, policies, where)
        policy = policies.get(table)
        if table.fields is not None and item.column not in table.fields:
            raise _bad(f"{where}: column {item.column!r} is not among the table's fields")
        if item.column in policy.masks and item.column not in policy.raw_columns(roles):
            raise SubscriptionError(
                403, f"{where}: column {item.column!r} is masked for your roles"
            )
    return SubscriptionRequest(wanted, parsed, take_snapshot)


# --- compiled filters ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Predicate:
    """One compiled condition on one column: operands already parsed as the column's kind."""

    column: str
    op: str
    kind: ColumnKind
    operands: tuple[Any, ...]

    def test(self, row: Mapping[str, Any]) -> bool:
        if self.column not in row:
            return False  # an unchanged TOAST value PostgreSQL did not send: unknown
        value = row[self.column]
        op = self.op
        if op == "is.null":
            return value is None
        if op == "not.is.null":
            return value is not None
        if value is None:
            return False
        try:
            key = _row_key(self.kind, value)
            if op == "in":
                return key in self.operands
            operand = self.operands[0]
            if op == "eq":
                return bool(key == operand)
            if op == "neq":
                return bool(key != operand)
            if op == "lt":
                return bool(key < operand)
            if op == "lte":
                return bool(key <= operand)
            if op == "gt":
                return bool(key > operand)
            return bool(key >= operand)
        except (ValueError, TypeError):
            return False  # not readable as the column's type (say, a BC date): no match


def _compile(item: FilterRequest, kind: ColumnKind | None, type_name: str) -> Predicate:
    where = f"filter {item.source[:80]!r}"
    if kind is None:
        raise _bad(f"{where}: cannot filter on column {item.column!r} of type {type_name}")
    if kind in (ColumnKind.ENUM, ColumnKind.UUID) and item.op in ("lt", "lte", "gt", "gte"):
        raise _bad(f"{where}: {item.op} cannot compare column {item.column!r} of type {type_name}")
    parse = _PARSE[kind]
    operands: list[Any] = []
    for text in item.values:
        try:
            operands.append(parse(text))
        except (ValueError, TypeError, OverflowError):
            raise _bad(
                f"{where}: {text[:40]!r} is not a valid {kind.value} for column"
                f" {item.column!r} ({type_name})"
            ) from None
    return Predicate(item.column, item.op, kind, tuple(operands))


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a socket receives of ``postgres_changes``: hashable, so sockets group by it."""

    tables: frozenset[str] | None = None
    #: Per qualified table name, its predicates (AND), sorted so equal filters compare equal.
    filters: tuple[tuple[str, tuple[Predicate, ...]], ...] = ()

    def wants(self, table: TableConfig) -> bool:
        return self.tables is None or table.qualified_name in self.tables

    def predicates(self, table: TableConfig) -> tuple[Predicate, ...]:
        name = table.qualified_name
        for filtered, predicates in self.filters:
            if filtered == name:
                return predicates
        return ()

    def matches(self, table: TableConfig, row: Mapping[str, Any]) -> bool:
        """Whether `row` (unmasked) satisfies every filter on `table`."""
        return all(predicate.test(row) for predicate in self.predicates(table))

    def view(self, event: ChangeEvent) -> ChangeEvent | None:
        """`event` as this subscription delivers it: unchanged, turned into an INSERT or a
        DELETE by a filter it enters or leaves, or None (not wanted)."""
        table = event.table
        if not self.wants(table):
            return None
        predicates = self.predicates(table)
        if not predicates or event.event_type == "TRUNCATE":
            return event
        if event.event_type == "INSERT":
            return event if event.new is not None and self.matches(table, event.new) else None
        if event.event_type == "DELETE":
            return event if event.old is not None and self.matches(table, event.old) else None
        new_in = event.new is not None and self.matches(table, event.new)
        old_in = new_in if event.old is None else self.matches(table, event.old)
        if new_in and old_in:
            return event
        if new_in:
            return event._replace(event_type="INSERT", old=None)
        if old_in:
            return event._replace(event_type="DELETE", new=None, unchanged=())
        return None


ALL = Subscription()
"""Every table the roles may see, unfiltered: a socket that asks for nothing."""


def compile_subscription(
    request: SubscriptionRequest, types: Mapping[str, Mapping[str, tuple[str, str]]]
) -> Subscription:
    """The `Subscription` for `request`, given per table the (type name, category) of each
    column (``format_type(atttypid, NULL)``, ``typcategory``).

    Raises:
        SubscriptionError: 400 for an unknown column, a type filters cannot compare, or an
            operand that is not a value of the column's type.
    """
    by_table: dict[str, list[Predicate]] = {}
    for item in request.filters:
        columns = types.get(item.table, {})
        described = columns.get(item.column)
        if described is None:
            raise _bad(
                f"filter {item.source[:80]!r}: table {item.table!r} has no column {item.column!r}"
            )
        type_name, category = described
        predicate = _compile(item, column_kind(type_name, category), type_name)
        by_table.setdefault(item.table, []).append(predicate)
    filters = tuple(
        (name, tuple(sorted(set(predicates), key=repr)))
        for name, predicates in sorted(by_table.items())
    )
    if request.tables is None and not filters:
        return ALL
    return Subscription(request.tables, filters)
