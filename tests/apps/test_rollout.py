"""Rolling upgrades against a small simulated site."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshorch.apps.rollout import (
    Decision,
    Done,
    InFlight,
    InstanceHealth,
    RollBack,
    RolloutEvent,
    RolloutState,
    UpgradeInstance,
    Wait,
    new_instance_version,
    start_rollout,
    step,
)

GATE_S = 30.0


@dataclass
class Instance:
    version: str
    ready: bool = True
    failed: bool = False
    since: float = 0.0
    settles_at: float | None = None  # when the version being started is ready, or fails
    old_copy_serves: bool = False  # start-before-stop: the previous copy still answers


@dataclass
class Site:
    """Instances that take ``start_s`` to start; a version's fate set by ``behaviour``.

    behaviour: version -> "ok" | "fail" | "hang"; ``bad`` instances fail on any new version.
    """

    instances: dict[str, Instance]
    behaviour: Mapping[str, str] = field(default_factory=dict)
    bad: frozenset[str] = frozenset()
    start_s: float = 3.0
    base_version: str = "1"

    def apply(self, decision: Decision, now: float) -> None:
        if not isinstance(decision, UpgradeInstance):
            return
        inst = self.instances[decision.instance_id]
        serving = inst.ready or inst.old_copy_serves
        inst.old_copy_serves = decision.start_before_stop and serving
        inst.version, inst.ready, inst.failed, inst.since = decision.to_version, False, False, now
        inst.settles_at = now + self.start_s

    def tick(self, now: float) -> None:
        for iid, inst in self.instances.items():
            if inst.settles_at is None or now < inst.settles_at:
                continue
            fate = self.behaviour.get(inst.version, "ok")
            if inst.version != self.base_version and iid in self.bad:
                fate = "fail"
            if fate == "ok":
                inst.ready, inst.old_copy_serves = True, False
            elif fate == "fail":
                inst.failed = True
            inst.since, inst.settles_at = inst.settles_at, None

    def health(self) -> list[InstanceHealth]:
        return [
            InstanceHealth(iid, i.version, i.ready, i.failed, i.since)
            for iid, i in sorted(self.instances.items())
        ]

    def serving(self, service: str) -> int:
        return sum(
            (i.ready and not i.failed) or i.old_copy_serves
            for iid, i in self.instances.items()
            if iid.split(".")[1] == service
        )


def make_site(
    replicas: Mapping[str, int],
    behaviour: Mapping[str, str] | None = None,
    bad: frozenset[str] = frozenset(),
    start_s: float = 3.0,
) -> Site:
    instances = {
        f"shop.{service}.{i}": Instance("1") for service, n in replicas.items() for i in range(n)
    }
    return Site(instances, behaviour or {}, bad, start_s)


@dataclass
class Run:
    decisions: list[tuple[float, Decision]]
    events: list[RolloutEvent]
    state: RolloutState

    def upgrades(self) -> list[UpgradeInstance]:
        return [d for _, d in self.decisions if isinstance(d, UpgradeInstance)]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def drive(
    site: Site, *, gate_s: float = GATE_S, min_ready_s: float = 0.0, limit_s: float = 2000
) -> Run:
    """Tick once a second until Done, checking at every tick that every service serves."""
    state, started = start_rollout("shop", "1", "2", 0.0)
    services = {iid.split(".")[1] for iid in site.instances}
    run = Run([], [started], state)
    now = 0.0
    while now <= limit_s:
        site.tick(now)
        for service in services:
            assert site.serving(service) >= 1, f"no {service} instance serves at {now}"
        result = step(run.state, site.health(), now, gate_timeout_s=gate_s, min_ready_s=min_ready_s)
        run.state = result.state
        run.events.extend(result.events)
        run.decisions.append((now, result.decision))
        if isinstance(result.decision, UpgradeInstance) and run.state.phase == "upgrading":
            # One at a time: every instance already on the new version is ready.
            on_new = [i for i in site.instances.values() if i.version == "2"]
            assert all(i.ready for i in on_new)
        if isinstance(result.decision, Done):
            return run
        site.apply(result.decision, now)
        now += 1.0
    raise AssertionError(f"no end after {limit_s}s: {run.decisions[-1]}")


def versions(site: Site) -> set[str]:
    return {i.version for i in site.instances.values()}


def test_happy_path_upgrades_one_instance_at_a_time() -> None:
    site = make_site({"web": 3, "db": 1})
    run = drive(site)
    assert run.decisions[-1][1] == Done(rolled_back=False)
    assert versions(site) == {"2"} and run.state.phase == "done"
    assert run.upgrades() == [
        UpgradeInstance("shop.db.0", "2", start_before_stop=True),
        UpgradeInstance("shop.web.0", "2"),
        UpgradeInstance("shop.web.1", "2"),
        UpgradeInstance("shop.web.2", "2"),
    ]
    assert run.state.done == ("shop.db.0", "shop.web.0", "shop.web.1", "shop.web.2")
    assert run.kinds() == [
        "rollout_started",
        *["instance_upgrade_started", "instance_upgraded"] * 4,
        "rollout_done",
    ]
    assert all(e.app == "shop" for e in run.events)
    # Each upgrade waits for the previous one to be ready (3 s to start here).
    times = [t for t, d in run.decisions if isinstance(d, UpgradeInstance)]
    assert times == [0.0, 3.0, 6.0, 9.0]
    assert new_instance_version(run.state) == "2"


def test_a_failing_version_is_rolled_back() -> None:
    site = make_site({"web": 3}, {"2": "fail"})
    run = drive(site)
    assert run.decisions[-1][1] == Done(rolled_back=True)
    assert versions(site) == {"1"} and run.state.phase == "rolled_back"
    rollbacks = [(t, d) for t, d in run.decisions if isinstance(d, RollBack)]
    assert rollbacks == [(3.0, RollBack("shop.web.0 failed on 2"))]
    assert run.upgrades() == [
        UpgradeInstance("shop.web.0", "2"),
        UpgradeInstance("shop.web.0", "1"),
    ]
    assert run.kinds() == [
        "rollout_started",
        "instance_upgrade_started",
        "rollback_started",
        "instance_revert_started",
        "instance_reverted",
        "rollback_done",
    ]
    started = next(e for e in run.events if e.kind == "rollback_started")
    assert (started.detail, started.at) == ("shop.web.0 failed on 2", 3.0)
    assert run.state.reason == "shop.web.0 failed on 2"
    assert run.state.reverted == ("shop.web.0",)


def test_a_version_never_ready_is_rolled_back_after_the_gate_timeout() -> None:
    site = make_site({"web": 2, "db": 1}, behaviour={"2": "hang"})
    run = drive(site, gate_s=20.0)
    rollbacks = [(t, d) for t, d in run.decisions if isinstance(d, RollBack)]
    assert rollbacks == [(21.0, RollBack("shop.db.0 was not ready on 2 within 20s"))]
    assert run.decisions[-1][1] == Done(rolled_back=True)
    assert versions(site) == {"1"}
    # The single db instance was replaced start-before-stop both ways: it kept serving.
    assert run.upgrades() == [
        UpgradeInstance("shop.db.0", "2", start_before_stop=True),
        UpgradeInstance("shop.db.0", "1", start_before_stop=True),
    ]


def test_a_later_failure_rolls_back_every_upgraded_instance_latest_first() -> None:
    site = make_site({"web": 4}, bad=frozenset({"shop.web.2"}))
    run = drive(site)
    assert run.decisions[-1][1] == Done(rolled_back=True)
    assert versions(site) == {"1"}
    assert run.upgrades() == [
        UpgradeInstance("shop.web.0", "2"),
        UpgradeInstance("shop.web.1", "2"),
        UpgradeInstance("shop.web.2", "2"),
        # Rollback: the failed one first, then the most recently upgraded.
        UpgradeInstance("shop.web.2", "1"),
        UpgradeInstance("shop.web.1", "1"),
        UpgradeInstance("shop.web.0", "1"),
    ]
    assert run.state.reverted == ("shop.web.2", "shop.web.1", "shop.web.0")


def test_min_ready_holds_the_gate() -> None:
    site = make_site({"web": 2})
    run = drive(site, min_ready_s=5.0)
    times = [t for t, d in run.decisions if isinstance(d, UpgradeInstance)]
    assert times == [0.0, 8.0]  # ready at 3, then 5 more seconds
    waits = [d for t, d in run.decisions if isinstance(d, Wait)]
    assert waits[0] == Wait("waiting for shop.web.0 to be ready on 2")


# --- single steps -----------------------------------------------------------------------


def health(*items: tuple[str, str, bool, bool, float]) -> list[InstanceHealth]:
    return [InstanceHealth(*item) for item in items]


def upgrading(**changes: Any) -> RolloutState:
    state, _ = start_rollout("shop", "1", "2", 0.0)
    return replace(state, **changes)


def test_an_upgraded_instance_losing_readiness_too_long_triggers_a_rollback() -> None:
    state = upgrading(done=("shop.web.0",))
    now = 100.0
    seen = health(("shop.web.0", "2", False, False, 60.0), ("shop.web.1", "1", True, False, 0.0))
    result = step(state, seen, now, gate_timeout_s=GATE_S)
    assert result.decision == RollBack("shop.web.0 was not ready on 2 for more than 30s")
    assert result.state.phase == "rolling_back"
    # Not ready for less than the gate: wait for it, upgrade nothing else.
    seen[0] = InstanceHealth("shop.web.0", "2", False, False, 90.0)
    result = step(state, seen, now, gate_timeout_s=GATE_S)
    assert result.decision == Wait("waiting for shop.web.0 to be ready on 2")
    assert result.events == ()


def test_a_rollback_waits_rather_than_leave_a_service_with_no_ready_instance() -> None:
    state = upgrading(phase="rolling_back", done=("shop.web.0",), reason="x")
    seen = health(("shop.web.0", "2", True, False, 0.0), ("shop.web.1", "1", False, False, 0.0))
    result = step(state, seen, 50.0, gate_timeout_s=GATE_S)
    assert result.decision == Wait("no other ready instance in service web")
    seen[1] = InstanceHealth("shop.web.1", "1", True, False, 40.0)
    result = step(state, seen, 50.0, gate_timeout_s=GATE_S)
    assert result.decision == UpgradeInstance("shop.web.0", "1")


def test_a_revert_that_stays_not_ready_is_recorded_and_the_rollback_goes_on() -> None:
    flight = InFlight("shop.web.1", "1", 10.0)
    state = upgrading(phase="rolling_back", done=("shop.web.0", "shop.web.1"), in_flight=flight)
    seen = health(("shop.web.0", "2", False, False, 0.0), ("shop.web.1", "1", False, True, 20.0))
    result = step(state, seen, 41.0, gate_timeout_s=GATE_S)
    assert [e.kind for e in result.events] == ["revert_not_ready", "instance_revert_started"]
    assert result.events[0].detail == "shop.web.1 still failed on 1"
    assert result.decision == UpgradeInstance("shop.web.0", "1")  # not ready: nothing to lose


def test_an_instance_gone_while_upgrading_is_forgotten() -> None:
    state = upgrading(in_flight=InFlight("shop.web.1", "2", 5.0))
    seen = health(("shop.web.0", "1", True, False, 0.0))
    result = step(state, seen, 6.0, gate_timeout_s=GATE_S)
    assert [e.kind for e in result.events] == ["instance_gone", "instance_upgrade_started"]
    assert result.decision == UpgradeInstance("shop.web.0", "2", start_before_stop=True)


def test_a_failed_old_instance_is_upgraded_first() -> None:
    state = upgrading()
    seen = health(("shop.web.0", "1", True, False, 0.0), ("shop.web.1", "1", False, True, 0.0))
    result = step(state, seen, 1.0, gate_timeout_s=GATE_S)
    assert result.decision == UpgradeInstance("shop.web.1", "2")


def test_finished_rollouts_stay_finished() -> None:
    for phase, rolled_back in (("done", False), ("rolled_back", True)):
        state = upgrading(phase=phase)
        result = step(state, [], 1.0, gate_timeout_s=GATE_S)
        assert result == type(result)(state, Done(rolled_back), ())
    assert new_instance_version(upgrading()) == "1"
    assert new_instance_version(upgrading(phase="rolled_back")) == "1"


def test_an_app_already_on_the_version_is_done_at_once() -> None:
    seen = health(("shop.web.0", "2", True, False, 0.0))
    result = step(upgrading(), seen, 1.0, gate_timeout_s=GATE_S)
    assert result.decision == Done() and [e.kind for e in result.events] == ["rollout_done"]


def test_the_gate_must_outlast_min_ready() -> None:
    with pytest.raises(ValueError):
        step(upgrading(), [], 0.0, gate_timeout_s=5.0, min_ready_s=5.0)


# --- property: availability and termination ---------------------------------------------


def service_counts() -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(st.sampled_from(["web", "db", "cache"]), st.integers(1, 4), min_size=1)


def instance_ids(counts: Mapping[str, int]) -> Iterable[str]:
    return (f"shop.{s}.{i}" for s, n in counts.items() for i in range(n))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    service_counts(),
    st.sampled_from(["ok", "fail", "hang"]),
    st.data(),
    st.integers(1, 10),
    st.integers(15, 40),
    st.integers(0, 5),
)
def test_no_service_ever_stops_serving_and_every_rollout_ends(
    counts: dict[str, int],
    fate: str,
    data: st.DataObject,
    start_s: int,
    gate_s: int,
    min_ready_s: int,
) -> None:
    ids = sorted(instance_ids(counts))
    bad = data.draw(st.frozensets(st.sampled_from(ids))) if fate == "ok" else frozenset()
    site = make_site(counts, behaviour={"2": fate}, bad=bad, start_s=float(start_s))
    run = drive(site, gate_s=float(gate_s), min_ready_s=float(min_ready_s))
    final = run.decisions[-1][1]
    healthy = fate == "ok" and not bad
    assert final == Done(rolled_back=not healthy)
    assert versions(site) == ({"2"} if healthy else {"1"})
    assert all(i.ready for i in site.instances.values())
    assert run.kinds()[-1] == ("rollout_done" if healthy else "rollback_done")
    assert run.kinds().count("rollback_started") == (0 if healthy else 1)


def test_a_blocked_version_rolls_back_at_once_with_the_reason() -> None:
    state, _ = start_rollout("a", "1", "2", 0.0)
    health = [InstanceHealth(f"a.web.{i}", "1", True, False, 0.0) for i in range(3)]
    reason = "version 2: tenant acme over its quota: memory 192Mi of 128Mi"
    stepped = step(state, health, 1.0, gate_timeout_s=GATE_S, blocked=reason)
    assert stepped.decision == Done(rolled_back=True)
    assert stepped.state.phase == "rolled_back" and stepped.state.reason == reason
    assert [e.kind for e in stepped.events] == ["rollback_started", "rollback_done"]
    assert new_instance_version(stepped.state) == "1"


def test_a_version_blocked_midway_reverts_what_was_upgraded() -> None:
    state, _ = start_rollout("a", "1", "2", 0.0)
    state = replace(state, done=("a.web.0",))
    health = [
        InstanceHealth("a.web.0", "2", True, False, 0.0),
        InstanceHealth("a.web.1", "1", True, False, 0.0),
    ]
    stepped = step(state, health, 5.0, gate_timeout_s=GATE_S, blocked="over quota")
    assert stepped.decision == RollBack("over quota")
    after = step(stepped.state, health, 6.0, gate_timeout_s=GATE_S)
    assert after.decision == UpgradeInstance("a.web.0", "1")


def test_blocked_is_ignored_once_rolling_back_or_done() -> None:
    state, _ = start_rollout("a", "1", "2", 0.0)
    done = replace(state, phase="done")
    health = [InstanceHealth("a.web.0", "2", True, False, 0.0)]
    assert step(done, health, 1.0, gate_timeout_s=GATE_S, blocked="x").decision == Done()
