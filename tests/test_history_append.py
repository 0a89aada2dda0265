"""`MemoryHistory.append` in C (`gateway._speedups.append_change`) keeps exactly what its
Python definition, `MemoryHistory._append`, keeps: the same entries in the same histories,
the same counts, bounds, node-wide order and position, whatever the stream of events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gateway.history
from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.events import BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.history import CHUNK, MemoryHistory

try:
    from gateway._speedups import append_change
except ImportError:  # built without a C compiler
    append_change = None

needs_c = pytest.mark.skipif(append_change is None, reason="gateway._speedups was not built")

_CONFIG = parse_realtime_config({"tables": {"notes": {}, "tasks": {}}}).tables
TABLES = (_CONFIG["public.notes"], _CONFIG["public.tasks"])
WHEN = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
#: Two commit times, and a third equal to the first but another object: the entry's commit
#: time is worked out again for it (the last change is matched by identity).
TIMES = (WHEN, WHEN + timedelta(seconds=1), WHEN + timedelta(0))
#: Epochs, the last equal to the first but another object (matched by equality).
EPOCHS = ("e1", "e2", "".join(["e", "1"]))

_rows = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"id": st.integers(0, 9).map(lambda n: RawJson(str(n))), "title": st.text(max_size=8)}
    ),
    st.fixed_dictionaries({"tags": st.lists(st.integers(0, 3), max_size=2)}),  # tagged entry
)

_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("change"),
            st.sampled_from([None, "a", "b", "c"]),
            st.integers(0, len(TIMES) - 1),
            st.integers(0, len(TABLES) - 1),
            st.integers(0, len(EPOCHS) - 1),
            _rows,
            _rows,
        ),
        st.tuples(st.just("burst"), st.sampled_from(["a", "b"]), st.integers(1, 3 * CHUNK)),
        st.tuples(st.just("broadcast"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("wait"), st.floats(0.0, 3.0)),
        st.tuples(st.just("trim")),
    ),
    max_size=80,
)


def _state(history: MemoryHistory) -> dict[str, Any]:
    """Everything `append` may change, as plain values."""
    return {
        "orgs": {
            org: (list(kept), kept.length, kept.head, kept.index, kept.evicted_up_to)
            for org, kept in history._orgs.items()
        },
        "shared": (list(history._shared), history._shared.length, history._shared.evicted_up_to),
        "size": len(history),
        "bytes": history.nbytes,
        "order": list(history._oldest),
        "position": history.position,
        "last": history._last_change[3:],
        "contexts": [(id(table), epoch) for table, epoch in history._contexts],
    }


def _run(steps: list[tuple[Any, ...]], use_c: bool, bounds: tuple[int, int, int]) -> MemoryHistory:
    now = [0.0]
    max_events, max_total_events, max_total_bytes = bounds
    history = MemoryHistory(
        seconds=5.0,
        max_events=max_events,
        max_total_events=max_total_events,
        max_total_bytes=max_total_bytes,
        clock=lambda: now[0],
    )
    append = history.append if use_c else history._append
    lsn = 0x100
    for step in steps:
        kind = step[0]
        events: list[RoutedEvent] = []
        if kind == "change":
            _, org, when, table, epoch, new, old = step
            lsn += 1
            events.append(
                ChangeEvent(
                    org, (lsn, 1), EPOCHS[epoch], TIMES[when], TABLES[table],
                    "UPDATE" if org else "TRUNCATE", new, old, (), None, None, lsn,
                )
            )  # fmt: skip
        elif kind == "burst":
            _, org, count = step
            for _ in range(count):
                lsn += 1
                events.append(
                    ChangeEvent(
                        org, (lsn, 1), "e1", WHEN, TABLES[0], "INSERT", {"id": lsn}, None,
                        (), None, None, 7,
                    )
                )  # fmt: skip
        elif kind == "broadcast":
            lsn += 1
            events.append(
                BroadcastEvent(
                    step[1], (lsn, 1), "e1", "ping", orjson.Fragment(b"{}"), frozenset(), None
                )
            )
        elif kind == "wait":
            now[0] += step[1]
        else:
            history.trim()
        for event in events:
            append(event)
    return history


@needs_c
@settings(max_examples=150, deadline=None)
@given(
    steps=_steps,
    max_events=st.integers(1, 3 * CHUNK),
    max_total_events=st.integers(1, 6 * CHUNK),
    max_total_bytes=st.integers(1_000, 200_000),
)
@example(  # every path at once: new histories, chunks sealed, all three bounds, a trim
    steps=[
        ("change", "a", 0, 0, 0, None, None),
        ("burst", "a", 3 * CHUNK),
        ("change", None, 2, 1, 2, {"tags": [1]}, None),
        ("burst", "b", 2 * CHUNK),
        ("wait", 6.0),
        ("broadcast", "b"),
        ("trim",),
    ],
    max_events=2 * CHUNK,
    max_total_events=4 * CHUNK,
    max_total_bytes=20_000,
)
def test_the_c_append_keeps_what_the_python_append_keeps(
    steps: list[tuple[Any, ...]], max_events: int, max_total_events: int, max_total_bytes: int
) -> None:
    bounds = (max_events, max_total_events, max_total_bytes)
    by_c, by_python = _run(steps, True, bounds), _run(steps, False, bounds)
    assert _state(by_c) == _state(by_python)


@needs_c
def test_a_history_appends_in_c_when_it_can() -> None:
    history = MemoryHistory()
    assert history.append.func is append_change  # type: ignore[attr-defined]


@needs_c
def test_the_c_append_refuses_bad_arguments_and_keeps_nothing_on_errors() -> None:
    event = ChangeEvent("a", (0x10, 1), "e1", WHEN, TABLES[0], "INSERT", {}, None, (), None, None)
    assert append_change is not None
    with pytest.raises(TypeError):
        append_change((MemoryHistory(),), event)
    with pytest.raises(TypeError):
        append_change()  # type: ignore[call-arg]

    def broken_clock() -> float:
        raise RuntimeError("clock")

    history = MemoryHistory(clock=broken_clock)
    with pytest.raises(RuntimeError, match="clock"):
        history.append(event)
    assert len(history) == 0 and history.nbytes == 0
    bad = ChangeEvent("a", (-1, 1), "e1", WHEN, TABLES[0], "INSERT", {}, None, (), None, None)
    with pytest.raises(OverflowError):
        MemoryHistory().append(bad)


def test_without_the_extension_a_history_appends_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.history, "append_change", None)
    history = MemoryHistory()
    assert history.append == history._append
    event = ChangeEvent(
        "a", (0x10, 1), "e1", WHEN, TABLES[0], "INSERT", {"id": RawJson("1")}, None, (), None,
        None,
    )  # fmt: skip
    history.append(event)
    assert history.held("a") == [event]
