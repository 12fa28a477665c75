"""The sans-I/O SWIM node: failure detection, membership and summary dissemination.

A ``Node`` never touches a socket, a clock or a global random generator. The
caller (the UDP adapter, the simulator, a test) feeds it datagrams and the
current time and collects what it wants sent::

    node = Node("site-17", GossipConfig.wan(), random.Random(), now=clock())
    node.join(["hub"])
    loop:
        node.receive(now, sender_id, payload)   # for every authenticated datagram
        node.tick(now)                          # when now >= node.next_deadline()
        for dest, data in node.outbox(): send(dest, data)
        for event in node.events(): handle(event)

Ordering rules: after any call that takes ``now`` (``receive``, ``tick``) or
changes local state (``join``, ``publish``, ``leave``), drain ``outbox()`` and
``events()``, then sleep until ``next_deadline()`` (it can move earlier after a
``receive``). ``now`` must never go backwards. Calling ``tick`` early or often
is harmless.

Protocol (SWIM with memberlist's and Lifeguard's refinements):

* Failure detection: one probe per ``probe_interval_s`` round, targets taken
  round-robin from a shuffled member list (new members inserted at random
  places, the list reshuffled at each wrap). A direct ``Ping``; after
  ``probe_timeout_s`` without an ``Ack``, ``indirect_checks`` members get a
  ``PingReq`` and a second direct ping goes out; at the end of the round, no ack
  means ``Suspect``. Relays answer a ``PingReq`` with the target's ack or with a
  ``Nack``. Lifeguard local health: probes that fail without the expected nacks,
  and refuting a suspicion of ourselves, raise a score that stretches our own
  probe timeouts and rounds (up to ``awareness_max_multiplier``).
* Suspicion: a suspected member is declared dead when its suspicion timer
  expires. The timer starts at the maximum and shrinks logarithmically towards
  the minimum as independent confirmations (suspicions of the same incarnation
  from other members) arrive. Pings to a suspected member carry the suspicion
  (buddy system), and the first suspecter tells the member directly.
* Incarnations: only a member raises its own incarnation, to refute a suspicion
  or a death it hears of; alive beats suspect/dead only with a higher
  incarnation, suspect/dead need at least the current one. Replayed old
  messages therefore never undo newer state.
* Dissemination: updates (alive, suspect, dead, summaries) are piggybacked on
  every packet and sent in gossip rounds to ``gossip_nodes`` random members,
  each at most ``retransmit_mult * ceil(log10(N + 1))`` times, freshest first.
* Anti-entropy: a full state push-pull with one random member every
  ``push_pull_interval_s`` (scaled with cluster size), split into datagrams; with
  a random dead member every ``reconnect_interval_s`` so healed partitions
  merge. A dead entry learnt this way only becomes a suspicion (memberlist).
* Summaries: each member owns one data item (``publish``), versioned by a
  counter. Like incarnations, only the owner advances it: hearing a newer
  version of its own summary (a previous life's, or a forgery) makes it
  republish its current value above it.
* Summary verification: the embedding may pass a ``summary_verifier`` (it knows
  how values are signed by their origin; the core does not). A summary it
  refuses is dropped (``stats.forged_dropped``): never stored, relayed or
  outbid, so a member cannot displace another's summary with a forgery.
  Without one, every summary is taken as genuine (the simulator's default).
* Wire limits: incarnations are u32 and summary versions u64. A suspect or
  dead at ``MAX_INCARNATION`` (which its member could not refute), news of
  ourselves that would take a refutation or a republication beyond the limit,
  and the like are dropped (``stats.out_of_range_dropped``); nothing a peer
  sends makes the node raise or emit a message it cannot encode.
* NAT: a member flagged NATed is only addressed directly by members that heard
  from it within ``nat_contact_window_s`` (its mapping towards them is open);
  others probe it through the relays (members flagged relay, the hub) with
  ping-reqs, which the relays forward. A NATed member sends to every relay at
  least every ``nat_keepalive_s`` (by probing it) and gossips and push-pulls
  only with members it can reach. Relays also gossip to NATed members in turn.

Its size: the whole SWIM state machine (probes, suspicion, dissemination, push-pull,
summaries, NAT relays) is one pure object; its parts share the member table and the
broadcast queue, and it is tested as one through the simulator.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import NamedTuple

from gossip.config import GossipConfig
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.messages import (
    COMPOUND_ITEM_OVERHEAD,
    COMPOUND_OVERHEAD,
    FLAG_NATTED,
    FLAG_RELAY,
    MAX_INCARNATION,
    MAX_SUMMARY_VERSION,
    PUSH_PULL_HEADER,
    Ack,
    Alive,
    Dead,
    Message,
    MsgType,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Summary,
    Suspect,
    Sync,
    check_member_id,
    decode_message,
    encode_message,
    entry_bytes,
    pack,
    push_pull_body,
    split_packet,
)
from gossip.queue import TransmitQueue

logger = logging.getLogger(__name__)

_INF = math.inf
_SEQ_MASK = 0xFFFFFFFF
_SEEN_MAX = 1024  # remembered update bodies (duplicates are skipped undecoded)
# Only these are skipped when seen before: a stale suspect or dead must still be
# decoded, to correct its sender (see _correct).
_DEDUP_TYPES = frozenset((MsgType.ALIVE, MsgType.SUMMARY))
_CORRECTED_MAX = 4096
_MEMBERSHIP = 0  # transmit-queue key kinds
_SUMMARY = 1

#: ``verifier(summary, sender) -> bool``: may ``summary`` (about ``summary.member``,
#: passed on by the authenticated member ``sender``) be stored and relayed? Called
#: only for a summary that would change something (newer than the one stored, or
#: about this node and newer or different), before anything is stored; it should
#: check the value's origin signature. It must be pure and quick (no I/O); an
#: exception counts as a refusal.
SummaryVerifier = Callable[[Summary, str], bool]

#: ``signer(version, body) -> value``: the value disseminated for this node's summary
#: ``body`` at ``version`` (e.g. the body and a signature over version and body, so a
#: relay cannot attach a genuine body to a forged version). Called on every publish,
#: including the republish that outbids a summary of this member from a previous run.
SummarySigner = Callable[[int, bytes], bytes]

# Timer kinds in the heap.
_T_SUSPICION = 0
_T_NACK = 1
_T_REAP = 2


class MemberState(IntEnum):
    """A member's state as this node sees it (same values as the wire's)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


_ALIVE = MemberState.ALIVE
_SUSPECT = MemberState.SUSPECT
_DEAD = MemberState.DEAD
_LEFT = MemberState.LEFT


class MemberView(NamedTuple):
    """One member as this node knows it. Immutable: a change makes a new view."""

    member_id: str
    state: MemberState
    incarnation: int
    flags: int
    meta: bytes
    summary_version: int
    summary: bytes | None
    state_changed_at: float

    @property
    def natted(self) -> bool:
        return bool(self.flags & FLAG_NATTED)

    @property
    def relay(self) -> bool:
        return bool(self.flags & FLAG_RELAY)


class EventKind(Enum):
    UP = "member_up"  # first heard of (or again after being forgotten)
    ALIVE = "member_alive"  # back to alive from suspect, dead or left
    SUSPECT = "member_suspect"
    DEAD = "member_dead"
    LEFT = "member_left"
    UPDATE = "member_update"  # new metadata or flags
    SUMMARY = "summary_changed"


class Event(NamedTuple):
    """A change seen by this node; ``version``/``value`` are set for SUMMARY."""

    kind: EventKind
    member_id: str
    incarnation: int
    at: float
    version: int = 0
    value: bytes | None = None


@dataclass(slots=True)
class Stats:
    """Counters of one node (monotonic)."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    malformed_dropped: int = 0  # undecodable or over a limit (RemoteProtocolError)
    oversized_dropped: int = 0  # longer than max_packet_bytes (not decoded)
    duplicates_skipped: int = 0  # updates received again byte for byte (not decoded)
    stale_ignored: int = 0  # older incarnation or summary version than known
    forged_dropped: int = 0  # summaries the summary verifier refused
    out_of_range_dropped: int = 0  # incarnation/version at the wire's limit (unrefutable)
    unknown_ignored: int = 0  # about a member we do not know
    misdirected: int = 0  # ping for another member id
    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0  # ping-reqs sent
    relayed_pings: int = 0  # pings sent on behalf of others
    suspicions: int = 0  # suspicions started here or learnt
    refutations: int = 0
    corrections: int = 0  # newer alive sent to a member that passed on stale news
    deaths_declared: int = 0  # suspicion timers that expired here
    syncs: int = 0  # digest comparisons started (anti-entropy)
    push_pulls: int = 0  # full state exchanges started
    gossip_packets: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Probe:
    __slots__ = ("acked", "expected_nacks", "incarnation", "indirect", "nacks", "seq", "target")

    def __init__(self, target: str, seq: int, incarnation: int) -> None:
        self.target = target
        self.seq = seq
        self.incarnation = incarnation
        self.acked = False
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0


class _Suspicion:
    __slots__ = ("confirmers", "deadline", "high", "incarnation", "k", "low", "start")

    def __init__(
        self, incarnation: int, start: float, origin: str, k: int, low: float, high: float
    ) -> None:
        self.incarnation = incarnation
        self.start = start
        self.confirmers: dict[str, None] = {origin: None}
        self.k = k
        self.low = low
        self.high = high
        self.deadline = start + (low if k == 0 else high)

    def confirm(self, origin: str) -> bool:
        """Count an independent suspicion; True when it was new."""
        if origin in self.confirmers:
            return False
        self.confirmers[origin] = None
        if self.k:
            c = min(len(self.confirmers) - 1, self.k)
            frac = math.log(c + 1) / math.log(self.k + 1)
            timeout = max(self.low, self.high - (self.high - self.low) * frac)
            self.deadline = self.start + timeout
        return True


class Node:
    """One gossip member. See the module docstring for the calling contract.

    ``self_id`` is the member id (1..255 bytes of UTF-8) the transport uses as
    ``sender_id``/destination; ``meta`` is opaque (the adapter's advertised
    address, say), at most ``config.max_meta_bytes``. ``natted`` marks a member
    others cannot reach unless it sent to them; ``relay`` a reachable member
    (the hub) that forwards probes to NATed members. ``incarnation`` may be
    restored from a previous run (else a restarted member refutes its old
    death, which works too). ``summary_verifier`` (see ``SummaryVerifier``)
    checks other members' summaries before they are stored or relayed.
    """

    def __init__(
        self,
        self_id: str,
        config: GossipConfig,
        rng: random.Random,
        now: float,
        *,
        meta: bytes = b"",
        natted: bool = False,
        relay: bool = False,
        incarnation: int = 0,
        summary_verifier: SummaryVerifier | None = None,
        summary_signer: SummarySigner | None = None,
    ) -> None:
        config.validate()
        try:
            check_member_id(self_id)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(meta) > config.max_meta_bytes:
            raise LocalProtocolError(f"meta is {len(meta)} bytes, limit {config.max_meta_bytes}")
        if natted and relay:
            raise LocalProtocolError("a relay must be reachable: it cannot be NATed")
        if not 0 <= incarnation <= MAX_INCARNATION:
            raise LocalProtocolError(f"incarnation out of range: {incarnation}")
        self.id = self_id
        self.config = config
        self.stats = Stats()
        self._rng = rng
        self._random = rng.random
        self._verify_summary = summary_verifier
        self._sign_summary = summary_signer
        self._now = now
        self._flags = (FLAG_NATTED if natted else 0) | (FLAG_RELAY if relay else 0)
        self._natted = natted
        self._is_relay = relay
        me = MemberView(self_id, _ALIVE, incarnation, self._flags, meta, 0, None, now)
        self._members: dict[str, MemberView] = {self_id: me}
        self._roster: list[str] = []  # other members, in probe order
        self._probe_pos = 0
        self._open: list[str] = []  # active reachable (non-NATed) others; lazily pruned
        self._n_open = 0
        self._relays: list[str] = []  # active relays (others)
        self._n_active = 1  # alive or suspect, self included
        self._n_natted = 0  # active NATed others
        self._natted_turn: list[str] = []  # relay: NATed members still to gossip to
        # Dead (not left) others, for reconnect; a dict keeps the order deterministic.
        self._dead: dict[str, None] = {}
        self._heard: dict[str, float] = {}  # NATed member -> last datagram from it
        self._sent: dict[str, float] = {}  # NATed self: relay -> last datagram to it
        self._suspicions: dict[str, _Suspicion] = {}
        self._timers: list[tuple[float, int, int, str | int]] = []
        self._timer_seq = 0
        self._queue = TransmitQueue(config.max_queued_broadcasts)
        self._out: list[tuple[str, bytes]] = []
        self._events: list[Event] = []
        self._seq = rng.getrandbits(32)
        self._probe: _Probe | None = None
        self._probe_timeout_at = _INF
        self._relayed: dict[int, tuple[str, int]] = {}
        self._awareness = 0
        self._summary: bytes | None = None
        self._left = False
        self._seeds: list[str] = []
        self._dirty = True
        self._digest_value = 0
        self._seen: dict[bytes, None] = {}
        self._corrected: dict[tuple[str, str], float] = {}
        # Timers start at random phases so members do not beat in step.
        self._next_probe = now + self._random() * config.probe_interval_s
        self._next_gossip = now + self._random() * config.gossip_interval_s
        self._next_push_pull = now + self._random() * config.push_pull_interval_s
        self._next_reconnect = now + self._random() * config.reconnect_interval_s
        self._next_join = _INF

    # -- public API -------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._members[self.id].incarnation

    @property
    def left(self) -> bool:
        return self._left

    @property
    def awareness(self) -> int:
        """Lifeguard local-health score; probe timers are multiplied by ``awareness + 1``."""
        return self._awareness

    def members(self) -> Mapping[str, MemberView]:
        """Every known member, self included (a read-only live view; copy to keep)."""
        return MappingProxyType(self._members)

    def member(self, member_id: str) -> MemberView | None:
        return self._members.get(member_id)

    def num_active(self) -> int:
        """Members alive or suspect, self included (the N of the protocol's formulas)."""
        return self._n_active

    def join(self, seed_ids: Iterable[str]) -> None:
        """Start a push-pull with each seed, and retry while no other member is known.

        Seed ids are whatever the adapter can address; they may be placeholders
        (``"seed:10.0.0.1:7946"``): the reply comes from the seed's real id.
        """
        self._seeds = [s for s in seed_ids if s != self.id]
        self._send_join()

    def bootstrap(self, views: Iterable[MemberView]) -> None:
        """Learn members without events or broadcasts (a warm start, e.g. a persisted list).

        Views are stored as given (they are immutable), so a simulator can share
        them between nodes. Entries about this node or already known are ignored.
        """
        fresh = len(self._members) == 1
        vs = [v for v in views if v.member_id not in self._members]
        if not vs:
            return
        if fresh and all(v.state <= _SUSPECT for v in vs):
            # Bulk path (a simulator warms up thousands of nodes this way).
            ids = [v.member_id for v in vs]
            self._members.update(zip(ids, vs, strict=True))
            self._dirty = True
            period = self.config.push_pull_period(self._n_active + len(vs))
            self._next_push_pull = self._now + self._random() * period
            # A random rotation instead of a shuffle (reshuffled at the first wrap).
            start = int(self._random() * len(ids))
            self._roster = ids[start:] + ids[:start]
            natted = sum(1 for v in vs if v.flags & FLAG_NATTED)
            self._n_active += len(vs)
            self._n_natted = natted
            self._n_open = len(vs) - natted
            self._open = (
                [v.member_id for v in vs if not v.flags & FLAG_NATTED] if natted else ids[:]
            )
            self._relays = [v.member_id for v in vs if v.flags & FLAG_RELAY]
            return
        for v in vs:
            self._install(None, v)
            n = len(self._roster)
            self._roster.insert(int(self._random() * (n + 1)), v.member_id)
            if v.state > _SUSPECT:
                keep = self.config.left_reap_s if v.state == _LEFT else self.config.dead_reap_s
                self._add_timer(self._now + keep, _T_REAP, v.member_id)

    def publish(self, value: bytes) -> int:
        """Set this member's summary; returns its new version (disseminated from now on).
        With a ``summary_signer``, ``value`` is the body it signs with the version."""
        if self._left:
            raise LocalProtocolError("the node has left the cluster")
        body = bytes(value)
        me = self._members[self.id]
        version = me.summary_version + 1
        if version > MAX_SUMMARY_VERSION:
            raise LocalProtocolError("summary versions are exhausted")
        if self._sign_summary is not None:
            value = self._sign_summary(version, body)
        if len(value) > self.config.max_summary_bytes:
            raise LocalProtocolError(
                f"summary is {len(value)} bytes, limit {self.config.max_summary_bytes}"
            )
        value = bytes(value)
        self._summary = body
        self._members[self.id] = me._replace(summary_version=version, summary=value)
        self._dirty = True
        self._broadcast((_SUMMARY, self.id), Summary(self.id, version, value))
        return version

    def leave(self) -> None:
        """Announce a graceful leave; keep ticking until ``pending_broadcasts()`` is 0."""
        if self._left:
            return
        me = self._members[self.id]
        self._left = True
        self._members[self.id] = me._replace(state=_LEFT, state_changed_at=self._now)
        self._dirty = True
        self._n_active -= 1
        self._probe = None
        self._probe_timeout_at = _INF
        self._broadcast((_MEMBERSHIP, self.id), Dead(self.id, me.incarnation, self.id))

    def pending_broadcasts(self) -> int:
        return len(self._queue)

    def outbox(self) -> list[tuple[str, bytes]]:
        """Datagrams to send, as (destination member id, bytes); drains the list."""
        out = self._out
        self._out = []
        return out

    def events(self) -> list[Event]:
        """Membership and summary changes since the last call; drains the list."""
        ev = self._events
        self._events = []
        return ev

    def next_deadline(self) -> float:
        """When ``tick`` must be called next (absolute time, may be in the past)."""
        d = self._probe_timeout_at
        if not self._left:
            d = min(
                d, self._next_probe, self._next_push_pull, self._next_reconnect, self._next_join
            )
        if self._queue:
            if self._next_gossip < self._now:
                self._advance_gossip(self._now)
            d = min(d, self._next_gossip)
        timers = self._timers
        if timers and timers[0][0] < d:
            d = timers[0][0]
        return d

    def heard_from(self, now: float, member_id: str) -> None:
        """The adapter heard from ``member_id`` outside the protocol (an authenticated NAT
        keepalive): a NATed member is then directly reachable for a while."""
        self._now = max(self._now, now)
        view = self._members.get(member_id)
        if view is not None and view.flags & FLAG_NATTED:
            self._heard[member_id] = now

    def receive(self, now: float, sender_id: str, payload: bytes) -> None:
        """Handle one authenticated datagram from ``sender_id``. Never raises on bad bytes."""
        self._now = now
        stats = self.stats
        stats.packets_in += 1
        stats.bytes_in += len(payload)
        if len(payload) > self.config.max_packet_bytes:
            stats.oversized_dropped += 1
            logger.debug("%s: dropped %d-byte datagram from %s", self.id, len(payload), sender_id)
            return
        seen = self._seen
        try:
            bodies = split_packet(payload)
            todo = [
                (b, decode_message(b)) for b in bodies if not (b[0] in _DEDUP_TYPES and b in seen)
            ]
        except RemoteProtocolError as exc:
            stats.malformed_dropped += 1
            logger.debug("%s: malformed datagram from %s: %s", self.id, sender_id, exc)
            return
        if sender_id == self.id:
            stats.misdirected += 1
            return
        view = self._members.get(sender_id)
        if view is not None and view.flags & FLAG_NATTED:
            self._heard[sender_id] = now
        stats.messages_in += len(bodies)
        stats.duplicates_skipped += len(bodies) - len(todo)
        for body, msg in todo:
            if body[0] in _DEDUP_TYPES:
                unsettled = stats.unknown_ignored + stats.forged_dropped
                self._dispatch(sender_id, msg)
                if stats.unknown_ignored + stats.forged_dropped == unsettled:
                    # Settled (applied or stale): the same bytes again would be a no-op.
                    # About an unknown member, or refused by the verifier (which may
                    # learn the origin's key later), it may matter later: not remembered.
                    if len(seen) >= _SEEN_MAX:
                        seen.clear()
                    seen[body] = None
            else:
                self._dispatch(sender_id, msg)

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, arg = heapq.heappop(timers)
            if kind == _T_SUSPICION:
                self._suspicion_expired(str(arg))
            elif kind == _T_NACK:
                relayed = self._relayed.pop(int(arg), None)
                if relayed is not None:
                    self._send(relayed[0], [encode_message(Nack(relayed[1]))])
            else:
                self._reap(str(arg))
        if now >= self._probe_timeout_at:
            self._probe_timeout_at = _INF
            if self._probe is not None and not self._probe.acked:
                self._probe_indirect(self._probe)
        if self._left:
            if self._queue and now >= self._next_gossip:
                self._gossip()
            self._advance_gossip(now)
            return
        if now >= self._next_probe:
            self._probe_round(now)
        if now >= self._next_gossip:
            if self._queue:
                self._gossip()
            self._advance_gossip(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + self.config.push_pull_period(self._n_active)
            target = self._pick(1, None)
            if target:
                self._seq = seq = (self._seq + 1) & _SEQ_MASK
                self.stats.syncs += 1
                self._emit(target[0], pack([encode_message(Sync(seq, self._digest()))]))
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.config.reconnect_interval_s
            self._reconnect()
        if now >= self._next_join:
            self._send_join()

    # -- sending ----------------------------------------------------------------

    def _send(self, dest: str, bodies: list[bytes]) -> None:
        """Queue a datagram of ``bodies`` plus piggybacked updates that fit."""
        used = (
            sum(len(b) for b in bodies) + COMPOUND_OVERHEAD + COMPOUND_ITEM_OVERHEAD * len(bodies)
        )
        room = self.config.max_packet_bytes - used
        if self._queue and room > 16:
            # A relay's updates ride along for free: only its gossip rounds, which
            # give every NATed member a turn, use up transmissions.
            extra = self._queue.take(room, self._transmit_limit(), not self._is_relay)
            if extra:
                bodies = bodies + extra
        data = pack(bodies)
        self._emit(dest, data)

    def _emit(self, dest: str, data: bytes) -> None:
        self._out.append((dest, data))
        stats = self.stats
        stats.packets_out += 1
        stats.bytes_out += len(data)
        if self._natted:
            self._sent[dest] = self._now

    def _transmit_limit(self) -> int:
        limit = self.config.retransmit_limit(self._n_active)
        if self._is_relay:
            # A relay is the only path to NATed members: give every one two turns.
            limit += 2 * self._n_natted
        return limit

    def _broadcast(self, key: tuple[int, str], msg: Message) -> None:
        self._queue.put(key, encode_message(msg))

    def _gossip(self) -> None:
        cfg = self.config
        targets = self._pick(cfg.gossip_nodes, None)
        if self._is_relay and cfg.relay_gossip_nodes and self._n_natted:
            for _ in range(cfg.relay_gossip_nodes):
                t = self._next_natted_turn()
                if t is None:
                    break
                if t not in targets:
                    targets.append(t)
        limit = self._transmit_limit()
        budget = cfg.max_packet_bytes - COMPOUND_OVERHEAD
        for t in targets:
            bodies = self._queue.take(budget, limit)
            if not bodies:
                break
            self.stats.gossip_packets += 1
            self._emit(t, pack(bodies))

    def _advance_gossip(self, now: float) -> None:
        if self._next_gossip <= now:
            interval = self.config.gossip_interval_s
            steps = math.floor((now - self._next_gossip) / interval) + 1
            self._next_gossip += steps * interval

    def _next_natted_turn(self) -> str | None:
        for _ in range(2):
            turn = self._natted_turn
            while turn:
                mid = turn.pop()
                v = self._members.get(mid)
                if v is not None and v.state <= _SUSPECT and v.flags & FLAG_NATTED:
                    return mid
            self._natted_turn = [
                m
                for m, v in self._members.items()
                if v.state <= _SUSPECT and v.flags & FLAG_NATTED and m != self.id
            ]
            self._rng.shuffle(self._natted_turn)
        return None

    # -- member selection --------------------------------------------------------

    def _reachable(self, v: MemberView) -> bool:
        """Can a datagram from us reach this member directly?"""
        if not v.flags & FLAG_NATTED or self._is_relay:
            return True
        return self._now - self._heard.get(v.member_id, -_INF) < self.config.nat_contact_window_s

    def _pick(self, k: int, exclude: str | None) -> list[str]:
        """Up to ``k`` distinct random active members we can reach, other than ``exclude``."""
        members = self._members
        open_ = self._open
        if len(open_) > 2 * self._n_open + 16:
            self._rebuild_open()
            open_ = self._open
        natted: list[str] = []
        if self._heard:
            horizon = self._now - self.config.nat_contact_window_s
            natted = [
                m
                for m, t in self._heard.items()
                if t > horizon and m != exclude and members[m].state <= _SUSPECT
            ]
        n_open = self._n_open
        total = n_open + len(natted)
        if total == 0:
            return []
        want = min(k, total)
        picks: list[str] = []
        rand = self._random
        tries = 4 * want + 8
        while len(picks) < want and tries > 0:
            tries -= 1
            r = int(rand() * total)
            if r < n_open:
                mid = open_[int(rand() * len(open_))]
                v = members.get(mid)
                if v is None or v.state > _SUSPECT or v.flags & FLAG_NATTED:
                    continue
            else:
                mid = natted[r - n_open]
            if mid == exclude or mid in picks:
                continue
            picks.append(mid)
        return picks

    def _rebuild_open(self) -> None:
        self._open = [
            m
            for m, v in self._members.items()
            if m != self.id and v.state <= _SUSPECT and not v.flags & FLAG_NATTED
        ]

    # -- state bookkeeping ---------------------------------------------------------

    def _install(self, old: MemberView | None, new: MemberView) -> None:
        """Store ``new`` (replacing ``old``) and keep the indexes and counters right."""
        mid = new.member_id
        self._members[mid] = new
        self._dirty = True
        if old is not None:
            if old.state <= _SUSPECT:
                self._n_active -= 1
                if old.flags & FLAG_NATTED:
                    self._n_natted -= 1
                else:
                    self._n_open -= 1
                if old.flags & FLAG_RELAY:
                    self._relays.remove(mid)
            elif old.state == _DEAD:
                self._dead.pop(mid, None)
        if new.state <= _SUSPECT:
            self._n_active += 1
            if new.flags & FLAG_NATTED:
                self._n_natted += 1
            else:
                self._n_open += 1
                if old is None or old.state > _SUSPECT or old.flags & FLAG_NATTED:
                    self._open.append(mid)
            if new.flags & FLAG_RELAY:
                self._relays.append(mid)
        elif new.state == _DEAD:
            self._dead[mid] = None

    def _add_timer(self, at: float, kind: int, arg: str | int) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, arg))

    def _event(
        self, kind: EventKind, v: MemberView, version: int = 0, value: bytes | None = None
    ) -> None:
        self._events.append(Event(kind, v.member_id, v.incarnation, self._now, version, value))

    def _refute(self, incarnation: int) -> None:
        me = self._members[self.id]
        inc = max(incarnation, me.incarnation) + 1
        if inc > MAX_INCARNATION:
            # Only reachable from the wire's limit (a peer's doing): nothing to answer with.
            self.stats.out_of_range_dropped += 1
            return
        self._members[self.id] = me._replace(incarnation=inc)
        self._dirty = True
        self._broadcast((_MEMBERSHIP, self.id), Alive(self.id, inc, me.flags, me.meta))
        self.stats.refutations += 1
        self._adjust_awareness(1)

    def _adjust_awareness(self, delta: int) -> None:
        self._awareness = max(
            0, min(self.config.awareness_max_multiplier - 1, self._awareness + delta)
        )

    # -- message handling ----------------------------------------------------------

    def _dispatch(self, sender: str, msg: Message) -> None:
        # Most frequent first.
        if isinstance(msg, Ping):
            if msg.target != self.id:
                self.stats.misdirected += 1
                return
            self._send(sender, [encode_message(Ack(msg.seq))])
        elif isinstance(msg, Ack):
            self._on_ack(msg.seq)
        elif isinstance(msg, Alive):
            self._on_alive(msg)
        elif isinstance(msg, Suspect):
            if msg.incarnation >= MAX_INCARNATION:
                self.stats.out_of_range_dropped += 1  # its member could not refute it
            else:
                self._on_suspect(msg, sender)
        elif isinstance(msg, Dead):
            if msg.incarnation >= MAX_INCARNATION:
                self.stats.out_of_range_dropped += 1
            else:
                self._on_dead(msg, sender)
        elif isinstance(msg, Summary):
            self._on_summary(msg, sender)
        elif isinstance(msg, PingReq):
            self._on_ping_req(sender, msg)
        elif isinstance(msg, Nack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                p.nacks += 1
        elif isinstance(msg, Sync):
            if msg.digest != self._digest() and not self._left:
                self._start_push_pull(sender, join=False)
        else:
            self._on_push_pull(sender, msg)

    def _on_ack(self, seq: int) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self._probe_timeout_at = _INF
                self._adjust_awareness(-1)
            return
        relayed = self._relayed.pop(seq, None)
        if relayed is not None:
            self._send(relayed[0], [encode_message(Ack(relayed[1]))])

    def _on_ping_req(self, sender: str, msg: PingReq) -> None:
        if msg.target == self.id:
            self._send(sender, [encode_message(Ack(msg.seq))])
            return
        self._seq = seq = (self._seq + 1) & _SEQ_MASK
        self._relayed[seq] = (sender, msg.seq)
        self._add_timer(self._now + self.config.probe_timeout_s, _T_NACK, seq)
        self.stats.relayed_pings += 1
        self._send(msg.target, self._ping_bodies(seq, msg.target))

    def _ping_bodies(self, seq: int, target: str) -> list[bytes]:
        bodies = [encode_message(Ping(seq, target))]
        v = self._members.get(target)
        if v is not None and v.state == _SUSPECT:
            # Buddy system: tell a suspected member, so it can refute at once.
            s = self._suspicions.get(target)
            origin = self.id if s is None or self.id in s.confirmers else next(iter(s.confirmers))
            bodies.append(encode_message(Suspect(target, v.incarnation, origin)))
        return bodies

    def _on_alive(self, a: Alive) -> None:
        mid = a.member
        if mid == self.id:
            me = self._members[mid]
            if self._left:
                return
            if a.incarnation > me.incarnation or (
                a.incarnation == me.incarnation and (a.flags != me.flags or a.meta != me.meta)
            ):
                self._refute(a.incarnation)
            return
        if len(a.meta) > self.config.max_meta_bytes:
            self.stats.malformed_dropped += 1
            return
        cur = self._members.get(mid)
        if cur is None:
            v = MemberView(mid, _ALIVE, a.incarnation, a.flags, a.meta, 0, None, self._now)
            self._install(None, v)
            n = len(self._roster)
            self._roster.insert(int(self._random() * (n + 1)), mid)
            self._event(EventKind.UP, v)
            self._broadcast((_MEMBERSHIP, mid), a)
            return
        if a.incarnation <= cur.incarnation:
            self.stats.stale_ignored += 1
            return
        changed = cur.state != _ALIVE
        v = MemberView(
            mid,
            _ALIVE,
            a.incarnation,
            a.flags,
            a.meta,
            cur.summary_version,
            cur.summary,
            self._now if changed else cur.state_changed_at,
        )
        self._install(cur, v)
        if changed:
            self._suspicions.pop(mid, None)
            self._event(EventKind.ALIVE, v)
        elif a.flags != cur.flags or a.meta != cur.meta:
            self._event(EventKind.UPDATE, v)
        self._broadcast((_MEMBERSHIP, mid), a)

    def _on_suspect(self, s: Suspect, sender: str | None = None) -> None:
        mid = s.member
        if mid == self.id:
            if not self._left and s.incarnation >= self._members[mid].incarnation:
                self._refute(s.incarnation)
            return
        cur = self._members.get(mid)
        if cur is None:
            self.stats.unknown_ignored += 1
            return
        if s.incarnation < cur.incarnation or cur.state > _SUSPECT:
            self.stats.stale_ignored += 1
            if s.incarnation < cur.incarnation:
                self._correct(sender, cur)
            return
        if cur.state == _SUSPECT and s.incarnation == cur.incarnation:
            sus = self._suspicions.get(mid)
            if sus is not None and sus.confirm(s.origin):
                self._add_timer(sus.deadline, _T_SUSPICION, mid)
                self._broadcast((_MEMBERSHIP, mid), s)
            return
        self._start_suspicion(cur, s.incarnation, s.origin)
        self._broadcast((_MEMBERSHIP, mid), s)

    def _start_suspicion(self, cur: MemberView, incarnation: int, origin: str) -> None:
        mid = cur.member_id
        low, high = self.config.suspicion_timeouts(self._n_active)
        k = self.config.suspicion_confirmations
        if self._n_active - 2 < k:
            k = 0
        sus = _Suspicion(incarnation, self._now, origin, k, low, high)
        self._suspicions[mid] = sus
        self._add_timer(sus.deadline, _T_SUSPICION, mid)
        v = cur._replace(state=_SUSPECT, incarnation=incarnation, state_changed_at=self._now)
        self._install(cur, v)
        self.stats.suspicions += 1
        self._event(EventKind.SUSPECT, v)

    def _correct(self, sender: str | None, cur: MemberView) -> None:
        """``sender`` passed on an outdated suspicion or death of a member we know
        alive at a higher incarnation: it missed the refutation, so send it. (A
        member that is reached by few others, NATed behind one relay, would
        otherwise declare the member dead on its own.) Rate-limited per pair."""
        if sender is None or cur.state != _ALIVE:
            return
        key = (sender, cur.member_id)
        last = self._corrected.get(key)
        if last is not None and self._now - last < self.config.probe_interval_s:
            return
        if len(self._corrected) >= _CORRECTED_MAX:
            self._corrected.clear()
        self._corrected[key] = self._now
        self.stats.corrections += 1
        alive = Alive(cur.member_id, cur.incarnation, cur.flags, cur.meta)
        self._send(sender, [encode_message(alive)])

    def _suspicion_expired(self, mid: str) -> None:
        sus = self._suspicions.get(mid)
        if sus is None or sus.deadline > self._now:
            return
        cur = self._members.get(mid)
        del self._suspicions[mid]
        if cur is None or cur.state != _SUSPECT or cur.incarnation != sus.incarnation:
            return
        self.stats.deaths_declared += 1
        self._on_dead(Dead(mid, cur.incarnation, self.id))

    def _on_dead(self, d: Dead, sender: str | None = None) -> None:
        mid = d.member
        if mid == self.id:
            if not self._left and d.incarnation >= self._members[mid].incarnation:
                self._refute(d.incarnation)
            return
        cur = self._members.get(mid)
        if cur is None:
            self.stats.unknown_ignored += 1
            return
        if d.incarnation < cur.incarnation or cur.state > _SUSPECT:
            self.stats.stale_ignored += 1
            if d.incarnation < cur.incarnation:
                self._correct(sender, cur)
            return
        state = _LEFT if d.origin == mid else _DEAD
        v = cur._replace(state=state, incarnation=d.incarnation, state_changed_at=self._now)
        self._install(cur, v)
        self._suspicions.pop(mid, None)
        self._heard.pop(mid, None)
        reap = self.config.left_reap_s if state == _LEFT else self.config.dead_reap_s
        self._add_timer(self._now + reap, _T_REAP, mid)
        self._event(EventKind.LEFT if state == _LEFT else EventKind.DEAD, v)
        self._broadcast((_MEMBERSHIP, mid), d)

    def _on_summary(self, s: Summary, sender: str) -> None:
        if len(s.value) > self.config.max_summary_bytes:
            self.stats.malformed_dropped += 1
            return
        mid = s.member
        if mid == self.id:
            me = self._members[mid]
            if s.version > me.summary_version or (
                s.version == me.summary_version and s.value != (me.summary or b"")
            ):
                if s.version >= MAX_SUMMARY_VERSION:
                    self.stats.out_of_range_dropped += 1  # no version left to outbid it
                    return
                if not self._verified(s, sender):
                    return  # not ours: nothing to outbid
                # Ours from a previous life (or, unverified, not ours at all): outbid it.
                self._members[mid] = me._replace(summary_version=s.version)
                self._dirty = True
                if self._summary is not None and not self._left:
                    self.publish(self._summary)
            return
        cur = self._members.get(mid)
        if cur is None:
            self.stats.unknown_ignored += 1
            return
        if s.version <= cur.summary_version:
            self.stats.stale_ignored += 1
            return
        if not self._verified(s, sender):
            return
        v = cur._replace(summary_version=s.version, summary=s.value)
        self._members[mid] = v
        self._dirty = True
        self._event(EventKind.SUMMARY, v, s.version, s.value)
        self._broadcast((_SUMMARY, mid), s)

    def _verified(self, s: Summary, sender: str) -> bool:
        verify = self._verify_summary
        if verify is None:
            return True
        try:
            ok = verify(s, sender)
        except Exception:
            logger.exception("%s: the summary verifier failed on %s's", self.id, s.member)
            ok = False
        if not ok:
            self.stats.forged_dropped += 1
            logger.debug("%s: summary of %s from %s refused", self.id, s.member, sender)
        return ok

    def _reap(self, mid: str) -> None:
        cur = self._members.get(mid)
        if cur is None or cur.state <= _SUSPECT:
            return
        keep = self.config.left_reap_s if cur.state == _LEFT else self.config.dead_reap_s
        if cur.state_changed_at + keep > self._now:
            return
        del self._members[mid]
        self._dirty = True
        self._dead.pop(mid, None)
        self._roster.remove(mid)
        self._probe_pos = min(self._probe_pos, len(self._roster))

    # -- probing -------------------------------------------------------------------

    def _probe_round(self, now: float) -> None:
        cfg = self.config
        mult = self._awareness + 1
        self._next_probe = now + cfg.probe_interval_s * mult
        p = self._probe
        if p is not None and not p.acked:
            self._probe_failed(p)
        self._probe = None
        self._probe_timeout_at = _INF
        target = self._keepalive_target(now) or self._next_probe_target()
        if target is None:
            return
        v = self._members[target]
        self._seq = seq = (self._seq + 1) & _SEQ_MASK
        p = _Probe(target, seq, v.incarnation)
        self._probe = p
        self.stats.probes += 1
        if self._reachable(v):
            self._send(target, self._ping_bodies(seq, target))
        elif not self._probe_indirect(p):
            self._probe = None  # nobody can reach it for us this round
            return
        # Unreachable NATed targets get a second wave of ping-reqs at the timeout:
        # their only path is the relays, so this replaces the direct attempt.
        self._probe_timeout_at = now + cfg.probe_timeout_s * mult

    def _keepalive_target(self, now: float) -> str | None:
        if not self._natted:
            return None
        for r in self._relays:
            if now - self._sent.get(r, -_INF) >= self.config.nat_keepalive_s:
                return r
        return None

    def _next_probe_target(self) -> str | None:
        roster = self._roster
        members = self._members
        for _ in range(len(roster) + 1):
            if self._probe_pos >= len(roster):
                if not roster:
                    return None
                self._rng.shuffle(roster)
                self._probe_pos = 0
            mid = roster[self._probe_pos]
            self._probe_pos += 1
            if members[mid].state <= _SUSPECT:
                return mid
        return None

    def _probe_indirect(self, p: _Probe) -> bool:
        """Ask helpers to probe ``p.target`` and retry directly if we can; False if neither."""
        v = self._members.get(p.target)
        if v is None:
            return False
        k = self.config.indirect_checks
        helpers: list[str]
        if v.flags & FLAG_NATTED:
            relays = [r for r in self._relays if r != p.target]
            helpers = [relays[i % len(relays)] for i in range(k)] if relays else []
        else:
            helpers = self._pick(k, p.target)
        p.indirect = True
        p.expected_nacks = len(helpers)
        body = encode_message(PingReq(p.seq, p.target))
        for h in helpers:
            self._send(h, [body])
        self.stats.indirect_probes += len(helpers)
        direct = self._reachable(v)
        if direct:
            # Without helpers (a relay probing a NATed member: nobody else can
            # reach it), the retry is a burst of direct pings instead.
            for _ in range(1 if helpers else k):
                self._send(p.target, self._ping_bodies(p.seq, p.target))
        return bool(helpers) or direct

    def _probe_failed(self, p: _Probe) -> None:
        self.stats.probe_failures += 1
        if p.expected_nacks:
            self._adjust_awareness(max(0, p.expected_nacks - p.nacks))
        else:
            self._adjust_awareness(1)
        cur = self._members.get(p.target)
        if cur is None or cur.state > _SUSPECT or cur.incarnation != p.incarnation:
            return
        if cur.state == _SUSPECT:
            sus = self._suspicions.get(p.target)
            if sus is not None and sus.confirm(self.id):
                self._add_timer(sus.deadline, _T_SUSPICION, p.target)
                self._broadcast(
                    (_MEMBERSHIP, p.target), Suspect(p.target, cur.incarnation, self.id)
                )
            return
        msg = Suspect(p.target, cur.incarnation, self.id)
        self._start_suspicion(cur, cur.incarnation, self.id)
        self._broadcast((_MEMBERSHIP, p.target), msg)
        if self._reachable(cur):
            self._send(p.target, [encode_message(msg)])

    # -- push-pull -------------------------------------------------------------------

    def _state_bodies(self, seq: int, join: bool, reply: bool) -> list[bytes]:
        room = self.config.max_packet_bytes - PUSH_PULL_HEADER
        chunks: list[list[bytes]] = [[]]
        used = 0
        for v in self._members.values():
            entry = entry_bytes(
                v.member_id,
                v.incarnation,
                v.state,
                v.flags,
                v.meta,
                v.summary_version,
                v.summary or b"",
            )
            if used + len(entry) > room or len(chunks[-1]) == 0xFFFF:
                chunks.append([])
                used = 0
            chunks[-1].append(entry)
            used += len(entry)
        parts = len(chunks)
        return [push_pull_body(seq, join, reply, i, parts, chunk) for i, chunk in enumerate(chunks)]

    def _digest(self) -> int:
        """XOR of a 64-bit hash of every member's (id, incarnation, state, summary version)."""
        if self._dirty:
            acc = 0
            blake = hashlib.blake2b
            for v in self._members.values():
                key = f"{v.member_id}\0{v.incarnation}\0{int(v.state)}\0{v.summary_version}"
                acc ^= int.from_bytes(blake(key.encode(), digest_size=8).digest(), "big")
            self._digest_value = acc
            self._dirty = False
        return self._digest_value

    def _start_push_pull(self, dest: str, join: bool) -> None:
        self._seq = seq = (self._seq + 1) & _SEQ_MASK
        self.stats.push_pulls += 1
        for body in self._state_bodies(seq, join, reply=False):
            self._emit(dest, pack([body]))

    def _on_push_pull(self, sender: str, pp: PushPull) -> None:
        members = self._members
        for e in pp.entries:
            cur = members.get(e.member)
            if (
                cur is not None
                and cur.incarnation == e.incarnation
                and cur.state == e.state
                and cur.summary_version >= e.summary_version
            ):
                continue  # nothing new: the common case
            if e.state == _ALIVE:
                self._on_alive(Alive(e.member, e.incarnation, e.flags, e.meta))
            elif e.incarnation >= MAX_INCARNATION:
                self.stats.out_of_range_dropped += 1  # a suspect/dead nobody could refute
            elif e.state == _LEFT:
                self._on_dead(Dead(e.member, e.incarnation, e.member))
            else:
                # A remote suspect or dead only makes us suspect (refutable).
                self._on_suspect(Suspect(e.member, e.incarnation, sender))
            if e.summary_version:
                self._on_summary(Summary(e.member, e.summary_version, e.summary), sender)
        if not pp.reply and pp.part == 0:
            for body in self._state_bodies(pp.seq, False, reply=True):
                self._emit(sender, pack([body]))
        if self._seeds and self._n_active > 1:
            self._next_join = _INF

    def _send_join(self) -> None:
        if not self._seeds or self._left:
            self._next_join = _INF
            return
        if self._n_active > 1:
            self._next_join = _INF
            return
        for seed in self._seeds:
            self._start_push_pull(seed, join=True)
        self._next_join = self._now + self.config.join_retry_s

    def _reconnect(self) -> None:
        if not self._dead:
            return
        candidates = [m for m in self._dead if self._reachable(self._members[m])]
        if candidates:
            self._start_push_pull(candidates[int(self._random() * len(candidates))], join=False)
