"""Small asyncio helpers shared by the app's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel every task, then wait for each to finish (the aiohttp `cleanup_ctx` idiom)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
