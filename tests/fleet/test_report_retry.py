"""A site whose reports the hub does not take retries with a capped, jittered backoff, not
every second in step with every other site (a fleet reconnecting after a hub outage would
keep a saturated hub saturated), and reports at the normal pace once one is taken."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from meshorch.fleet.client import HubUnreachable, LinkClient
from tests.fleet.test_stale_poll import link_at


class FlakyHub:
    """``report`` fails ``failures`` times, then answers; records when it was called."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []
        self.quiet: list[bool] = []
        self.held = False
        self.site_head = None
        self.seven = asyncio.Event()  # set at the seventh call

    async def report(self, report: dict[str, Any], timeout_s: float, *, quiet: bool) -> int:
        self.calls.append(time.monotonic())
        self.quiet.append(quiet)
        if len(self.calls) >= 7:
            self.seven.set()
        if len(self.calls) <= self.failures:
            raise HubUnreachable("the hub did not take it")
        return 1


async def test_failed_reports_back_off_then_the_pace_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("meshorch.fleet.site_link.REPORT_RETRY_S", 0.05)
    monkeypatch.setattr("meshorch.fleet.site_link.REPORT_RETRY_MAX_S", 0.8)
    monkeypatch.setattr("meshorch.fleet.site_link.REPORT_INTERVAL_S", 1.5)
    link, hub = link_at(1), FlakyHub(failures=5)
    link.report = lambda: {"v": 1}  # type: ignore[method-assign]
    link._enrolled.set()
    loop = asyncio.create_task(link._report_loop(cast(LinkClient, hub)))
    try:
        await asyncio.wait_for(hub.seven.wait(), 10.0)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    gaps = [b - a for a, b in zip(hub.calls, hub.calls[1:], strict=False)]
    # Retries after failures 1..5: half to all of 0.05 * 2^k, capped at 0.8 (the fifth
    # 0.4-0.8 s); a fixed retry would keep them at 0.05. Bounds leave room for a busy loop.
    assert gaps[0] <= 0.05 + 0.15
    assert gaps[4] >= 0.4 - 0.01
    # The sixth call was taken: the next report comes at the normal interval.
    assert gaps[5] >= 1.5 - 0.01
    assert link.connected
    # The first report and the retries wait for the hub's answer; the routine report on
    # the interval after one was taken is sent quiet.
    assert hub.quiet[:6] == [False] * 6 and hub.quiet[6] is True
