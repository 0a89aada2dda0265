"""cdc.replication: CopyData framing, standby status updates, LSN bookkeeping."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdc.replication
from cdc.errors import ProtocolError
from cdc.replication import (
    PG_EPOCH,
    Keepalive,
    ReplicationProtocol,
    XLogData,
    build_status_update,
    datetime_to_pg_time,
    parse_copy_data,
    pg_time_to_datetime,
)

try:
    from cdc._speedups import xlog_data as xlog_data_c
except ImportError:  # no compiler where this checkout was installed
    xlog_data_c = None  # type: ignore[assignment]

XLOG_READERS = {"python": cdc.replication.xlog_data_py, "c": xlog_data_c}


@pytest.fixture(autouse=True, params=list(XLOG_READERS))
def xlog_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test here runs with the one-call XLogData reader in Python and in C."""
    reader = XLOG_READERS[request.param]
    if reader is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    monkeypatch.setattr(cdc.replication, "_xlog_data", reader)
    yield request.param


WHEN = datetime(2026, 11, 28, 11, 46, 37, 123456, tzinfo=UTC)
WHEN_US = (WHEN - PG_EPOCH) // timedelta(microseconds=1)


def xlog(data_start: int, wal_end: int, send_time: int = WHEN_US, payload: bytes = b"") -> bytes:
    return b"w" + struct.pack("!QQq", data_start, wal_end, send_time) + payload


def keepalive(wal_end: int, send_time: int = WHEN_US, reply: int = 0) -> bytes:
    return b"k" + struct.pack("!QqB", wal_end, send_time, reply)


def unpack_status(data: bytes) -> tuple[int, int, int, int, int]:
    assert len(data) == 34
    assert data[:1] == b"r"
    written, flushed, applied, now, reply = struct.unpack("!QQQqB", data[1:])
    return written, flushed, applied, now, reply


# --- parsing ------------------------------------------------------------------------------


def test_parse_xlogdata() -> None:
    message = parse_copy_data(xlog(0x16B3748, 0x16B3800, WHEN_US, b"B payload"))
    assert isinstance(message, XLogData)
    assert (message.data_start, message.wal_end, message.send_time) == (
        0x16B3748,
        0x16B3800,
        WHEN_US,
    )
    assert type(message.payload) is bytes  # one copy, the decoder slices it
    assert message.payload == b"B payload"
    assert pg_time_to_datetime(message.send_time) == WHEN


def test_parse_xlogdata_payload_does_not_change_with_the_buffer() -> None:
    # libpq reuses its buffer: a payload parsed from a view must not see later bytes.
    buffer = bytearray(xlog(1, 2, 3, b"abc"))
    message = parse_copy_data(memoryview(buffer))
    assert isinstance(message, XLogData)
    buffer[-1:] = b"z"
    assert message.payload == b"abc"


def test_parse_xlogdata_with_empty_payload() -> None:
    message = parse_copy_data(xlog(1, 2, 3))
    assert isinstance(message, XLogData)
    assert message.payload == b""


@pytest.mark.parametrize(("reply", "expected"), [(0, False), (1, True)])
def test_parse_keepalive(reply: int, expected: bool) -> None:
    assert parse_copy_data(keepalive(0xFFFF_0000_0000_0001, -5, reply)) == Keepalive(
        wal_end=0xFFFF_0000_0000_0001, send_time=-5, reply_requested=expected
    )


MALFORMED = [
    ("empty", b""),
    ("unknown-kind", b"x" + bytes(24)),
    ("status-update-from-server", build_status_update(1, 1, 1, 1)),
    ("keepalive-trailing", keepalive(1) + b"\x00"),
]


@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_copy_data(data)


@pytest.mark.parametrize("data", [xlog(1, 2, 3, b""), keepalive(7, 8, 1)], ids=["w", "k"])
def test_every_prefix_is_rejected(data: bytes) -> None:
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            parse_copy_data(data[:cut])


FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    # The xlog_reader fixture only picks the implementation: the same for every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
COPY_DATA = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"w", b"k"]).flatmap(
        lambda kind: st.binary(max_size=40).map(lambda body: kind + body)
    ),
)


@FUZZ
@given(COPY_DATA)
def test_fuzz_parse_raises_only_protocol_error(data: bytes) -> None:
    try:
        message = parse_copy_data(data)
    except ProtocolError:
        return
    assert isinstance(message, XLogData | Keepalive)


def xlog_outcome(read: Callable[..., object], data: object) -> object:
    try:
        return read(data, XLogData)
    except Exception as exc:
        return ("raised", type(exc).__name__)


@FUZZ
@given(st.one_of(COPY_DATA, COPY_DATA.map(bytearray), COPY_DATA.map(memoryview)))
def test_fuzz_c_and_python_xlog_readers_agree(data: bytes) -> None:
    if xlog_data_c is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    c = xlog_outcome(xlog_data_c, data)
    assert c == xlog_outcome(cdc.replication.xlog_data_py, data)
    assert c is None or type(c) is XLogData


# --- status updates -----------------------------------------------------------------------


def test_build_status_update_bytes() -> None:
    data = build_status_update(0x30, 0x20, 0x10, WHEN_US, reply_requested=True)
    assert data == b"r" + struct.pack("!QQQqB", 0x30, 0x20, 0x10, WHEN_US, 1)
    assert unpack_status(build_status_update(1, 2, 3, 4))[4] == 0


def test_time_conversions() -> None:
    assert datetime_to_pg_time(PG_EPOCH) == 0
    assert datetime_to_pg_time(WHEN) == WHEN_US
    east = WHEN.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert datetime_to_pg_time(east) == WHEN_US
    assert datetime_to_pg_time(PG_EPOCH - timedelta(microseconds=1)) == -1
    assert pg_time_to_datetime(-1) == PG_EPOCH - timedelta(microseconds=1)
    with pytest.raises(ValueError, match="naive"):
        datetime_to_pg_time(datetime(2026, 1, 1))
    with pytest.raises(ProtocolError):
        pg_time_to_datetime(2**63 - 1)


# --- ReplicationProtocol ------------------------------------------------------------------


def test_initial_state() -> None:
    protocol = ReplicationProtocol(start_lsn=0x100)
    assert (protocol.received_lsn, protocol.flush_lsn, protocol.server_wal_end) == (0x100, 0x100, 0)
    assert not protocol.reply_pending
    assert unpack_status(protocol.status_update(WHEN_US)) == (0x100, 0x100, 0x100, WHEN_US, 0)


def test_receive_tracks_lsns() -> None:
    protocol = ReplicationProtocol()
    message = protocol.receive(xlog(0x200, 0x200, payload=b"B..."))
    assert isinstance(message, XLogData)
    assert (protocol.received_lsn, protocol.server_wal_end) == (0x200, 0x200)

    protocol.receive(keepalive(0x900))
    assert protocol.received_lsn == 0x200  # keepalives do not count as received data
    assert protocol.server_wal_end == 0x900

    protocol.receive(xlog(0x150, 0x300))  # an older data_start never lowers received_lsn
    assert (protocol.received_lsn, protocol.server_wal_end) == (0x200, 0x300)

    protocol.receive(xlog(0x400, 0x400))
    assert protocol.received_lsn == 0x400
    assert protocol.flush_lsn == 0  # receiving is not confirming


def test_receive_rejects_malformed_without_changing_state() -> None:
    protocol = ReplicationProtocol(start_lsn=5)
    with pytest.raises(ProtocolError):
        protocol.receive(b"w\x00")
    assert (protocol.received_lsn, protocol.server_wal_end) == (5, 0)


def test_confirm_is_monotonic() -> None:
    protocol = ReplicationProtocol(start_lsn=0x100)
    protocol.confirm(0x50)
    assert protocol.flush_lsn == 0x100
    protocol.confirm(0x300)
    protocol.confirm(0x200)
    assert protocol.flush_lsn == 0x300


def test_status_update_reports_received_and_flushed() -> None:
    protocol = ReplicationProtocol()
    protocol.receive(xlog(0x500, 0x500))
    protocol.confirm(0x400)
    assert unpack_status(protocol.status_update(WHEN)) == (0x500, 0x400, 0x400, WHEN_US, 0)
    assert unpack_status(protocol.status_update(WHEN_US, reply_requested=True))[4] == 1


def test_written_is_never_behind_flushed() -> None:
    protocol = ReplicationProtocol()
    protocol.receive(xlog(0x500, 0x500))
    protocol.receive(keepalive(0x800))
    protocol.confirm(0x800)  # idle database: acknowledge up to the keepalive's WAL end
    assert unpack_status(protocol.status_update(WHEN_US))[:3] == (0x800, 0x800, 0x800)


def test_status_update_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive"):
        ReplicationProtocol().status_update(datetime(2026, 1, 1))


def test_status_due_by_interval() -> None:
    protocol = ReplicationProtocol()
    assert protocol.status_due(100.0, 10.0)  # nothing sent yet
    protocol.status_update(WHEN_US, now_monotonic=100.0)
    assert not protocol.status_due(100.0, 10.0)
    assert not protocol.status_due(109.9, 10.0)
    assert protocol.status_due(110.0, 10.0)
    protocol.status_update(WHEN_US)  # an extra update without a clock keeps the schedule
    assert protocol.status_due(110.0, 10.0)
    protocol.status_update(WHEN_US, now_monotonic=110.0)
    assert not protocol.status_due(115.0, 10.0)


def test_keepalive_asking_for_reply_makes_status_due_until_sent() -> None:
    protocol = ReplicationProtocol()
    protocol.status_update(WHEN_US, now_monotonic=100.0)
    protocol.receive(keepalive(0x10, reply=0))
    assert not protocol.status_due(101.0, 10.0)
    protocol.receive(keepalive(0x20, reply=1))
    assert protocol.reply_pending
    assert protocol.status_due(101.0, 10.0)
    protocol.receive(keepalive(0x30, reply=0))  # a later keepalive does not cancel the request
    assert protocol.status_due(101.0, 10.0)
    protocol.status_update(WHEN_US, now_monotonic=101.0)
    assert not protocol.reply_pending
    assert not protocol.status_due(102.0, 10.0)
