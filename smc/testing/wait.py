"""Waiting for a condition in asyncio tests: poll it until it holds, never sleep-and-hope.

Role: :func:`wait_until` polls a check (a plain function or a coroutine function) until it
returns something truthy and returns that value, or raises AssertionError naming what it waited
for once ``timeout`` seconds passed. The default timeout allows for a loaded 2-core CI machine;
a check that holds returns at once, so a generous limit costs nothing when things work.
(:func:`smc.testing.serve.eventually` is the blocking form, for tests without a loop.)

Concurrency: runs on the caller's asyncio loop; the check runs there too (keep it quick, or
hand blocking work to a thread inside it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["wait_until"]


async def wait_until(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any],
    *,
    what: str,
    timeout: float = 20.0,
    interval: float = 0.05,
) -> Any:
    """Call ``check`` (awaiting its result when it is awaitable) every ``interval`` seconds
    until the result is truthy; return it. Raises AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
