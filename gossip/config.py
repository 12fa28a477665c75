"""Configuration of a gossip node, with memberlist-style presets and validation.

Every member of one cluster must use the same preset (the same wire limits and
comparable timers); durations are in seconds.

The LAN preset differs from memberlist's ``DefaultLANConfig`` on purpose: it
probes every 0.5 s (memberlist: 1 s) with a 0.2 s probe timeout and derives the
suspicion timeout with a smaller multiplier, so that a crashed member of a
1,000-member cluster is declared dead everywhere within about 5 s (memberlist
LAN needs 12 s or more at that size). The Lifeguard confirmation count is its
own field instead of ``suspicion_mult - 2``, so the fast minimum timeout is only
reached after independent confirmations, which is what keeps a single lost probe
from killing a healthy member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from gossip.errors import ConfigError

#: Largest UDP payload over IPv4; no datagram may be bigger.
MAX_UDP_PAYLOAD = 65_507


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Timers, fan-outs and limits of one ``Node``. Use ``lan()``, ``wan()`` or ``local()``."""

    # Time between two failure-detector probes (one member per round, round-robin
    # over a shuffled member list). Scaled by the local-health multiplier.
    probe_interval_s: float = 0.5
    # How long to wait for the direct ack before asking ``indirect_checks``
    # members to probe on our behalf. Scaled by the local-health multiplier.
    probe_timeout_s: float = 0.2
    # Members asked to probe indirectly (ping-req) when the direct ack is late.
    indirect_checks: int = 3
    # Time between two dissemination rounds. A round only sends when there is
    # something queued, so an idle cluster costs nothing here.
    gossip_interval_s: float = 0.2
    # Fan-out: members sent a gossip packet each round.
    gossip_nodes: int = 3
    # An update is transmitted at most retransmit_mult * ceil(log10(N + 1))
    # times by each member (piggybacked or in gossip packets).
    retransmit_mult: int = 4
    # Minimum suspicion timeout = suspicion_mult * max(1, log10(N)) * probe_interval_s.
    suspicion_mult: float = 1.5
    # Maximum suspicion timeout = suspicion_max_timeout_mult * minimum. A fresh
    # suspicion starts at the maximum and shrinks towards the minimum as
    # independent confirmations arrive (Lifeguard).
    suspicion_max_timeout_mult: float = 6.0
    # Independent confirmations (other members suspecting the same incarnation)
    # needed to bring the suspicion timeout down to its minimum.
    suspicion_confirmations: int = 2
    # Anti-entropy: a full state exchange with one random member this often,
    # scaled up for large clusters (above push_pull_scale_threshold members).
    push_pull_interval_s: float = 30.0
    # Cluster size up to which the push-pull interval is not scaled.
    push_pull_scale_threshold: int = 32
    # A push-pull with one random dead (not left) member this often, so that
    # two sides of a healed partition find each other again (Serf's reconnect).
    reconnect_interval_s: float = 10.0
    # Join requests to the seeds are repeated this often while no member is known.
    join_retry_s: float = 1.0
    # How long a dead member is remembered (and reconnect is tried) before it
    # is forgotten; a left member is forgotten after left_reap_s.
    dead_reap_s: float = 3600.0
    left_reap_s: float = 30.0
    # Largest datagram sent or accepted. Piggybacked updates fill packets up to it.
    # 1150 leaves room for the adapter's authentication (~250 bytes) and IP/UDP headers
    # within a 1500-byte MTU, so datagrams are never fragmented.
    max_packet_bytes: int = 1150
    # Largest member metadata (opaque, set at start; e.g. the advertised address).
    max_meta_bytes: int = 256
    # Largest summary value (a member's own opaque data item).
    max_summary_bytes: int = 512
    # Updates kept in the transmit queue at most; the most transmitted go first.
    max_queued_broadcasts: int = 4096
    # Lifeguard local health: probe timeouts and intervals are multiplied by
    # up to this factor while our own probes keep failing.
    awareness_max_multiplier: int = 8
    # NAT: a member flagged NATed can only be reached by members it sent to
    # recently. Others address it directly only if they heard from it within
    # this window (keep it under the NAT's UDP mapping timeout, often 30 s).
    nat_contact_window_s: float = 15.0
    # NAT: a NATed member sends to every relay at least this often, keeping
    # its mapping towards the relay open (it probes the relay that round).
    nat_keepalive_s: float = 4.0
    # A relay (the hub) also gossips each round to this many NATed members, in
    # turn, because NATed members cannot gossip among themselves.
    relay_gossip_nodes: int = 8

    @classmethod
    def lan(cls, **overrides: Any) -> GossipConfig:
        """Members on one network with sub-millisecond to few-millisecond latency."""
        return replace(cls(), **overrides)

    @classmethod
    def wan(cls, **overrides: Any) -> GossipConfig:
        """Members across the Internet (memberlist's DefaultWANConfig timings)."""
        base = cls(
            probe_interval_s=5.0,
            probe_timeout_s=3.0,
            gossip_interval_s=0.5,
            gossip_nodes=4,
            suspicion_mult=6.0,
            suspicion_confirmations=4,
            push_pull_interval_s=60.0,
            reconnect_interval_s=30.0,
            join_retry_s=5.0,
            nat_contact_window_s=20.0,
            nat_keepalive_s=5.0,
        )
        return replace(base, **overrides)

    @classmethod
    def local(cls, **overrides: Any) -> GossipConfig:
        """Loopback and tests: memberlist's DefaultLocalConfig, a little faster still."""
        base = cls(
            probe_interval_s=0.2,
            probe_timeout_s=0.1,
            gossip_interval_s=0.1,
            suspicion_mult=2.0,
            suspicion_max_timeout_mult=4.0,
            push_pull_interval_s=10.0,
            reconnect_interval_s=2.0,
            join_retry_s=0.5,
            left_reap_s=10.0,
            nat_contact_window_s=10.0,
            nat_keepalive_s=2.0,
        )
        return replace(base, **overrides)

    def problems(self) -> list[str]:
        """Every invalid field, one message each (empty when valid)."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                out.append(f"{f.name}: must be a number, got {value!r}")
            elif not math.isfinite(value):
                out.append(f"{f.name}: must be finite")
            elif f.name.endswith("_s") and value <= 0:
                out.append(f"{f.name}: must be positive")
        if out:
            return out
        if self.probe_timeout_s >= self.probe_interval_s:
            out.append("probe_timeout_s: must be shorter than probe_interval_s")
        for name in (
            "indirect_checks",
            "gossip_nodes",
            "retransmit_mult",
            "suspicion_confirmations",
            "push_pull_scale_threshold",
            "awareness_max_multiplier",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                out.append(f"{name}: must be an integer >= 1")
        if not isinstance(self.relay_gossip_nodes, int) or self.relay_gossip_nodes < 0:
            out.append("relay_gossip_nodes: must be an integer >= 0")
        if self.suspicion_mult < 0.5:
            out.append("suspicion_mult: must be >= 0.5")
        if self.suspicion_max_timeout_mult < 1:
            out.append("suspicion_max_timeout_mult: must be >= 1")
        if not 576 <= self.max_packet_bytes <= MAX_UDP_PAYLOAD:
            out.append(f"max_packet_bytes: must be between 576 and {MAX_UDP_PAYLOAD}")
        if not 0 <= self.max_meta_bytes <= 1024:
            out.append("max_meta_bytes: must be between 0 and 1024")
        if self.max_summary_bytes < 0:
            out.append("max_summary_bytes: must be >= 0")
        # A push-pull entry (id <= 255 bytes, meta, summary, 19-byte header) and
        # a summary update must each fit in one packet with the packet headers.
        largest_entry = 64 + 255 + self.max_meta_bytes + self.max_summary_bytes
        if largest_entry > self.max_packet_bytes:
            out.append(
                "max_summary_bytes: with max_meta_bytes and a 255-byte member id it must fit"
                f" in max_packet_bytes ({largest_entry} > {self.max_packet_bytes})"
            )
        if self.max_queued_broadcasts < 16:
            out.append("max_queued_broadcasts: must be >= 16")
        if self.nat_keepalive_s >= self.nat_contact_window_s:
            out.append("nat_keepalive_s: must be shorter than nat_contact_window_s")
        if self.left_reap_s > self.dead_reap_s:
            out.append("left_reap_s: must not exceed dead_reap_s")
        return out

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every problem, if there is any."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # Derived values -------------------------------------------------------

    def retransmit_limit(self, n: int) -> int:
        """Transmissions of one update per member, for a cluster of ``n`` members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        """(minimum, maximum) suspicion timeout for a cluster of ``n`` members."""
        low = self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval_s
        return low, low * self.suspicion_max_timeout_mult

    def push_pull_period(self, n: int) -> float:
        """memberlist's pushPullScale: one more interval per doubling above the threshold."""
        if n <= self.push_pull_scale_threshold:
            return self.push_pull_interval_s
        mult = math.ceil(math.log2(n) - math.log2(self.push_pull_scale_threshold)) + 1
        return self.push_pull_interval_s * mult
