"""Fault injection on a lab site (I/O adapter): partitions through the lab's iptables rules,
SIGKILL/restart through the lab's process records, SIGSTOP/SIGCONT of a recorded pid, and
power cuts: every process of every host frozen, its disk cut (``meshorch.chaos.disks``),
then killed; at the heal the disks are mounted again and the agents restarted.

Only processes the lab started are ever signalled. Every fault is remembered until healed,
and ``heal_everything`` undoes whatever is still in force (partitions, paused and killed
agents): the runner calls it in ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable, Sequence

from meshorch.chaos.disks import DiskError, LossyDisks
from meshorch.chaos.scenarios import PlannedFault, Role
from meshorch.lab.agents import HUB_NODE
from meshorch.lab.lab import Lab
from meshorch.lab.system import kill_pids, netns_pids, process_alive

log = logging.getLogger(__name__)


class FaultError(Exception):
    """A fault could not be injected or healed."""


def resolve_roles(
    roles: Sequence[Role], hosts: Sequence[str], leader: str | None, site: str, rng: random.Random
) -> tuple[str, ...]:
    """Host names (or the site) for ``roles``, distinct: "follower" never picks the leader
    nor a host already chosen. Without a known leader, "leader" is any host (the report
    says which)."""
    chosen: list[str] = []
    for role in roles:
        if role == "site":
            chosen.append(site)
            continue
        free = [h for h in hosts if h not in chosen]
        if role == "leader" and leader in free:
            chosen.append(leader)
            continue
        pool = [h for h in free if h != leader] if role == "follower" else free
        if not pool:
            raise FaultError(f"no host left for role {role!r} (hosts {list(hosts)})")
        chosen.append(rng.choice(pool))
    return tuple(chosen)


class FaultInjector:
    def __init__(
        self,
        lab: Lab,
        hosts: Sequence[str],
        say: Callable[[str], None],
        disks: LossyDisks | None = None,
    ) -> None:
        self.lab = lab
        self.hosts = tuple(hosts)
        self.say = say
        self.disks = disks  # the hosts' data disks; a power cut needs them
        self.partitions: set[frozenset[str]] = set()
        self.paused: dict[str, int] = {}  # host -> pid
        self.killed: set[str] = set()

    def inject(self, fault: PlannedFault, targets: Sequence[str]) -> None:
        self.say(f"inject {fault.kind} on {', '.join(targets)}")
        if fault.kind == "partition_pair":
            self._partition(targets[0], targets[1])
        elif fault.kind == "isolate":
            for other in self.hosts:
                if other != targets[0]:
                    self._partition(targets[0], other)
        elif fault.kind == "uplink":
            self._partition(targets[0], HUB_NODE)
        elif fault.kind == "kill":
            self._kill(targets[0])
        elif fault.kind == "kill_all":
            for host in self.hosts:
                self._kill(host)
        elif fault.kind == "power_cut":
            self._power_cut()
        elif fault.kind == "pause":
            self._pause(targets[0])
        else:  # pragma: no cover - the Literal covers every kind
            raise FaultError(f"unknown fault kind {fault.kind!r}")

    def heal(self, fault: PlannedFault, targets: Sequence[str]) -> None:
        self.say(f"heal {fault.kind} on {', '.join(targets)}")
        if fault.kind == "partition_pair":
            self._unpartition(targets[0], targets[1])
        elif fault.kind == "isolate":
            for other in self.hosts:
                if other != targets[0]:
                    self._unpartition(targets[0], other)
        elif fault.kind == "uplink":
            self._unpartition(targets[0], HUB_NODE)
        elif fault.kind == "kill":
            self._restart(targets[0])
        elif fault.kind in ("kill_all", "power_cut"):
            for host in self.hosts:
                self._power_on(host)
                self._restart(host)
        elif fault.kind == "pause":
            self._resume(targets[0])

    def heal_everything(self) -> None:
        """Undo every fault still in force; keeps going past errors, then raises the first."""
        errors: list[BaseException] = []
        for host in list(self.paused):
            try:
                self._resume(host)
            except (OSError, FaultError) as exc:
                errors.append(exc)
        if self.partitions or self.lab.load()[0].partitions:
            try:
                self.lab.heal()
                self.partitions.clear()
            except Exception as exc:
                errors.append(exc)
        disks = self.disks.disks if self.disks is not None else {}
        for host, disk in disks.items():
            if disk.powered:
                continue
            try:
                # A cut left half done: what still runs on the dead disk goes with it.
                kill_pids(netns_pids(self.lab.runner, self.lab.plan.host(host).netns),
                          self.lab.kill_timeout_s)  # fmt: skip
                self.killed.add(host)
                disk.release()
                self._power_on(host)
            except Exception as exc:
                errors.append(exc)
        for host in sorted(self.killed):
            try:
                self._power_on(host)
                self._restart(host)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise FaultError(f"healing failed: {errors[0]}") from errors[0]

    # -- the primitives -------------------------------------------------------------------

    def _partition(self, a: str, b: str) -> None:
        self.lab.partition(a, b)
        self.partitions.add(frozenset((a, b)))

    def _unpartition(self, a: str, b: str) -> None:
        self.lab.heal(a, b)
        self.partitions.discard(frozenset((a, b)))

    def _kill(self, host: str) -> None:
        self.paused.pop(host, None)  # SIGKILL ends a stopped process too
        self.lab.kill(host)
        self.killed.add(host)

    def _restart(self, host: str) -> None:
        self.lab.restart(host)
        self.killed.discard(host)

    def _power_cut(self) -> None:
        """Every host at the same instant: its processes stop (SIGSTOP: no more writes, no
        file closed), its disk drops what it had not synced, then the processes die and the
        dead filesystem is unmounted. Not the agent only: nothing of a host outlives its
        power (the process runtime's instances run in sessions of their own)."""
        if self.disks is None or any(h not in self.disks for h in self.hosts):
            raise FaultError("a power cut needs every host's data directory on a lossy disk")
        plan = self.lab.plan
        pids = {h: netns_pids(self.lab.runner, plan.host(h).netns) for h in self.hosts}
        for pid in (p for host_pids in pids.values() for p in host_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for host in self.hosts:
            self.paused.pop(host, None)
            self.killed.add(host)  # restarted by the heal, or by heal_everything
            self.disks.disks[host].cut()
        for host, host_pids in pids.items():
            stuck = kill_pids(host_pids, self.lab.kill_timeout_s)
            if stuck:
                raise FaultError(f"{host}: processes {stuck} survived SIGKILL")
            self.lab.kill(host)  # anything the lab records that was not in the namespace
            # A child forked between the listing and the freeze.
            kill_pids(netns_pids(self.lab.runner, plan.host(host).netns), self.lab.kill_timeout_s)
        for host in self.hosts:
            self.disks.disks[host].release()

    def _power_on(self, host: str) -> None:
        if self.disks is not None and host in self.disks:
            try:
                self.disks.power_on(host)
            except DiskError as exc:
                raise FaultError(f"{host}'s disk did not come back: {exc}") from exc

    def _pause(self, host: str) -> None:
        state, _ = self.lab.load()
        record = state.processes.get(host)
        if record is None or not process_alive(record):
            raise FaultError(f"{host} has no running agent to pause")
        # The agent only (not its process group): its children, e.g. wireguard-go, go on,
        # like a process stuck in a long pause on a host that is otherwise fine.
        os.kill(record.pid, signal.SIGSTOP)
        self.paused[host] = record.pid

    def _resume(self, host: str) -> None:
        pid = self.paused.pop(host)
        state, _ = self.lab.load()
        record = state.processes.get(host)
        # Only the pid recorded and still ours (start time checked): never a recycled one.
        if record is not None and record.pid == pid and process_alive(record):
            os.kill(pid, signal.SIGCONT)
        else:
            log.warning("%s's paused agent (pid %d) is gone; not signalled", host, pid)
