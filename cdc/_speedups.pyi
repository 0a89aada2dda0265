from collections.abc import Callable, Sequence
from typing import Any

from cdc.messages import Cell, Toast

def read_cells(
    buf: bytes, pos: int, ncols: int, unchanged: Toast, /
) -> tuple[tuple[Cell, ...], int]: ...
def load_row(
    names: tuple[str, ...],
    codes: bytes,
    loaders: tuple[Callable[[Any], Any], ...],
    raw_json: type,
    unchanged: Any,
    cells: Sequence[Any],
    /,
) -> dict[str, Any]: ...
def load_values(
    codes: bytes,
    loaders: tuple[Callable[[Any], Any], ...],
    raw_json: type,
    unchanged: Any,
    cells: Sequence[Any],
    /,
) -> tuple[Any, ...]: ...
