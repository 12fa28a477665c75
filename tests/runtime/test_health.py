"""Health: the pure ProbeTracker and RestartBackoff, and the probe executors."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from aiohttp import web

from meshorch.apps.health import (
    BackoffConfig,
    ProbeConfig,
    ProbeKind,
    ProbeState,
    ProbeTracker,
    RestartBackoff,
    probe_exec,
    probe_http,
    probe_tcp,
)
from meshorch.errors import ConfigurationError
from meshorch.runtime import ExecTimeout, InstanceNotFound, InstanceSpec, InstanceStatus
from tests.runtime.helpers import free_port

L = ProbeKind.LIVENESS
R = ProbeKind.READINESS

# --- ProbeTracker -------------------------------------------------------------------


def test_tracker_thresholds() -> None:
    tracker = ProbeTracker()
    tracker.add("a", L, ProbeConfig(success_threshold=2, failure_threshold=3), started_at=0)
    assert tracker.state("a", L) is ProbeState.UNKNOWN
    assert tracker.record("a", L, True, 1) is ProbeState.UNKNOWN
    assert tracker.record("a", L, True, 2) is ProbeState.PASSING
    # Two failures are not enough, and a success in between starts over.
    assert tracker.record("a", L, False, 3) is ProbeState.PASSING
    assert tracker.record("a", L, False, 4) is ProbeState.PASSING
    assert tracker.record("a", L, True, 5) is ProbeState.PASSING
    for t in (6, 7):
        assert tracker.record("a", L, False, t) is ProbeState.PASSING
    assert tracker.record("a", L, False, 8) is ProbeState.FAILING
    status = tracker.status("a", L)
    assert status is not None
    assert status.consecutive_failures == 3
    assert status.changed_at == 8
    assert status.last_result is False
    # Recovery needs success_threshold successes again.
    assert tracker.record("a", L, True, 9) is ProbeState.FAILING
    assert tracker.record("a", L, True, 10) is ProbeState.PASSING


def test_tracker_unknown_until_failure_threshold() -> None:
    tracker = ProbeTracker()
    tracker.add("a", R, ProbeConfig(failure_threshold=2), started_at=0)
    assert tracker.record("a", R, False, 1) is ProbeState.UNKNOWN
    assert tracker.record("a", R, False, 2) is ProbeState.FAILING


def test_tracker_initial_delay_and_schedule() -> None:
    tracker = ProbeTracker()
    config = ProbeConfig(period_s=5, initial_delay_s=10)
    tracker.add("a", L, config, started_at=100)
    tracker.add("b", R, ProbeConfig(period_s=2), started_at=100)
    assert tracker.next_due_at() == 100
    assert tracker.take_due(100) == [("b", R)]
    assert tracker.take_due(101) == []  # claimed: next one a period later
    assert tracker.next_due_at() == 102
    # Results before the initial delay do not count.
    assert tracker.record("a", L, False, 105) is ProbeState.UNKNOWN
    status = tracker.status("a", L)
    assert status is not None and status.last_checked_at is None
    assert tracker.take_due(110) == [("a", L), ("b", R)]
    assert tracker.next_due_at() == 112
    assert tracker.record("a", L, True, 110) is ProbeState.PASSING


def test_tracker_readd_resets_and_remove() -> None:
    tracker = ProbeTracker()
    tracker.add("a", L, ProbeConfig(failure_threshold=1), started_at=0)
    tracker.add("a", R, ProbeConfig(), started_at=0)
    tracker.add("b", L, ProbeConfig(), started_at=0)
    assert tracker.record("a", L, False, 1) is ProbeState.FAILING
    tracker.add("a", L, ProbeConfig(failure_threshold=1), started_at=50)  # restarted
    assert tracker.state("a", L) is ProbeState.UNKNOWN
    assert tracker.take_due(49) == [("a", R), ("b", L)]  # not ("a", L): delayed to 50
    tracker.remove("a", R)
    assert tracker.keys() == [("a", L), ("b", L)]
    tracker.remove("a")
    assert tracker.keys() == [("b", L)]
    assert tracker.record("a", L, True, 60) is ProbeState.UNKNOWN
    assert tracker.status("a", L) is None
    tracker.remove("b")
    assert tracker.next_due_at() is None


@pytest.mark.parametrize(
    "config",
    [
        ProbeConfig(period_s=0),
        ProbeConfig(timeout_s=-1),
        ProbeConfig(initial_delay_s=float("nan")),
        ProbeConfig(success_threshold=0),
        ProbeConfig(failure_threshold=0),
    ],
)
def test_probe_config_validation(config: ProbeConfig) -> None:
    with pytest.raises(ConfigurationError):
        ProbeTracker().add("a", L, config, 0)


# --- RestartBackoff -----------------------------------------------------------------


def test_backoff_grows_and_caps() -> None:
    backoff = RestartBackoff(BackoffConfig(initial_s=1, factor=2, max_s=10, reset_after_s=60))
    assert backoff.next_delay_s(0) == 0
    now = 0.0
    delays = []
    for _ in range(6):
        backoff.record_start(now)
        now += 1  # crashes after a second
        backoff.record_exit(now)
        delays.append(backoff.next_delay_s(now))
        now += delays[-1]
    assert delays == [1, 2, 4, 8, 10, 10]


def test_backoff_counts_down_and_ignores_repeated_exit() -> None:
    backoff = RestartBackoff(BackoffConfig(initial_s=4, factor=3, max_s=100, reset_after_s=60))
    backoff.record_start(0)
    backoff.record_exit(1)
    backoff.record_exit(2)  # the same exit seen twice
    assert backoff.failures == 1
    assert backoff.next_delay_s(1) == 4
    assert backoff.next_delay_s(3) == 2
    assert backoff.next_delay_s(10) == 0
    backoff.record_start(10)
    backoff.record_exit(11)
    assert backoff.next_delay_s(11) == 12


def test_backoff_resets_after_stable_run() -> None:
    config = BackoffConfig(initial_s=1, factor=2, max_s=300, reset_after_s=60)
    backoff = RestartBackoff(config)
    for t in (0, 10, 20, 30):
        backoff.record_start(t)
        backoff.record_exit(t + 1)
    assert backoff.current_delay_s() == 8
    # Runs stably for a long time, then exits: starts over at the initial delay.
    backoff.record_start(100)
    backoff.record_exit(200)
    assert backoff.next_delay_s(200) == 1
    # While running, a stable period clears the count too.
    for t in (300, 310):
        backoff.record_start(t)
        backoff.record_exit(t + 1)
    backoff.record_start(400)
    assert backoff.next_delay_s(430) == 0
    assert backoff.failures == 3
    assert backoff.next_delay_s(460) == 0
    assert backoff.failures == 0
    backoff.reset()
    assert backoff.current_delay_s() == 0


@pytest.mark.parametrize(
    "config",
    [
        BackoffConfig(initial_s=-1),
        BackoffConfig(factor=0.5),
        BackoffConfig(initial_s=10, max_s=5),
        BackoffConfig(reset_after_s=0),
    ],
)
def test_backoff_config_validation(config: BackoffConfig) -> None:
    with pytest.raises(ConfigurationError):
        RestartBackoff(config)


# --- executors ----------------------------------------------------------------------


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503)

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/moved", moved)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_probe_http(http_port: int) -> None:
    assert await probe_http("127.0.0.1", http_port, "/healthz", 5)
    assert await probe_http("127.0.0.1", http_port, "healthz", 5)
    assert await probe_http("127.0.0.1", http_port, "/moved", 5)  # 3xx counts, not followed
    assert not await probe_http("127.0.0.1", http_port, "/broken", 5)
    assert not await probe_http("127.0.0.1", http_port, "/missing", 5)
    assert not await probe_http("127.0.0.1", http_port, "/slow", 0.3)
    assert not await probe_http("127.0.0.1", free_port(), "/", 5)


async def test_probe_tcp(http_port: int) -> None:
    assert await probe_tcp("127.0.0.1", http_port, 5)
    assert not await probe_tcp("127.0.0.1", free_port(), 5)


class FakeRuntime:
    """Just enough of a Runtime for probe_exec."""

    name = "fake"

    def __init__(self, result: int | BaseException) -> None:
        self.result = result
        self.calls: builtins.list[tuple[str, tuple[str, ...], float]] = []

    async def exec(self, instance_id: str, argv: Sequence[str], timeout_s: float) -> int:
        self.calls.append((instance_id, tuple(argv), timeout_s))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    async def start(self, spec: InstanceSpec) -> None: ...
    async def stop(self, instance_id: str, timeout_s: float = 10) -> None: ...
    async def remove(self, instance_id: str) -> None: ...
    async def list(self) -> builtins.list[InstanceStatus]:
        return []

    async def logs(self, instance_id: str, tail: int) -> str:
        return ""

    async def has_image(self, ref: str) -> bool:
        return True

    async def load_image(self, archive_path: Path, ref: str) -> None: ...
    async def close(self) -> None: ...


async def test_probe_exec() -> None:
    ok = FakeRuntime(0)
    assert await probe_exec(ok, "i1", ["true"], 3)
    assert ok.calls == [("i1", ("true",), 3)]
    assert not await probe_exec(FakeRuntime(1), "i1", ["false"], 3)
    assert not await probe_exec(FakeRuntime(ExecTimeout("i1", "slow")), "i1", ["x"], 3)
    assert not await probe_exec(FakeRuntime(InstanceNotFound("i1", "gone")), "i1", ["x"], 3)
