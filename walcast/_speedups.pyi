from collections.abc import Callable
from typing import Any

def route_row_change(
    bound: tuple[
        dict[tuple[str, str], Any],
        list[Any],
        type,
        type,
        tuple[str, str, str],
        Callable[[Any], list[Any]],
    ],
    item: Any,
    /,
) -> list[Any]: ...
def publish_changes(
    items: list[Any],
    start: int,
    row_change: type,
    counts: dict[Any, int],
    route_change: Callable[[Any], Any],
    publish: Callable[[Any], Any],
    /,
) -> int: ...
