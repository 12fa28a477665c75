"""A deterministic network simulator driving many ``Node`` cores in one process.

One event queue orders datagram deliveries and node wake-ups on a manual
clock; one seeded ``random.Random`` decides drops and delays (each node gets
its own generator seeded from it), so a run is a pure function of its seed.

The network model: every datagram is dropped with probability ``drop``
(``link_drop`` overrides it per ordered pair), otherwise delivered after a
uniform delay in ``[delay_min_s, delay_max_s]``. A partition assigns members
to groups; datagrams between groups are dropped until ``heal``. A crashed
member sends nothing and everything addressed to it is lost; ``restart``
brings up a fresh node (new state, incarnation 0) under the same id. NAT: a
NATed member receives a datagram from X only if it sent a datagram to X within
``nat_mapping_timeout_s`` before the arrival (an endpoint-dependent mapping
that any outgoing datagram opens or refreshes, delivered or not).

Measurements are taken from the nodes' events: when each member first had a
given summary version, when each member declared a crashed one dead, every
death declared of a member that was actually running (a false positive), and
bytes sent per member.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gossip.config import GossipConfig
from gossip.core import (
    Event,
    EventKind,
    MemberState,
    MemberView,
    Node,
    SummarySigner,
    SummaryVerifier,
)
from gossip.messages import FLAG_NATTED, FLAG_RELAY

logger = logging.getLogger(__name__)

_DELIVER = 0
_WAKE = 1


@dataclass(frozen=True, slots=True)
class FalseDeath:
    """A running member declared dead (or suspected, in ``false_suspicions``)."""

    at: float
    observer: str
    member: str


@dataclass(slots=True)
class _Watch:
    version: int
    published_at: float
    got: dict[int, float] = field(default_factory=dict)  # member index -> time


class Simulator:
    """Many nodes, one clock. Member ids index everything; see the module docstring."""

    def __init__(
        self,
        config: GossipConfig,
        *,
        seed: int = 0,
        drop: float = 0.0,
        delay_min_s: float = 0.001,
        delay_max_s: float = 0.005,
        nat_mapping_timeout_s: float = 30.0,
        start: float = 0.0,
        summary_verifier: SummaryVerifier | None = None,
        summary_signer_of: Callable[[str], SummarySigner] | None = None,
    ) -> None:
        config.validate()
        if not 0 <= drop < 1 or not 0 <= delay_min_s <= delay_max_s:
            raise ValueError("drop must be in [0, 1) and 0 <= delay_min_s <= delay_max_s")
        self.config = config
        self.now = start
        self.drop = drop
        self.delay_min_s = delay_min_s
        self.delay_max_s = delay_max_s
        self.nat_mapping_timeout_s = nat_mapping_timeout_s
        self.summary_verifier = summary_verifier
        self.summary_signer_of = summary_signer_of  # member id -> its summary signer
        self.link_drop: dict[tuple[str, str], float] = {}
        self._rng = random.Random(seed)
        self._rand = self._rng.random
        self._heap: list[tuple[float, int, int, int, int, bytes]] = []
        self._seq = 0
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._nodes: list[Node | None] = []
        self._gen: list[int] = []
        self._wake_at: list[float] = []
        self._group: list[int] = []
        self._natted: list[bool] = []
        self._relay: list[bool] = []
        self._meta: list[bytes] = []
        self._nat_out: list[dict[int, float] | None] = []  # NATed: dest index -> last send
        self.bytes_sent: list[int] = []
        self.packets_sent = 0
        self.packets_delivered = 0
        self.nat_dropped = 0  # datagrams a NAT refused (no recent outgoing datagram)
        self._watches: dict[str, list[_Watch]] = {}
        self.crashed_at: dict[str, float] = {}
        self.dead_seen: dict[str, dict[int, float]] = {}  # crashed member -> observer -> time
        self.false_deaths: list[FalseDeath] = []
        self.false_suspicions = 0
        self.events_seen = 0

    # -- membership of the simulation ---------------------------------------------

    def _new_slot(self, member_id: str, natted: bool, relay: bool, meta: bytes) -> int:
        i = len(self._ids)
        self._ids.append(member_id)
        self._index[member_id] = i
        self._nodes.append(None)
        self._gen.append(0)
        self._wake_at.append(float("inf"))
        self._group.append(0)
        self._natted.append(natted)
        self._relay.append(relay)
        self._meta.append(meta)
        self._nat_out.append({} if natted else None)
        self.bytes_sent.append(0)
        return i

    def _make_node(self, i: int) -> Node:
        node = Node(
            self._ids[i],
            self.config,
            random.Random(self._rng.getrandbits(64)),
            self.now,
            meta=self._meta[i],
            natted=self._natted[i],
            relay=self._relay[i],
            summary_verifier=self.summary_verifier,
            summary_signer=None
            if self.summary_signer_of is None
            else self.summary_signer_of(self._ids[i]),
        )
        self._nodes[i] = node
        self._gen[i] += 1
        return node

    def add(
        self,
        member_id: str,
        *,
        seeds: Sequence[str] = (),
        natted: bool = False,
        relay: bool = False,
        meta: bytes = b"",
    ) -> Node:
        """Start a member that joins through ``seeds`` (none: it is the first)."""
        if member_id in self._index:
            raise ValueError(f"member {member_id!r} exists")
        i = self._new_slot(member_id, natted, relay, meta)
        node = self._make_node(i)
        if seeds:
            node.join(seeds)
        self._after(i)
        return node

    def bootstrap(
        self,
        n: int,
        *,
        prefix: str = "m",
        natted: Iterable[int] = (),
        relays: Iterable[int] = (),
    ) -> list[str]:
        """Start ``n`` members that already know each other (a converged cluster).

        ``natted`` and ``relays`` are indexes into the new members. The member
        views are shared between nodes, which keeps 5,000 members in memory.
        """
        natted_set, relay_set = set(natted), set(relays)
        ids = [f"{prefix}{k:05d}" for k in range(n)]
        views = []
        for k, mid in enumerate(ids):
            flags = (FLAG_NATTED if k in natted_set else 0) | (FLAG_RELAY if k in relay_set else 0)
            views.append(MemberView(mid, MemberState.ALIVE, 0, flags, b"", 0, None, self.now))
        slots = [
            self._new_slot(mid, k in natted_set, k in relay_set, b"") for k, mid in enumerate(ids)
        ]
        for i in slots:
            self._make_node(i).bootstrap(views)
        for i in slots:
            self._after(i)
        return ids

    def node(self, member_id: str) -> Node:
        node = self._nodes[self._index[member_id]]
        if node is None:
            raise KeyError(f"member {member_id!r} is crashed")
        return node

    def ids(self) -> list[str]:
        return list(self._ids)

    def live_ids(self) -> list[str]:
        return [m for m, n in zip(self._ids, self._nodes, strict=True) if n is not None]

    def crash(self, member_id: str) -> None:
        """Stop a member abruptly: it sends nothing more, datagrams to it are lost."""
        i = self._index[member_id]
        self._nodes[i] = None
        self._wake_at[i] = float("inf")
        self.crashed_at[member_id] = self.now
        self.dead_seen[member_id] = {}

    def restart(self, member_id: str, seeds: Sequence[str]) -> Node:
        """Bring a crashed member back as a fresh node that joins through ``seeds``."""
        i = self._index[member_id]
        if self._nodes[i] is not None:
            raise ValueError(f"member {member_id!r} is running")
        self.crashed_at.pop(member_id, None)
        node = self._make_node(i)
        node.join(seeds)
        self._after(i)
        return node

    def inject(self, src: str, dest: str, data: bytes) -> None:
        """Deliver ``data`` to ``dest`` as a datagram authenticated as ``src``'s (a member
        misbehaving: anything its certificate lets it send), after the minimum delay.
        Partitions and losses do not apply; a crashed ``dest`` gets nothing."""
        i, j = self._index[src], self._index[dest]
        if self._nodes[j] is None:
            return
        self._seq += 1
        at = self.now + self.delay_min_s
        heapq.heappush(self._heap, (at, self._seq, _DELIVER, j, (self._gen[j] << 32) | i, data))

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: members in different groups cannot talk (others: group 0)."""
        for i in range(len(self._group)):
            self._group[i] = 0
        for g, members in enumerate(groups, start=1):
            for mid in members:
                self._group[self._index[mid]] = g

    def heal(self) -> None:
        for i in range(len(self._group)):
            self._group[i] = 0

    # -- running --------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        """Process every event up to and including time ``t``; the clock ends at ``t``."""
        heap = self._heap
        nodes = self._nodes
        pop = heapq.heappop
        while heap and heap[0][0] <= t:
            at, _, kind, i, src, data = pop(heap)
            self.now = at
            node = nodes[i]
            if node is None:
                continue
            if kind == _WAKE:
                if at != self._wake_at[i]:
                    continue  # superseded
                self._wake_at[i] = float("inf")
                node.tick(at)
            else:
                if src >> 32 != self._gen[i]:
                    continue  # addressed to a previous life of this member
                src &= 0xFFFFFFFF
                nat = self._nat_out[i]
                if nat is not None:
                    opened = nat.get(src)
                    if opened is None or at - opened > self.nat_mapping_timeout_s:
                        self.nat_dropped += 1
                        continue
                self.packets_delivered += 1
                node.receive(at, self._ids[src], data)
            self._after(i)
        self.now = t

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def _after(self, i: int) -> None:
        """Collect what node ``i`` wants sent and reported; schedule its next wake-up."""
        node = self._nodes[i]
        if node is None:
            return
        out = node.outbox()
        now = self.now
        if out:
            index = self._index
            group = self._group
            nodes = self._nodes
            rand = self._rand
            nat = self._nat_out[i]
            drop = self.drop
            span = self.delay_max_s - self.delay_min_s
            dmin = self.delay_min_s
            link_drop = self.link_drop
            sent = 0
            for dest, data in out:
                sent += len(data)
                j = index.get(dest)
                if j is None:
                    continue
                if nat is not None:
                    nat[j] = now
                if nodes[j] is None or group[i] != group[j]:
                    continue
                p = link_drop.get((self._ids[i], dest), drop) if link_drop else drop
                if p and rand() < p:
                    continue
                self._seq += 1
                heapq.heappush(
                    self._heap,
                    (
                        now + dmin + rand() * span,
                        self._seq,
                        _DELIVER,
                        j,
                        (self._gen[j] << 32) | i,
                        data,
                    ),
                )
            self.bytes_sent[i] += sent
            self.packets_sent += len(out)
        events = node.events()
        if events:
            self._observe(i, events)
        d = node.next_deadline()
        if d < self._wake_at[i]:
            if d <= now:
                d = now + 1e-9
            self._wake_at[i] = d
            self._seq += 1
            heapq.heappush(self._heap, (d, self._seq, _WAKE, i, 0, b""))

    def _observe(self, i: int, events: list[Event]) -> None:
        self.events_seen += len(events)
        for ev in events:
            kind = ev.kind
            mid = ev.member_id
            if kind is EventKind.SUMMARY:
                watches = self._watches.get(mid)
                if watches:
                    for w in watches:
                        if ev.version >= w.version and i not in w.got:
                            w.got[i] = ev.at
            elif kind is EventKind.DEAD:
                seen = self.dead_seen.get(mid)
                if seen is not None and mid in self.crashed_at:
                    seen.setdefault(i, ev.at)
                elif self._nodes[self._index[mid]] is not None:
                    self.false_deaths.append(FalseDeath(ev.at, self._ids[i], mid))
            elif kind is EventKind.SUSPECT:
                j = self._index.get(mid)
                if j is not None and self._nodes[j] is not None:
                    self.false_suspicions += 1

    # -- measurements ------------------------------------------------------------------

    def publish(self, member_id: str, value: bytes) -> int:
        """Publish a summary on ``member_id`` and track its spread; returns the version."""
        i = self._index[member_id]
        node = self.node(member_id)
        version = node.publish(value)
        self._watches.setdefault(member_id, []).append(_Watch(version, self.now, {i: self.now}))
        self._after(i)
        return version

    def _watch(self, member_id: str, version: int) -> _Watch:
        for w in self._watches.get(member_id, []):
            if w.version == version:
                return w
        raise KeyError(f"summary {member_id}@{version} is not tracked (use Simulator.publish)")

    def summary_coverage(self, member_id: str, version: int) -> float:
        """Fraction of running members that have ``member_id``'s summary at ``version`` or later."""
        w = self._watch(member_id, version)
        live = [i for i, n in enumerate(self._nodes) if n is not None]
        return sum(1 for i in live if i in w.got) / len(live)

    def time_to_coverage(self, member_id: str, version: int, fraction: float) -> float | None:
        """Seconds from publication until ``fraction`` of running members had it (None: not yet)."""
        w = self._watch(member_id, version)
        live = [i for i, n in enumerate(self._nodes) if n is not None]
        times = sorted(w.got[i] for i in live if i in w.got)
        need = _needed(fraction, len(live))
        if len(times) < need:
            return None
        return times[need - 1] - w.published_at

    def coverage_curve(self, member_id: str, version: int) -> list[tuple[float, float]]:
        """(seconds after publication, fraction of running members) at each arrival."""
        w = self._watch(member_id, version)
        live = [i for i, n in enumerate(self._nodes) if n is not None]
        times = sorted(w.got[i] for i in live if i in w.got)
        return [(t - w.published_at, (k + 1) / len(live)) for k, t in enumerate(times)]

    def time_to_detect(self, member_id: str, fraction: float = 1.0) -> float | None:
        """Seconds from the crash of ``member_id`` until ``fraction`` of running members
        had declared it dead (None: not yet)."""
        crashed = self.crashed_at[member_id]
        seen = self.dead_seen[member_id]
        live = [i for i, n in enumerate(self._nodes) if n is not None]
        times = sorted(seen[i] for i in live if i in seen)
        need = _needed(fraction, len(live))
        if len(times) < need:
            return None
        return times[need - 1] - crashed

    def run_until_covered(
        self, member_id: str, version: int, fraction: float, timeout_s: float, step_s: float = 0.1
    ) -> float | None:
        """Run until the summary reached ``fraction`` or ``timeout_s`` passed; the time taken."""
        w = self._watch(member_id, version)
        end = w.published_at + timeout_s
        while self.now < end:
            self.run_until(min(end, self.now + step_s))
            t = self.time_to_coverage(member_id, version, fraction)
            if t is not None:
                return t
        return self.time_to_coverage(member_id, version, fraction)

    def run_until_detected(
        self, member_id: str, fraction: float, timeout_s: float, step_s: float = 0.1
    ) -> float | None:
        """Run until ``fraction`` of running members declared ``member_id`` dead."""
        end = self.crashed_at[member_id] + timeout_s
        while self.now < end:
            self.run_until(min(end, self.now + step_s))
            t = self.time_to_detect(member_id, fraction)
            if t is not None:
                return t
        return self.time_to_detect(member_id, fraction)

    def views_agree(self, member_id: str, state: MemberState) -> bool:
        """Does every running member see ``member_id`` in ``state``?"""
        for n in self._nodes:
            if n is None or n.id == member_id:
                continue
            v = n.member(member_id)
            if v is None or v.state != state:
                return False
        return True

    def state_counts(self, member_id: str) -> dict[str, int]:
        """How many running members see ``member_id`` in each state (or "unknown")."""
        out: dict[str, int] = {}
        for n in self._nodes:
            if n is None or n.id == member_id:
                continue
            v = n.member(member_id)
            key = "unknown" if v is None else v.state.name.lower()
            out[key] = out.get(key, 0) + 1
        return out

    def bytes_snapshot(self) -> list[int]:
        return list(self.bytes_sent)


def _needed(fraction: float, live: int) -> int:
    """Members that make up ``fraction`` of ``live`` (99.99% of 1,000 is all 1,000)."""
    return max(1, min(live, math.ceil(fraction * live - 1e-9)))
