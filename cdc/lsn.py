"""Log sequence numbers: PostgreSQL's `XXX/XXX` text form <-> the 64-bit integer on the wire."""

from __future__ import annotations

__all__ = ["format_lsn", "parse_lsn"]


def parse_lsn(text: str) -> int:
    """Parse `16/B374D848` into an integer; raises ValueError on anything else."""
    high, sep, low = text.partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """Format an integer LSN the way PostgreSQL prints it (`0/16B3748`)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
