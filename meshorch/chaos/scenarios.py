"""Chaos scenarios and their fault schedules (pure: the RNG is passed in).

A scenario plans *when* its faults happen, as offsets from the start of the workload, and
*whom* they hit by role (``leader``, ``follower``, ``any``): the role is resolved against
the live site when the fault is injected, because the leader of second 7 is not known at
second 0. Every fault ends inside the run, so the run always finishes healed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal[
    "partition_pair",  # cut two hosts of the site from each other
    "isolate",  # cut one host from every other host of the site
    "uplink",  # cut the site from the hub (its router drops the hub)
    "kill",  # SIGKILL the agent, restart it at the end
    "pause",  # SIGSTOP the agent, SIGCONT at the end
    "kill_all",  # SIGKILL every agent (the page cache survives), restart them all at the end
    # Every host loses power: its processes die and its disk keeps only what reached it
    # (what was synced, and what the kernel happened to write back); restarted at the end.
    "power_cut",
]
Role = Literal["leader", "follower", "any", "site"]


@dataclass(frozen=True, slots=True)
class PlannedFault:
    """One fault: ``kind`` on ``roles`` (resolved at injection) from ``start_s``
    to ``end_s`` after the workload starts."""

    kind: FaultKind
    roles: tuple[Role, ...]
    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str
    plan: Callable[[random.Random, float], tuple[PlannedFault, ...]]
    needs_hub: bool = False


# Leave a quiet start (a baseline of successful operations) and a quiet end (recovery
# while the clients still run) around the faults.
LEAD_FRACTION = 0.2
TAIL_FRACTION = 0.3


def _window(
    rng: random.Random, duration_s: float, *, min_len_s: float = 1.0, long: bool = False
) -> tuple[float, float]:
    """One fault interval inside the middle of the run, at a seeded position and length
    (``long``: nearly all of the middle)."""
    lo = duration_s * LEAD_FRACTION
    hi = duration_s * (1.0 - TAIL_FRACTION)
    span = max(hi - lo, min_len_s)
    length = max(min_len_s, span * (rng.uniform(0.85, 0.95) if long else rng.uniform(0.5, 0.9)))
    start = lo + rng.uniform(0.0, max(0.0, span - length))
    return round(start, 3), round(start + length, 3)


def _one(
    kind: FaultKind, *targets: Role, long: bool = False
) -> Callable[[random.Random, float], tuple[PlannedFault, ...]]:
    def plan(rng: random.Random, duration_s: float) -> tuple[PlannedFault, ...]:
        start, end = _window(rng, duration_s, long=long)
        return (PlannedFault(kind, targets, start, end),)

    return plan


def _host_pair(rng: random.Random, duration_s: float) -> tuple[PlannedFault, ...]:
    # Cutting the leader from one follower, or two followers from each other: the seed picks.
    pair: tuple[Role, ...] = (
        ("leader", "follower") if rng.random() < 0.5 else ("follower", "follower")
    )
    start, end = _window(rng, duration_s)
    return (PlannedFault("partition_pair", pair, start, end),)


def _flapping(rng: random.Random, duration_s: float) -> tuple[PlannedFault, ...]:
    """Several short uplink cuts with short reconnections between them."""
    lo = duration_s * LEAD_FRACTION
    hi = duration_s * (1.0 - TAIL_FRACTION)
    faults, t = [], lo
    while True:
        down = rng.uniform(0.5, 2.0)
        if t + down > hi:
            break
        faults.append(PlannedFault("uplink", ("site",), round(t, 3), round(t + down, 3)))
        t += down + rng.uniform(0.3, 1.5)
    if not faults:  # a very short run still gets one cut
        faults.append(PlannedFault("uplink", ("site",), round(lo, 3), round(max(hi, lo + 0.5), 3)))
    return tuple(faults)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "host-partition",
            "two hosts of the site cannot reach each other (leader-follower or two followers)",
            _host_pair,
        ),
        Scenario(
            "minority-partition",
            "one follower is cut from the rest of the site; the majority keeps the leader",
            _one("isolate", "follower"),
        ),
        Scenario(
            "majority-partition",
            "the leader is cut from the rest of the site; the majority elects a new one",
            _one("isolate", "leader"),
        ),
        Scenario(
            "hub-partition",
            "the site's router drops all traffic with the hub; the site runs on",
            # Long: the site's link only notices a cut after a report times out (3-7 s).
            _one("uplink", "site", long=True),
            needs_hub=True,
        ),
        Scenario(
            "uplink-flapping",
            "the site-hub link goes down and up several times in quick succession",
            _flapping,
            needs_hub=True,
        ),
        Scenario(
            "kill-leader", "kill -9 the leader's agent, restart it later", _one("kill", "leader")
        ),
        Scenario(
            "kill-follower",
            "kill -9 a follower's agent, restart it later",
            _one("kill", "follower"),
        ),
        Scenario(
            "pause-leader",
            "SIGSTOP the leader's agent (a long GC pause, a frozen VM), SIGCONT later",
            _one("pause", "leader"),
        ),
        Scenario(
            "kill-all",
            "kill -9 every agent of the site at once (the page cache survives), restart them",
            _one("kill_all", "site"),
        ),
        Scenario(
            "power-cut",
            "every host of the site loses power at once: its processes die and what it had "
            "not synced is gone; power back on, agents restarted",
            _one("power_cut", "site"),
        ),
    )
}


def plan_scenario(name: str, seed: int, duration_s: float) -> tuple[PlannedFault, ...]:
    """The fault schedule of ``name`` for ``seed``: the same inputs, the same schedule."""
    scenario = get_scenario(name)
    if duration_s <= 0:
        raise ValueError(f"the duration must be positive, not {duration_s}")
    faults = scenario.plan(random.Random(f"{name}:{seed}"), duration_s)
    return tuple(sorted(faults, key=lambda f: f.start_s))


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise ValueError(f"no scenario {name!r}; the scenarios are: {known}") from None
