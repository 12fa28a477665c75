"""Waiting for a condition in tests: poll, never sleep a fixed time as an assertion."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import aiohttp


async def until(what: str, check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return it.

    Transient errors of a system still settling (connection refused, a key not there yet)
    count as "not yet"; the last one is shown when time runs out.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, OSError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s}s: {what} (last: {last!r})")
