from collections.abc import Callable, Sequence
from typing import Any

from cdc.messages import Cell, Insert, Relation, Toast
from cdc.replication import XLogData

def read_cells(
    buf: bytes, pos: int, ncols: int, unchanged: Toast, /
) -> tuple[tuple[Cell, ...], int]: ...
def read_insert(
    buf: bytes, relations: dict[int, Relation], insert: type[Insert], unchanged: Toast, /
) -> Insert | None: ...
def xlog_data(buf: object, cls: type[XLogData], /) -> XLogData | None: ...
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
