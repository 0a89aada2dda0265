"""SQL the database needs, shipped as package data so an installed walcast can apply it.

`schema_scripts()` are the migrations every deployment runs (`walcast migrate`); `DEMO_SCRIPT` is
the demo schema that only `walcast demo` applies.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["DEMO_SCRIPT", "read_script", "schema_scripts"]

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
