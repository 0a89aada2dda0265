"""Per-table visibility: who may see a table's rows, and which masked columns they see raw.

A `TablePolicy` is bound once per table from its config. For a set of roles it answers, from a
cache, whether those roles may see the table at all and which masked columns they see raw: that
pair is the visibility class that fan-out serializes once for.
"""

from __future__ import annotations

from typing import Any

from gateway.config import MaskRule, TableConfig
from gateway.masking import mask_value

__all__ = ["PolicyCache", "TablePolicy"]

Roles = frozenset[str]


class TablePolicy:
    def __init__(self, table: TableConfig) -> None:
        self.table = table
        self.required_roles: Roles = frozenset(table.requiredRoles)
        self.fields = table.fields
        self.masks: dict[str, MaskRule] = dict(table.masking)
        self._owner_columns: frozenset[str] = frozenset(
            column for column, rule in self.masks.items() if rule.show.or_ == "owner"
        )
        self.has_owner_rule = bool(self._owner_columns)
        self._allowed: dict[Roles, bool] = {}
        self._raw: dict[tuple[Roles, bool], frozenset[str]] = {}
        self._hidden: dict[frozenset[str], tuple[tuple[str, MaskRule], ...]] = {}

    def allows(self, roles: Roles) -> bool:
        allowed = self._allowed.get(roles)
        if allowed is None:
            allowed = not self.required_roles or bool(self.required_roles & roles)
            self._allowed[roles] = allowed
        return allowed

    def raw_columns(self, roles: Roles, is_owner: bool = False) -> frozenset[str]:
        """The masked columns these roles (and, if `is_owner`, the row's owner) see raw."""
        key = (roles, is_owner)
        raw = self._raw.get(key)
        if raw is None:
            raw = frozenset(
                column
                for column, rule in self.masks.items()
                if roles.intersection(rule.show.roles)
                or (is_owner and column in self._owner_columns)
            )
            self._raw[key] = raw
        return raw

    def shape(self, row: dict[str, Any] | None, raw: frozenset[str]) -> dict[str, Any] | None:
        """The row as a viewer with `raw` visibility gets it: allow-listed, then masked.

        A viewer who sees every column raw gets `row` itself, not a copy: it is only read.
        """
        if row is None:
            return None
        hidden = self._hidden.get(raw)
        if hidden is None:
            hidden = self._hidden[raw] = tuple(
                (column, rule) for column, rule in self.masks.items() if column not in raw
            )
        if self.fields is not None:
            shaped = {name: row[name] for name in self.fields if name in row}
        elif not hidden:
            return row
        else:
            shaped = dict(row)
        for column, rule in hidden:
            if column in shaped:
                shaped[column] = mask_value(rule, shaped[column])
        return shaped

    def visible_unchanged(self, unchanged: tuple[str, ...]) -> list[str]:
        if self.fields is None:
            return list(unchanged)
        return [name for name in unchanged if name in self.fields]


class PolicyCache:
    """One TablePolicy per configured table, made on first use."""

    def __init__(self) -> None:
        self._policies: dict[int, TablePolicy] = {}

    def get(self, table: TableConfig) -> TablePolicy:
        policy = self._policies.get(id(table))
        if policy is None:
            policy = self._policies[id(table)] = TablePolicy(table)
        return policy
