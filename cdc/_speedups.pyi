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
def change_run(
    messages: list[Any],
    start: int,
    items: list[Any],
    relations: dict[int, Relation],
    plans: dict[int, tuple[Any, ...]],
    row_change: type,
    raw_json: type,
    commit_lsn: int,
    position: int,
    kinds: tuple[str, str, str],
    no_columns: tuple[str, ...],
    /,
) -> tuple[int, int, int, int]: ...
