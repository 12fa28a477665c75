"""Shared helpers for the runtime tests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from meshorch.runtime import InstanceStatus, Runtime


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """Wait until ``check()`` is true; the machine is slow and shared, so be generous."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def status_of(runtime: Runtime, instance_id: str) -> InstanceStatus | None:
    for status in await runtime.list():
        if status.instance_id == instance_id:
            return status
    return None


async def wait_exited(runtime: Runtime, instance_id: str, timeout_s: float) -> InstanceStatus:
    async def exited() -> bool:
        status = await status_of(runtime, instance_id)
        return status is not None and not status.running

    await eventually(exited, timeout_s, f"{instance_id} to exit")
    status = await status_of(runtime, instance_id)
    assert status is not None
    return status
