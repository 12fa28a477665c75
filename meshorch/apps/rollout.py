"""Rolling upgrade of one application: a pure state machine.

The leader keeps a ``RolloutState`` per app in the replicated state and, on every tick or
health change, calls ``step(state, health, now, gate_timeout_s=...)``. It gets back the
next state, one decision to carry out, and the events to record. Nothing here waits or
reads a clock.

Upgrading goes one instance at a time (so never more than one host at a time), in
instance id order with not-ready instances first (replacing them costs nothing):

- ``UpgradeInstance(id, to)`` is asked only when every instance already on the new
  version is ready, and has been for ``min_ready_s`` (the health gate).
- ``RollBack(reason)`` comes when an instance on the new version reports ``failed``, when
  the instance being upgraded is not through the gate ``gate_timeout_s`` after it was
  asked, when an upgraded instance stays not ready longer than that, or when the caller
  says the new version is ``blocked`` (the site controller: it would take the app's
  tenant over its quota). A blocked rollout never waits: it rolls back at once, with the
  reason, and an upgrade that had not begun ends ``rolled_back`` in the same step.
- ``Done(rolled_back=False)`` once every instance runs the new version and is through
  the gate; ``Wait(reason)`` otherwise.

After a ``RollBack`` the state is ``rolling_back`` and the following steps bring the
instances back to the old version the same way, one at a time, with ``UpgradeInstance(id,
from_version)``: not-ready ones first, then the most recently upgraded. A reverted instance
that is still not ready after ``gate_timeout_s`` is recorded (``revert_not_ready``) and the
rollback goes on: the old version is the one that worked, and the others must not stay on
the failing one. ``Done(rolled_back=True)`` ends it.

Availability rule, for upgrades and reverts alike: an instance is replaced only if that
cannot leave its service with no ready instance, that is when it is not ready itself
(nothing is lost) or another instance of the service is ready. A service with a single
instance is replaced start-before-stop: the decision carries ``start_before_stop=True``
and the executor starts the new copy beside the old one, stopping the old copy only once
the new one is ready (so the host needs room for both for a moment). When the rule allows
nobody, the decision is ``Wait``.

``health`` must list every current instance of the app (its placements): one missing is
taken as gone (scaled down, or its app changed). The service of an instance is read from
its id, ``{app}.{service}.{index or host}``.

Events (``RolloutEvent.kind``): ``rollout_started``, ``instance_upgrade_started``,
``instance_upgraded``, ``instance_gone``, ``rollback_started`` (detail: the reason),
``instance_revert_started``, ``instance_reverted``, ``revert_not_ready``, ``rollout_done``,
``rollback_done``. ``Wait`` is not a transition and records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

Phase = Literal["upgrading", "rolling_back", "done", "rolled_back"]


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    """What the site last observed of an instance.

    ``version`` is the version it runs (or is starting); ``since`` is when it entered its
    current (version, ready, failed) state. ``failed``: it crashed or its probes gave up.
    """

    instance_id: str
    version: str
    ready: bool
    failed: bool
    since: float


@dataclass(frozen=True, slots=True)
class InFlight:
    """The one instance being changed, and when that was asked."""

    instance_id: str
    to_version: str
    since: float


@dataclass(frozen=True, slots=True)
class RolloutState:
    app: str
    from_version: str
    to_version: str
    started_at: float
    phase: Phase = "upgrading"
    done: tuple[str, ...] = ()  # upgraded and through the gate, in order
    reverted: tuple[str, ...] = ()  # back on from_version during a rollback, in order
    in_flight: InFlight | None = None
    reason: str = ""  # why it rolled back


@dataclass(frozen=True, slots=True)
class UpgradeInstance:
    """Run ``to_version`` for this instance (also used to revert, with the old version)."""

    instance_id: str
    to_version: str
    start_before_stop: bool = False


@dataclass(frozen=True, slots=True)
class RollBack:
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    rolled_back: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    reason: str


Decision = UpgradeInstance | RollBack | Done | Wait


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    kind: str
    app: str
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class RolloutStep:
    state: RolloutState
    decision: Decision
    events: tuple[RolloutEvent, ...]


def start_rollout(
    app: str, from_version: str, to_version: str, now: float
) -> tuple[RolloutState, RolloutEvent]:
    state = RolloutState(app, from_version, to_version, started_at=now)
    return state, RolloutEvent("rollout_started", app, f"{from_version} -> {to_version}", now)


def new_instance_version(state: RolloutState) -> str:
    """The version the scheduler gives new instances (``schedule(new_versions=...)``).

    The old one until the upgrade is done: a new instance must not skip the health gate.
    """
    return state.to_version if state.phase == "done" else state.from_version


def step(
    state: RolloutState,
    health: Sequence[InstanceHealth],
    now: float,
    *,
    gate_timeout_s: float,
    min_ready_s: float = 0.0,
    blocked: str | None = None,
) -> RolloutStep:
    """The next decision for one app's rollout; see the module docstring.

    ``blocked``: why the new version cannot run at all (an upgrading rollout rolls back
    with this reason; ignored in the other phases).
    """
    if not 0 <= min_ready_s < gate_timeout_s:
        raise ValueError("need 0 <= min_ready_s < gate_timeout_s")
    run = _Run(state, {h.instance_id: h for h in health}, now, gate_timeout_s, min_ready_s)
    run.blocked = blocked
    if state.phase == "upgrading":
        return run.upgrade()
    if state.phase == "rolling_back":
        return run.roll_back()
    return RolloutStep(state, Done(rolled_back=state.phase == "rolled_back"), ())


class _Run:
    """One call of ``step``: the inputs, the state as it evolves, the events so far."""

    def __init__(
        self,
        state: RolloutState,
        health: Mapping[str, InstanceHealth],
        now: float,
        gate_timeout_s: float,
        min_ready_s: float,
    ) -> None:
        self.state = state
        self.health = health
        self.now = now
        self.gate_timeout_s = gate_timeout_s
        self.min_ready_s = min_ready_s
        self.blocked: str | None = None
        self.events: list[RolloutEvent] = []

    def record(self, kind: str, detail: str) -> None:
        self.events.append(RolloutEvent(kind, self.state.app, detail, self.now))

    def finish(self, decision: Decision) -> RolloutStep:
        return RolloutStep(self.state, decision, tuple(self.events))

    # --- upgrading ----------------------------------------------------------------------

    def upgrade(self) -> RolloutStep:
        to = self.state.to_version
        failure = self.blocked or self.upgrade_failure()
        if failure is not None:
            self.state = replace(self.state, phase="rolling_back", in_flight=None, reason=failure)
            self.record("rollback_started", failure)
            if self.blocked and all(h.version != to for h in self.health.values()):
                return self.roll_back()  # nothing to revert: rolled back at once
            return self.finish(RollBack(failure))
        flight = self.state.in_flight
        if flight is not None and not self.settle(flight):
            return self.finish(Wait(f"waiting for {flight.instance_id} to be ready on {to}"))
        pending = sorted(
            i for i, h in self.health.items() if h.version == to and not self.passed(h)
        )
        if pending:
            return self.finish(Wait(f"waiting for {', '.join(pending)} to be ready on {to}"))
        candidates = [h for h in self.health.values() if h.version != to]
        if not candidates:
            self.state = replace(self.state, phase="done")
            self.record("rollout_done", f"every instance runs {to}")
            return self.finish(Done())
        return self.replace_one(candidates, to, "instance_upgrade_started")

    def upgrade_failure(self) -> str | None:
        """Why the new version fails its health gate, or None while it does not."""
        to, gate = self.state.to_version, self.gate_timeout_s
        upgraded = sorted((h for h in self.health.values() if h.version == to), key=_id)
        for h in upgraded:
            if h.failed:
                return f"{h.instance_id} failed on {to}"
        flight = self.state.in_flight
        in_flight_id = flight.instance_id if flight is not None else None
        for h in upgraded:  # the in-flight one is timed from when it was asked, below
            if h.instance_id != in_flight_id and not h.ready and self.now - h.since > gate:
                return f"{h.instance_id} was not ready on {to} for more than {gate:g}s"
        if flight is not None and flight.instance_id in self.health:
            h = self.health[flight.instance_id]
            if not (h.version == to and self.passed(h)) and self.now - flight.since > gate:
                return f"{flight.instance_id} was not ready on {to} within {gate:g}s"
        return None

    # --- rolling back -------------------------------------------------------------------

    def roll_back(self) -> RolloutStep:
        back = self.state.from_version
        flight = self.state.in_flight
        if flight is not None and not self.settle(flight):
            h = self.health[flight.instance_id]
            if self.now - flight.since <= self.gate_timeout_s:
                return self.finish(Wait(f"waiting for {flight.instance_id} to be ready on {back}"))
            state = "failed" if h.failed else "not ready"
            self.record("revert_not_ready", f"{h.instance_id} still {state} on {back}")
            self.state = replace(self.state, in_flight=None)
        candidates = [h for h in self.health.values() if h.version != back]
        if not candidates:
            self.state = replace(self.state, phase="rolled_back")
            self.record("rollback_done", f"every instance runs {back}: {self.state.reason}")
            return self.finish(Done(rolled_back=True))
        return self.replace_one(candidates, back, "instance_revert_started")

    # --- shared -------------------------------------------------------------------------

    def settle(self, flight: InFlight) -> bool:
        """Clear the in-flight instance if it is through the gate or gone; True if cleared."""
        h = self.health.get(flight.instance_id)
        if h is None:
            self.record("instance_gone", f"{flight.instance_id} is no longer placed")
        elif h.version != flight.to_version or not self.passed(h):
            return False
        elif self.state.phase == "upgrading":
            self.record("instance_upgraded", f"{h.instance_id} ready on {h.version}")
            self.state = replace(self.state, done=(*self.state.done, h.instance_id))
        else:
            self.record("instance_reverted", f"{h.instance_id} ready on {h.version}")
            self.state = replace(self.state, reverted=(*self.state.reverted, h.instance_id))
        self.state = replace(self.state, in_flight=None)
        return True

    def replace_one(self, candidates: list[InstanceHealth], version: str, kind: str) -> RolloutStep:
        """Ask for the first candidate the availability rule allows to be replaced."""
        recent = {iid: n for n, iid in enumerate(self.state.done)}
        candidates.sort(key=lambda h: (_ready(h), -recent.get(h.instance_id, -1), h.instance_id))
        for h in candidates:
            siblings = [o for o in self.health.values() if _service(o) == _service(h)]
            alone = len(siblings) == 1
            others_ready = any(_ready(o) for o in siblings if o is not h)
            if alone or not _ready(h) or others_ready:
                self.state = replace(
                    self.state, in_flight=InFlight(h.instance_id, version, self.now)
                )
                how = " (start before stop)" if alone else ""
                self.record(kind, f"{h.instance_id}: {h.version} -> {version}{how}")
                return self.finish(UpgradeInstance(h.instance_id, version, start_before_stop=alone))
        waiting = ", ".join(sorted({_service(h) for h in candidates}))
        return self.finish(Wait(f"no other ready instance in service {waiting}"))

    def passed(self, h: InstanceHealth) -> bool:
        """Through the health gate: ready, not failed, and for at least ``min_ready_s``."""
        return _ready(h) and self.now - h.since >= self.min_ready_s


def _ready(h: InstanceHealth) -> bool:
    return h.ready and not h.failed


def _service(h: InstanceHealth) -> str:
    parts = h.instance_id.split(".")
    return parts[1] if len(parts) == 3 else h.instance_id


def _id(h: InstanceHealth) -> str:
    return h.instance_id
