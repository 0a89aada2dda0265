"""The pipeline's loop over a run of row changes: `walcast._speedups.publish_changes` does
what its Python twin `walcast.pipeline.publish_changes_py` does, for any batch.

Both count each row change under (schema, table, kind), route it, publish a non-empty
answer, stop at the first item that is not a row change, and let an exception from routing
or publishing through with that item already counted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.changes import RowChange, TransactionEnd
from walcast.pipeline import publish_changes_py

try:
    from walcast._speedups import publish_changes as publish_changes_c
except ImportError:  # built without a C compiler
    publish_changes_c = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(publish_changes_c is None, reason="walcast._speedups was not built")

WHEN = datetime(2026, 12, 2, tzinfo=UTC)


class _Refused(Exception):
    pass


def _route(item: RowChange) -> Any:
    """A stand-in router whose answer depends on the change: events, nothing, or an error."""
    answer = item.position % 5
    if answer == 0:
        return []
    if answer == 1:
        return ()  # falsy too
    if answer == 4 and item.table == "refused":
        raise _Refused(f"route {item.position}")
    return [("event", item.position)] * answer


_ROW_CHANGES = st.builds(
    lambda position, table, kind: RowChange(
        0x10, position, "public", table, kind, {"id": position}, None, ()
    ),
    st.integers(1, 50),
    st.sampled_from(["a", "b", "refused"]),
    st.sampled_from(["INSERT", "UPDATE", "DELETE"]),
)
_ITEMS = st.lists(
    st.one_of(  # mostly row changes: runs of them, of mixed tables and kinds
        _ROW_CHANGES,
        _ROW_CHANGES,
        _ROW_CHANGES,
        st.just(TransactionEnd(0x10, 0x20, WHEN)),
        st.just("not an item"),
        st.just(("row", "shaped", "public", "a", "INSERT", {}, None, ())),  # not a RowChange
    ),
    max_size=30,
)


def _run(loop: Any, items: list[Any], start: int, refuse: int) -> tuple[Any, ...]:
    counts: dict[Any, int] = {("public", "a", "INSERT"): 7}
    published: list[Any] = []

    def publish(events: Any) -> None:
        if events[0][1] == refuse:
            raise _Refused(f"publish {refuse}")
        published.append(events)

    try:
        outcome: Any = loop(items, start, RowChange, counts, _route, publish)
    except _Refused as exc:
        outcome = str(exc)
    return outcome, counts, published


@needs_c
@given(_ITEMS, st.integers(0, 31), st.integers(0, 60))
def test_the_c_loop_does_what_the_python_loop_does(
    items: list[Any], start: int, refuse: int
) -> None:
    start = min(start, len(items))
    expected = _run(publish_changes_py, items, start, refuse)
    assert _run(publish_changes_c, items, start, refuse) == expected
    stop = expected[0]
    if isinstance(stop, int):  # it stops at the first item that is not a row change
        assert all(type(item) is RowChange for item in items[start:stop])
        assert stop == len(items) or type(items[stop]) is not RowChange


def test_a_run_is_counted_routed_and_published() -> None:
    changes = [
        RowChange(0x10, n, "public", table, kind, {"id": n}, None, ())
        for n, table, kind in (
            (2, "a", "INSERT"), (3, "a", "INSERT"), (5, "a", "INSERT"), (6, "a", "DELETE"),
            (7, "b", "DELETE"), (10, "a", "INSERT"),
        )
    ]  # fmt: skip
    items: list[Any] = [*changes, TransactionEnd(0x10, 0x20, WHEN), changes[0]]
    loops = [publish_changes_py] + ([publish_changes_c] if publish_changes_c else [])
    for loop in loops:
        stop, counts, published = _run(loop, items, 0, refuse=-1)
        assert stop == 6
        assert counts == {  # 7 before
            ("public", "a", "INSERT"): 11,
            ("public", "a", "DELETE"): 1,
            ("public", "b", "DELETE"): 1,
        }
        assert published == [  # 5 and 10 route to nothing, 6 to an empty tuple
            [("event", 2)] * 2, [("event", 3)] * 3, [("event", 7)] * 2
        ]  # fmt: skip


@needs_c
def test_the_c_loop_checks_its_arguments() -> None:
    assert publish_changes_c is not None
    with pytest.raises(TypeError):
        publish_changes_c((), 0, RowChange, {}, _route, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        publish_changes_c([], 0, RowChange, [], _route, print)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        publish_changes_c([], -1, RowChange, {}, _route, print)
