"""What Baton's outputs must equal, and waiting for a condition: shared by every test that checks tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from baton.bench.exactness import reference  # the one generate() reference

__all__ = ["reference", "until", "wait_for"]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        time.sleep(0.02)


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """wait_for on an event loop."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached within {timeout:g}s"
        await asyncio.sleep(0.01)
