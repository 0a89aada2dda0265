"""SQL the database needs, shipped as package data so an installed walcast can apply it.

`schema_scripts()` are the migrations every deployment runs (`walcast migrate`); `DEMO_SCRIPT` is
the demo schema that only `walcast demo` applies. `apply` runs them; every script is written to
be run again (`IF NOT EXISTS`), so applying twice is harmless.
"""

from __future__ import annotations

from importlib import resources

import psycopg

__all__ = ["DEMO_SCRIPT", "apply", "read_script", "schema_scripts"]

DEMO_SCRIPT = "demo.sql"


def schema_scripts() -> list[str]:
    """Names of the numbered migration scripts, in the order they must run."""
    names = [
        entry.name
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".sql") and entry.name[:3].isdigit()
    ]
    return sorted(names)


def read_script(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def apply(dsn: str, *, demo: bool = False) -> list[str]:
    """Run the schema scripts (and the demo schema when `demo`) in order; returns their names."""
    names = schema_scripts() + ([DEMO_SCRIPT] if demo else [])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(read_script(name).encode())
    return names
