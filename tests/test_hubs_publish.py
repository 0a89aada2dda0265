"""`HubRegistry.publish_all` in C (`gateway._speedups.publish_events`) does what its Python
definition, `HubRegistry._publish_all`, does with any reader item: the same events kept, the
same deliveries to the same hubs in the same order, the same revocations and the same count,
an exception from any step included. Hubs here record what they are handed; what a hub does
with it is tests/test_hubs.py's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.hubs
from gateway.config import parse_realtime_config
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.history import MemoryHistory
from gateway.hubs import HubRegistry
from gateway.metrics import Metrics

try:
    from gateway._speedups import publish_events
except ImportError:  # built without a C compiler
    publish_events = None

needs_c = pytest.mark.skipif(publish_events is None, reason="gateway._speedups was not built")

TABLE = parse_realtime_config({"tables": {"notes": {}}}).tables["public.notes"]
WHEN = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
HUBS = ("a", "b")  #: organizations this node has hubs for; "c" has none


class _Refused(Exception):
    pass


class _Hub:
    """Records what it is handed; refuses the event whose position is `refuse`."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.handed: list[tuple[str, Any]] = []

    def deliver_live(self, event: RoutedEvent) -> None:
        if event.key[1] == self.refuse:
            raise _Refused(f"deliver {event.key}")
        self.handed.append(("live", event.key))

    def revoke(self, notice: AccessRevoked) -> int:
        self.handed.append(("revoke", notice.reason))
        return 0


def _event(kind: str, org: str | None, position: int) -> RoutedEvent | AccessRevoked:
    if kind == "change":
        return ChangeEvent(
            org, (0x10, position), "e", WHEN, TABLE, "INSERT" if org else "TRUNCATE",
            {"id": position} if org else None, None, (), None, None,
        )  # fmt: skip
    if kind == "broadcast" and org is not None:
        return BroadcastEvent(
            org, (0x10, position), "e", "ping", orjson.Fragment(b"{}"), frozenset(), None
        )
    return AccessRevoked("role-changed", org, "u1", None, 0x10, 1.0 + position)


_ITEMS = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["change", "change", "broadcast", "revoked"]),
            st.sampled_from(["a", "b", "c", None]),
        ),
        max_size=4,
    ),
    max_size=12,
)


def _run(items: list[list[tuple[str, str | None]]], use_c: bool, refuse: int) -> Any:
    history = MemoryHistory()
    registry = HubRegistry(Metrics(), history)
    hubs = {org: _Hub(refuse) for org in HUBS}
    registry.hubs.update(hubs)  # type: ignore[arg-type]
    publish = registry.publish_all if use_c else registry._publish_all
    position, stopped = 0, None
    for item in items:
        events = []
        for kind, org in item:
            position += 1
            events.append(_event(kind, org, position))
        try:
            publish(events)
        except _Refused as exc:
            stopped = str(exc)
            break
    return (
        stopped,
        registry.metrics.events.value,
        {org: hub.handed for org, hub in hubs.items()},
        [(e.key, e.organization_id) for org in (*HUBS, "c", None) for e in history.held(org)],
        dict(registry._revoked),
    )


@needs_c
@settings(max_examples=200, deadline=None)
@given(_ITEMS, st.integers(0, 40))
def test_the_c_publish_does_what_the_python_publish_does(
    items: list[list[tuple[str, str | None]]], refuse: int
) -> None:
    assert _run(items, True, refuse) == _run(items, False, refuse)


def test_an_item_is_kept_delivered_counted_and_revoked_in_order() -> None:
    items = [
        [("change", "a"), ("broadcast", "b"), ("change", "c")],
        [("change", None), ("revoked", "a"), ("revoked", None)],
    ]
    ways = [False] + ([True] if publish_events is not None else [])
    for use_c in ways:
        stopped, counted, handed, held, revoked = _run(items, use_c, refuse=-1)
        assert stopped is None
        assert counted == 4  # the revocations are not events
        assert handed == {
            "a": [("live", (0x10, 1)), ("live", (0x10, 4))] + [("revoke", "role-changed")] * 2,
            "b": [("live", (0x10, 2)), ("live", (0x10, 4)), ("revoke", "role-changed")],
        }
        assert [key for key, _ in held] == [(0x10, 1), (0x10, 2), (0x10, 3), (0x10, 4)]
        assert set(revoked) == {("a", "u1", None), (None, "u1", None)}


@needs_c
def test_a_registry_publishes_in_c_when_it_can() -> None:
    registry = HubRegistry(Metrics(), MemoryHistory())
    assert registry.publish_all.func is publish_events  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        publish_events((registry,), [])  # type: ignore[misc]
    with pytest.raises(TypeError):
        registry.publish_all(7)  # type: ignore[arg-type]


def test_without_the_extension_a_registry_publishes_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.hubs, "publish_events", None)
    registry = HubRegistry(Metrics(), MemoryHistory())
    assert registry.publish_all == registry._publish_all
    registry.publish_all([_event("change", "a", 1)])  # type: ignore[list-item]
    assert registry.metrics.events.value == 1 and len(registry.history) == 1
