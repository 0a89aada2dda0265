from cdc.messages import Cell, Toast

def read_cells(
    buf: bytes, pos: int, ncols: int, unchanged: Toast, /
) -> tuple[tuple[Cell, ...], int]: ...
