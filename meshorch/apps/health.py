"""Health probes and restart back-off for instances.

Two pure cores, driven with explicit ``now`` (any monotonic clock, in seconds):

- :class:`ProbeTracker` schedules the probes of each (instance, probe kind) and
  turns their results into a state: ``unknown`` until the thresholds are met,
  then ``passing`` after ``success_threshold`` consecutive successes or
  ``failing`` after ``failure_threshold`` consecutive failures. Results before
  the instance's ``initial_delay_s`` are ignored.
- :class:`RestartBackoff` says how long to wait before restarting an instance
  that exited: ``initial_s * factor ** (n - 1)`` after the n-th consecutive
  failure, capped at ``max_s``; a run that lasted ``reset_after_s`` or more
  resets n.

And the executors that do the I/O: :func:`probe_http`, :func:`probe_tcp`,
:func:`probe_exec` (the checks themselves are the spec's, in ``meshorch.apps.spec``). Executors
never raise for an unhealthy target: they return False (and log at debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from meshorch.errors import ConfigurationError
from meshorch.runtime.base import Runtime
from meshorch.runtime.errors import RuntimeBackendError

logger = logging.getLogger(__name__)


class ProbeKind(StrEnum):
    LIVENESS = "liveness"
    """Failing: the instance is restarted."""
    READINESS = "readiness"
    """Failing: the instance gets no traffic but is left running."""


class ProbeState(StrEnum):
    UNKNOWN = "unknown"
    PASSING = "passing"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """How often a probe runs and how many results decide its state."""

    period_s: float = 10.0
    timeout_s: float = 2.0
    initial_delay_s: float = 0.0
    success_threshold: int = 1
    failure_threshold: int = 3

    def validate(self) -> None:
        for name in ("period_s", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"probe {name} must be > 0, not {value!r}")
        if not (math.isfinite(self.initial_delay_s) and self.initial_delay_s >= 0):
            raise ConfigurationError("probe initial_delay_s must be >= 0")
        if self.success_threshold < 1 or self.failure_threshold < 1:
            raise ConfigurationError("probe thresholds must be >= 1")


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    """A snapshot of one probe's bookkeeping."""

    state: ProbeState
    consecutive_successes: int
    consecutive_failures: int
    last_result: bool | None
    last_checked_at: float | None
    changed_at: float | None
    next_due_at: float


@dataclass(slots=True)
class _Probe:
    config: ProbeConfig
    active_from: float
    next_due_at: float
    state: ProbeState = ProbeState.UNKNOWN
    successes: int = 0
    failures: int = 0
    last_result: bool | None = None
    last_checked_at: float | None = None
    changed_at: float | None = None


ProbeKey = tuple[str, ProbeKind]


class ProbeTracker:
    """Schedules probes and folds their results into states. Pure: no clock, no I/O.

    Typical loop::

        for instance_id, kind in tracker.take_due(now):
            ok = await probe_http(...)  # or probe_tcp, probe_exec
            tracker.record(instance_id, kind, ok, now_after)
        sleep until tracker.next_due_at()
    """

    def __init__(self) -> None:
        self._probes: dict[ProbeKey, _Probe] = {}

    def add(
        self, instance_id: str, kind: ProbeKind, config: ProbeConfig, started_at: float
    ) -> None:
        """(Re)start tracking a probe for an instance started at ``started_at``.

        Calling it again (the instance restarted) resets the probe to ``unknown``.
        """
        config.validate()
        active_from = started_at + config.initial_delay_s
        self._probes[(instance_id, kind)] = _Probe(config, active_from, active_from)

    def remove(self, instance_id: str, kind: ProbeKind | None = None) -> None:
        """Forget one probe, or all probes of the instance when ``kind`` is None."""
        for key in [k for k in self._probes if k[0] == instance_id]:
            if kind is None or key[1] == kind:
                del self._probes[key]

    def take_due(self, now: float) -> list[ProbeKey]:
        """Probes to run now; each is scheduled again ``period_s`` after ``now``."""
        due: list[ProbeKey] = []
        for key, probe in self._probes.items():
            if probe.next_due_at <= now:
                due.append(key)
                probe.next_due_at = now + probe.config.period_s
        return sorted(due)

    def next_due_at(self) -> float | None:
        """When the earliest probe is due; None without probes."""
        return min((p.next_due_at for p in self._probes.values()), default=None)

    def record(self, instance_id: str, kind: ProbeKind, ok: bool, now: float) -> ProbeState:
        """Fold one result in; returns the probe's (possibly new) state.

        Results for unknown probes or before the initial delay are ignored.
        """
        probe = self._probes.get((instance_id, kind))
        if probe is None:
            return ProbeState.UNKNOWN
        if now < probe.active_from:
            return probe.state
        probe.last_result = ok
        probe.last_checked_at = now
        if ok:
            probe.successes += 1
            probe.failures = 0
            if probe.successes >= probe.config.success_threshold:
                self._set(probe, ProbeState.PASSING, now, instance_id, kind)
        else:
            probe.failures += 1
            probe.successes = 0
            if probe.failures >= probe.config.failure_threshold:
                self._set(probe, ProbeState.FAILING, now, instance_id, kind)
        return probe.state

    @staticmethod
    def _set(
        probe: _Probe, state: ProbeState, now: float, instance_id: str, kind: ProbeKind
    ) -> None:
        if probe.state is not state:
            logger.debug("%s probe of %s: %s -> %s", kind, instance_id, probe.state, state)
            probe.state = state
            probe.changed_at = now

    def state(self, instance_id: str, kind: ProbeKind) -> ProbeState:
        probe = self._probes.get((instance_id, kind))
        return ProbeState.UNKNOWN if probe is None else probe.state

    def status(self, instance_id: str, kind: ProbeKind) -> ProbeStatus | None:
        probe = self._probes.get((instance_id, kind))
        if probe is None:
            return None
        return ProbeStatus(
            state=probe.state,
            consecutive_successes=probe.successes,
            consecutive_failures=probe.failures,
            last_result=probe.last_result,
            last_checked_at=probe.last_checked_at,
            changed_at=probe.changed_at,
            next_due_at=probe.next_due_at,
        )

    def keys(self) -> list[ProbeKey]:
        return sorted(self._probes)


# --- restart back-off ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    reset_after_s: float = 600.0
    """A run at least this long counts as stable: the next exit starts over."""

    def validate(self) -> None:
        if not (math.isfinite(self.initial_s) and self.initial_s >= 0):
            raise ConfigurationError("backoff initial_s must be >= 0")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ConfigurationError("backoff factor must be >= 1")
        if not (math.isfinite(self.max_s) and self.max_s >= self.initial_s):
            raise ConfigurationError("backoff max_s must be >= initial_s")
        if not (math.isfinite(self.reset_after_s) and self.reset_after_s > 0):
            raise ConfigurationError("backoff reset_after_s must be > 0")


class RestartBackoff:
    """Exponential, capped restart delay for one instance. Pure: ``now`` is passed in.

    Call :meth:`record_start` when the instance is (re)started and
    :meth:`record_exit` when it is seen exited (or killed for a failing liveness
    probe); :meth:`next_delay_s` then says how long to wait before the restart.
    """

    def __init__(self, config: BackoffConfig | None = None) -> None:
        self.config = config if config is not None else BackoffConfig()
        self.config.validate()
        self.failures = 0
        self.started_at: float | None = None
        self.exited_at: float | None = None

    def record_start(self, now: float) -> None:
        self.started_at = now
        self.exited_at = None

    def record_exit(self, now: float) -> None:
        if self.exited_at is not None:
            return  # already counted this exit
        if self.started_at is not None and now - self.started_at >= self.config.reset_after_s:
            self.failures = 0
        self.failures += 1
        self.exited_at = now

    def current_delay_s(self) -> float:
        """The delay that follows the latest exit (0 before any failure)."""
        if self.failures == 0:
            return 0.0
        delay = self.config.initial_s * self.config.factor ** min(self.failures - 1, 1024)
        return min(delay, self.config.max_s)

    def next_delay_s(self, now: float) -> float:
        """Seconds from ``now`` until a restart is allowed (0: restart now).

        A running instance that has been up for ``reset_after_s`` is stable: its
        failure count is cleared.
        """
        if self.exited_at is None:
            if self.started_at is not None and now - self.started_at >= self.config.reset_after_s:
                self.failures = 0
            return 0.0
        return max(0.0, self.exited_at + self.current_delay_s() - now)

    def reset(self) -> None:
        """Forget the history (the spec changed, or an operator asked for it)."""
        self.failures = 0
        self.started_at = None
        self.exited_at = None


# --- probe executors ------------------------------------------------------------------


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def probe_http(
    host: str,
    port: int,
    path: str = "/",
    timeout_s: float = 2.0,
    *,
    session: aiohttp.ClientSession | None = None,
) -> bool:
    """GET ``http://host:port/path``: healthy on a 2xx or 3xx answer within ``timeout_s``.

    Redirects are not followed. Pass ``session`` to reuse connections across probes.
    """
    if not path.startswith("/"):
        path = "/" + path
    url = f"http://{_host_for_url(host)}:{port}{path}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        if session is None:
            # force_close: a probe must not keep idle sockets around.
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as own,
                own.get(url, allow_redirects=False) as response,
            ):
                status = response.status
        else:
            async with session.get(url, allow_redirects=False, timeout=timeout) as response:
                status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        logger.debug("http probe %s failed: %r", url, exc)
        return False
    ok = 200 <= status < 400
    if not ok:
        logger.debug("http probe %s answered %d", url, status)
    return ok


async def probe_tcp(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Healthy when a TCP connection to ``host:port`` opens within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (TimeoutError, OSError, ValueError) as exc:
        logger.debug("tcp probe %s:%d failed: %r", host, port, exc)
        return False
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout_s):
            await writer.wait_closed()
    return True


async def probe_exec(
    runtime: Runtime, instance_id: str, argv: Sequence[str], timeout_s: float = 2.0
) -> bool:
    """Healthy when ``argv`` run inside the instance exits 0 within ``timeout_s``."""
    try:
        code = await runtime.exec(instance_id, argv, timeout_s)
    except RuntimeBackendError as exc:
        logger.debug("exec probe in %s failed: %s", instance_id, exc)
        return False
    return code == 0
