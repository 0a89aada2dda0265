"""`MemoryHistory` as pure code: what a resume after a cursor gets, when a cursor is too old
(or from elsewhere) to answer without a gap, and the three bounds (time, per organization,
per node in events and in bytes). No hubs, no sockets: the hubs' side of a resume is in
tests/test_hubs.py."""

from __future__ import annotations

import gc
import struct
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.cursors import CursorKey, format_cursor
from cdc.render import RawJson
from gateway.config import parse_realtime_config
from gateway.events import BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.history import CHUNK, ENTRY_OVERHEAD, MemoryHistory, _Kept
from walcast.pipeline import HISTORY_TRIM_SLACK

TABLE = parse_realtime_config({"tables": {"notes": {}}}).tables["public.notes"]
WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _event(lsn: int, org: str | None = "o") -> ChangeEvent:
    kind = "INSERT" if org is not None else "TRUNCATE"
    row = {"id": f"{org}-{lsn:x}"} if org is not None else None
    return ChangeEvent(org, (lsn, 1), "", WHEN, TABLE, kind, row, None, (), None, None)


def _ids(events: Sequence[RoutedEvent] | None) -> list[str] | None:
    if events is None:
        return None
    return [e.cursor for e in events]


def _streaming(
    seconds: float = 120.0, max_events: int = 100_000, max_total_events: int = 500_000
) -> tuple[MemoryHistory, list[float]]:
    """A history complete from 0x10 on, with a clock the test moves."""
    now = [0.0]
    history = MemoryHistory(
        seconds=seconds,
        max_events=max_events,
        max_total_events=max_total_events,
        clock=lambda: now[0],
    )
    history.complete_from = (0x10, 0)
    history.advance((0x10, 0))
    return history, now


def _after(history: MemoryHistory, org: str, key: CursorKey) -> list[str] | None:
    return _ids(history.events_after(org, key))


def test_a_resume_gets_the_events_after_its_cursor_with_those_for_every_org_in_order() -> None:
    history, _ = _streaming()
    for event in (_event(0x20), _event(0x30, org="other"), _event(0x40, org=None), _event(0x50)):
        history.append(event)
    assert history.position == (0x50, 1)
    assert _after(history, "o", (0x20, 1)) == [format_cursor(0x40, 1), format_cursor(0x50, 1)]
    assert _after(history, "o", (0x10, 0)) == [format_cursor(lsn, 1) for lsn in (0x20, 0x40, 0x50)]
    assert _after(history, "o", (0x50, 1)) == []  # the `ready` cursor: nothing missed
    assert _after(history, "never-seen", (0x30, 1)) == [format_cursor(0x40, 1)]


def test_a_cursor_history_cannot_vouch_for_gets_none() -> None:
    history = MemoryHistory()
    history.append(_event(0x20))
    assert history.events_after("o", (0x20, 1)) is None  # not streaming yet: not complete
    history.complete_from = (0x18, 0)
    assert _after(history, "o", (0x18, 0)) == [format_cursor(0x20, 1)]
    assert history.events_after("o", (0x10, 0)) is None  # before history began
    assert history.events_after("o", (0x99, 1)) is None  # from the future: another database
    history.advance((0x99, 1))  # an idle database's commits move the position on
    assert _after(history, "o", (0x99, 1)) == []


def test_time_trims_and_a_resume_below_what_was_trimmed_must_resync() -> None:
    history, now = _streaming(seconds=10)
    history.append(_event(0x20))
    now[0] = 5.0
    history.append(_event(0x30))
    now[0] = 12.0
    history.trim()  # 0x20 is older than 10 s
    assert len(history) == 1
    assert history.events_after("o", (0x10, 0)) is None
    assert _after(history, "o", (0x20, 1)) == [format_cursor(0x30, 1)]
    assert _after(history, "other", (0x10, 0)) == []  # nothing of "other" was lost
    now[0] = 100.0
    history.trim()
    assert len(history) == 0 and history.order_length == 0
    assert _after(history, "o", (0x30, 1)) == []


def test_with_a_trim_every_second_no_event_outlives_the_slack_the_slot_keeps() -> None:
    """Expiry is trim's (once a second): an event may outlive `seconds` by up to that second,
    and the pipeline keeps `HISTORY_TRIM_SLACK` more WAL in the slot than `historySeconds`,
    so a restarted node still re-reads every event a client may resume from."""
    history, now = _streaming(seconds=10)
    appended_at: dict[CursorKey, float] = {}
    lsn = 0x20
    for step in range(4000):  # 0.01 s apart, a trim at each whole second
        now[0] = step / 100
        lsn += 1
        history.append(_event(lsn, org=f"org_{step % 3}"))
        appended_at[(lsn, 1)] = now[0]
        if step % 100 == 0:
            history.trim()
        firsts = [struct.unpack_from("<QQ", kept.first()) for kept in history._orgs.values()]
        oldest = min(appended_at[first] for first in firsts)
        assert now[0] - oldest <= 10 + 1.0 < 10 + HISTORY_TRIM_SLACK


def test_the_per_org_bound_evicts_that_org_s_oldest() -> None:
    history, _ = _streaming(max_events=2)
    for lsn in (0x20, 0x30, 0x40):
        history.append(_event(lsn))
    history.append(_event(0x50, org="b"))
    assert [e.cursor for e in history.held("o")] == [format_cursor(lsn, 1) for lsn in (0x30, 0x40)]
    assert history.events_after("o", (0x10, 0)) is None
    assert _after(history, "o", (0x20, 1)) == [format_cursor(0x30, 1), format_cursor(0x40, 1)]
    assert _after(history, "b", (0x10, 0)) == [format_cursor(0x50, 1)]


def test_the_node_wide_bound_counts_what_per_org_and_time_trims_removed() -> None:
    history, now = _streaming(max_events=5, max_total_events=40)
    orgs = ["busy", *(f"quiet{i}" for i in range(7))]
    lsn = 0x100
    for round_ in range(200):
        for org in ("busy", "busy", "busy", f"quiet{round_ % 7}"):
            lsn += 0x10
            history.append(_event(lsn, org=org))
        now[0] += 1.0
        held = sum(len(history.held(org)) for org in [None, *orgs])
        assert len(history) == held <= 40
    now[0] += 1000.0  # everything expires by time
    history.trim()
    assert len(history) == 0 and history.order_length == 0

    # A busy organization at its own bound evicts its oldest with every event, while a quiet
    # one holds the node-wide oldest. The order keeps an item per history, not per event:
    # nothing piles up behind the quiet event that would have to be swept or rebuilt (a
    # rebuild of a per-event order held an append for 137 ms with 100,000 events kept).
    lsn += 0x10
    history.append(_event(lsn, org="quiet0"))
    for _ in range(5000):
        lsn += 0x10
        history.append(_event(lsn, org="busy"))
        assert history.order_length <= 2 * 2
    assert len(history) == 6


def _no_gap(history: MemoryHistory, appended: list[tuple[CursorKey, str | None]]) -> None:
    """Every cursor a client of "a" may hold gets all that came after it, or a resync."""
    for cursor, _ in appended:
        got = history.events_after("a", cursor)
        if got is not None:
            assert [e.key for e in got] == [
                key for key, org in appended if org in ("a", None) and key > cursor
            ]


def test_a_history_over_its_own_bound_keeps_exactly_the_newest_events() -> None:
    """Whole chunks go at once when the bound holds without them; the count stays exact."""
    history, _ = _streaming(max_events=100)
    appended: list[tuple[CursorKey, str | None]] = []
    for n in range(1, 1001):
        history.append(_event(0x100 + n, org="a"))
        appended.append(((0x100 + n, 1), "a"))
        assert [e.key for e in history.held("a")] == [key for key, _ in appended[-100:]]
    assert len(history) == 100
    _no_gap(history, appended)


def test_time_evicts_a_chunk_at_once_only_when_all_of_it_expired() -> None:
    history, now = _streaming(seconds=10.0)
    for n in range(1, 51):  # t=0: the first 50 of the first chunk
        history.append(_event(0x100 + n, org="a"))
    now[0] = 5.0
    for n in range(51, 201):  # t=5: the chunk's last 14, and more
        history.append(_event(0x100 + n, org="a"))
    now[0] = 12.0
    history.trim()
    assert [e.key for e in history.held("a")] == [(0x100 + n, 1) for n in range(51, 201)]
    assert history.events_after("a", (0x100 + 49, 1)) is None
    assert len(_after(history, "a", (0x100 + 50, 1)) or []) == 150
    now[0] = 16.0
    history.trim()
    assert len(history) == 0


def test_the_node_wide_bound_evicts_a_chunk_at_a_time_without_a_gap() -> None:
    """A full node evicts what is left of the chunk holding the oldest event of all: up to
    `CHUNK` events of one organization per eviction, and a cursor among them must resync."""
    history, _ = _streaming(max_total_events=300)
    appended: list[tuple[CursorKey, str | None]] = []
    for n in range(1, 3001):
        org = ("a", "b", "c")[n % 3] if n % 500 else None
        history.append(_event(0x100 + n, org=org))
        appended.append(((0x100 + n, 1), org))
        assert min(n, 300 - CHUNK + 1) <= len(history) <= 300
    for org in ("a", "b", "c", None):  # whatever went, went from the oldest end of its history
        own = [key for key, o in appended if o == org]
        held = [e.key for e in history.held(org)]
        assert held == own[len(own) - len(held) :]
    assert history.order_length <= 2 * 4
    _no_gap(history, appended)


def test_a_history_the_node_wide_bound_empties_leaves_no_item_in_the_order() -> None:
    history, _ = _streaming(max_total_events=2 * CHUNK)
    lsn = 0x100
    for _ in range(20):  # "q" fills a chunk, then "a" pushes all of it out
        for org, count in (("q", CHUNK), ("a", CHUNK + 1)):
            for _ in range(count):
                lsn += 1
                history.append(_event(lsn, org=org))
                assert history.order_length <= 2  # one item per history holding events


async def test_since_is_events_after_without_a_pause() -> None:
    history, _ = _streaming()
    history.append(_event(0x20))
    assert _ids(await history.since("o", (0x10, 0))) == [format_cursor(0x20, 1)]


def _row(n: int) -> dict[str, Any]:
    """A row of about 200 bytes as the reader types it: text, ints, numeric and json cells."""
    return {
        "id": RawJson(str(n)),
        "organizationId": f"org_{n % 10}",
        "title": f"title number {n} of the benchmark",
        "amount": n % 1000,
        "price": RawJson("123.45"),
        "created": "2026-11-28T12:00:00.123456+00:00",
        "doc": RawJson('{"k": "v", "n": 1}'),
    }


def test_an_event_comes_back_from_history_exactly_as_it_was_kept() -> None:
    history, _ = _streaming()
    when = datetime(2026, 11, 28, 11, 46, 37, 123456, tzinfo=UTC)
    change = ChangeEvent(
        "o", (0x20, 3), "9f2c41ab", when, TABLE, "UPDATE", _row(7), {"id": RawJson("7")},
        ("body",), "alice", "bob", 4242,
    )  # fmt: skip
    broadcast = BroadcastEvent(
        "o", (0x30, 1), "9f2c41ab", "screening:started",
        orjson.Fragment(b'{"s":"x","f":1.5}'), frozenset({"recruiter"}), "alice",
    )  # fmt: skip
    for event in (change, broadcast):
        history.append(event)
    back = history.held("o")
    assert back[0] == change and type(back[0].new["price"]) is RawJson  # type: ignore[index, union-attr]
    got = back[1]
    assert isinstance(got, BroadcastEvent) and got.cursor == broadcast.cursor
    assert (got.event, got.target_roles, got.target_user) == (
        "screening:started",
        {"recruiter"},
        "alice",
    )
    assert orjson.loads(orjson.dumps(got.payload)) == {"s": "x", "f": 1.5}


#: What a row's text can be: UTF-8 the reader decoded, so never a lone surrogate.
_TEXT = st.characters(blacklist_categories=("Cs",))

_CELLS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),  # no NUL
    st.sampled_from(["1.50", "-12345678901234567890.000001", '{"k": ["\\u0000", 1]}']).map(RawJson),
)
_ROWS = st.one_of(
    st.none(),
    st.dictionaries(st.text(_TEXT, max_size=6), _CELLS, max_size=66),  # plain, or over 63 columns
    st.dictionaries(  # arrays and composites: kept tagged
        st.text(_TEXT, max_size=6),
        st.recursive(
            _CELLS,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(_TEXT, max_size=3), inner, max_size=3)
            ),
            max_leaves=5,
        ),
        max_size=5,
    ),
)


def _typed(value: object) -> object:
    """`value` with each leaf's exact type beside it: RawJson must come back RawJson."""
    if isinstance(value, dict):
        return {name: _typed(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value), value)


@given(_ROWS, _ROWS)
def test_any_row_comes_back_from_history_with_the_types_it_was_kept_with(
    new: dict[str, Any] | None, old: dict[str, Any] | None
) -> None:
    """Plain rows are kept as plain JSON with the positions of their RawJson values in the
    entry's header; rows that cannot be described that way are kept with tagged values.
    Either way an event comes back exactly, each value of the type it had."""
    history, _ = _streaming()
    event = ChangeEvent("o", (0x20, 1), "e", WHEN, TABLE, "UPDATE", new, old, (), "u", None, 7)
    history.append(event)
    (back,) = history.held("o")
    assert back == event
    assert isinstance(back, ChangeEvent)
    assert (_typed(back.new), _typed(back.old)) == (_typed(new), _typed(old))


def test_a_kept_event_of_a_200_byte_row_takes_at_most_400_bytes() -> None:
    history, _ = _streaming()
    assert 180 <= len(orjson.dumps(_row(123_456), default=str)) <= 220
    count = 20_000
    events = [
        ChangeEvent(
            f"org_{n % 10}",
            (0x100 + n // 1000, n % 1000 + 1),
            "9f2c41ab",
            WHEN,
            TABLE,
            "INSERT",
            _row(n),
            None,
            (),
            None,
            None,
            n // 1000,
        )
        for n in range(count)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for event in events:
            history.append(event)
        del events, event  # the history holds no reference to them: rows are freed
        gc.collect()
        per_event = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(history) == count
    assert per_event <= 400, per_event
    assert abs(history.nbytes / count - per_event) < 40  # what the byte bound counts is real
    assert gc.is_tracked(history._orgs["org_1"].first()) is False


def _visits() -> int:
    """What a full collection visits: the references of every object it tracks
    (`gc.get_referents` runs the very traversal the collector runs)."""
    gc.collect()
    return sum(len(gc.get_referents(tracked)) for tracked in gc.get_objects())


def test_a_full_history_costs_a_full_collection_next_to_nothing() -> None:
    """A full collection is a pause of the event loop. A deque of entries made it visit every
    kept event (70-90 ms for 500,000 of them); chunks the collector stops tracking, and a
    node-wide order of numbers, make that about one visit per chunk."""
    history, _ = _streaming()
    count = 20_000
    before = _visits()
    for n in range(count):
        history.append(
            ChangeEvent(f"org_{n % 10}", (0x100 + n, 1), "", WHEN, TABLE, "INSERT",
                        {"id": n}, None, (), None, None)
        )  # fmt: skip
    added = _visits() - before  # each chunk looked at once is no longer tracked
    assert len(history) == count
    assert added < count / 20, added


def test_the_node_wide_byte_bound_evicts_the_oldest_of_any_org() -> None:
    now = [0.0]
    history = MemoryHistory(max_total_bytes=100 * 400, clock=lambda: now[0])
    history.complete_from = (0x10, 0)
    for n in range(1, 301):
        event = ChangeEvent(
            f"org_{n % 3}",
            (0x10 + n, 1),
            "",
            WHEN,
            TABLE,
            "INSERT",
            _row(n),
            None,
            (),
            None,
            None,
        )
        history.append(event)
        assert history.nbytes <= 100 * 400
    assert 90 <= len(history) <= 130
    assert history.order_length <= 2 * 4  # about one item per history (4 here), not per event
    # The oldest went first, whatever its organization: a cursor before them must resync.
    assert history.events_after("org_1", (0x10, 0)) is None
    kept = history.events_after("org_1", (0x10 + 290, 1))
    assert kept is not None and [e.key for e in kept] == [(0x10 + n, 1) for n in (292, 295, 298)]


def test_a_history_answers_from_any_point_of_a_partly_removed_chunk() -> None:
    kept = _Kept("o", 1)
    made = [struct.pack("<QQ", lsn, 1) + b"x" * (lsn % 7) for lsn in range(1, 3 * CHUNK + 11)]
    for entry in made:  # as `MemoryHistory.append` does
        kept.newest.append(entry)
        if len(kept.newest) == CHUNK:
            kept.seal()
        kept.length += 1
    released = []
    for removed in range(1, CHUNK + 7):  # the whole first chunk, and 6 of the second
        entry, freed = kept.popleft()
        assert entry is made[removed - 1]
        released.append(freed)
        assert len(kept) == len(made) - removed == len(list(kept))
        assert list(kept) == made[removed:]
        assert kept.first() is made[removed]
    # A chunk's memory goes with its last entry, all at once.
    assert released[: CHUNK - 1] == [0] * (CHUNK - 1)
    assert released[CHUNK - 1] == sum(map(len, made[:CHUNK])) + CHUNK * ENTRY_OVERHEAD
    held = made[CHUNK + 6 :]
    for lsn in range(0, len(made) + 2):
        above = [e for e in held if struct.unpack_from("<Q", e)[0] > lsn]
        assert kept.after((lsn, 1)) == above
        assert kept.after((lsn, 0)) == [e for e in held if struct.unpack_from("<Q", e)[0] >= lsn]


class _Model:
    """MemoryHistory's rules in plain lists: what it must keep and when a cursor must resync.

    Each event remembers the chunk of its history it went into (histories fill chunks of
    `CHUNK` in the order they take events; an event removed before its chunk is full leaves
    room for another), because the node-wide bound evicts what is left of the chunk holding
    the oldest event of all, or that event alone when its chunk is not full yet.
    """

    def __init__(self, seconds: float, max_events: int, max_total_events: int) -> None:
        self.seconds, self.max_events, self.max_total = seconds, max_events, max_total_events
        #: (key, org, kept at, chunk number in its org's history)
        self.kept: list[tuple[CursorKey, str | None, float, int]] = []
        self.evicted: dict[str | None, CursorKey] = {}  #: per history, the last key evicted
        self.filling: dict[str | None, tuple[int, int]] = {}  #: per history, (chunk, events)

    def _evict(self, at: int) -> None:
        key, org, _, chunk = self.kept.pop(at)
        self.evicted[org] = key
        filling, held = self.filling[org]
        if chunk == filling:  # not full yet: room for another event
            self.filling[org] = (filling, held - 1)

    def _expire(self, org: str | None, now: float) -> None:
        while True:
            own = [i for i, (_, o, _, _) in enumerate(self.kept) if o == org]
            if own and (self.kept[own[0]][2] < now - self.seconds or len(own) > self.max_events):
                self._evict(own[0])
            else:
                return

    def append(self, key: CursorKey, org: str | None, now: float) -> None:
        filling, held = self.filling.get(org, (0, 0))
        self.kept.append((key, org, now, filling))
        self.filling[org] = (filling + 1, 0) if held + 1 == CHUNK else (filling, held + 1)
        if sum(o == org for _, o, _, _ in self.kept) > self.max_events:  # time: `trim` only
            self._expire(org, now)
        while len(self.kept) > self.max_total:
            _, oldest_org, _, chunk = self.kept[0]
            if chunk == self.filling[oldest_org][0]:
                self._evict(0)
                continue
            while (same := [i for i, (_, o, _, c) in enumerate(self.kept)
                            if o == oldest_org and c == chunk]):  # fmt: skip
                self._evict(same[0])

    def trim(self, now: float) -> None:
        for org in {o for _, o, _, _ in self.kept}:
            self._expire(org, now)

    def after(self, org: str, key: CursorKey) -> list[CursorKey] | None:
        if any(key < self.evicted[h] for h in (org, None) if h in self.evicted):
            return None
        return [k for k, o, _, _ in self.kept if o in (org, None) and k > key]


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from([None, "a", "b", "c"])),
        st.tuples(st.just("burst"), st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 1200))),
        st.tuples(st.just("wait"), st.floats(0.0, 4.0)),
        st.tuples(st.just("trim"), st.none()),
    ),
    max_size=600,
)


@settings(max_examples=100, deadline=None)
@given(
    steps=_STEPS,
    seconds=st.floats(1.0, 50.0),
    max_events=st.integers(1, 3 * CHUNK),
    max_total_events=st.integers(1, 5 * CHUNK),
    probes=st.lists(st.floats(0.0, 1.0), max_size=12),
)
def test_what_is_kept_and_what_resyncs_follow_the_rules_across_chunks(
    steps: list[tuple[str, Any]],
    seconds: float,
    max_events: int,
    max_total_events: int,
    probes: list[float],
) -> None:
    history, now = _streaming(seconds, max_events, max_total_events)
    model = _Model(seconds, max_events, max_total_events)
    lsn = 0x10
    for step, arg in steps:
        if step == "append":
            lsn += 1
            history.append(_event(lsn, org=arg))
            model.append((lsn, 1), arg, now[0])
        elif step == "burst":  # many at once: across chunk boundaries
            org, count = arg
            for _ in range(count):
                lsn += 1
                history.append(_event(lsn, org=org))
                model.append((lsn, 1), org, now[0])
        elif step == "wait":
            now[0] += arg
        else:
            history.trim()
            model.trim(now[0])
        assert len(history) == len(model.kept)
    for org in (None, "a", "b", "c"):
        assert [e.key for e in history.held(org)] == [k for k, o, _, _ in model.kept if o == org]
    for org in ("a", "b"):
        for probe in probes:
            key = (0x10 + round(probe * (lsn - 0x10)), 1)  # anywhere in what was appended
            got = history.events_after(org, key)
            if key > history.position:  # from the future: another database
                assert got is None
                continue
            assert (None if got is None else [e.key for e in got]) == model.after(org, key)
    assert history.order_length <= 2 * 4  # about one item per history (4 here), not per event
