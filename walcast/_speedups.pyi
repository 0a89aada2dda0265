from collections.abc import Callable
from typing import Any

def route_row_change(
    tables: dict[tuple[str, str], Any],
    state: list[Any],
    row_change: type,
    event: type,
    kinds: tuple[str, str, str],
    fallback: Callable[[Any], list[Any]],
    item: Any,
    /,
) -> list[Any]: ...
