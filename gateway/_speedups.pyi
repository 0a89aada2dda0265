from collections.abc import Callable
from typing import Any

def raw_json_mask(row: dict[str, Any] | None, raw_json: type, /) -> int: ...
def change_entry(
    event: Any,
    now: float,
    micros: int,
    context: int,
    codec: tuple[type, Callable[[Any], bytes], Callable[[Any], bytes]],
    /,
) -> bytes: ...
def append_change(state: tuple[Any, type, Any, int, int], event: Any, /) -> None: ...
def publish_events(
    state: tuple[Any, Any, Any, dict[Any, Any], type, type], events: Any, /
) -> None: ...
