"""SWIM membership and summary dissemination between sites and the hub.

A sans-I/O core (``Node``), its wire format (``gossip.messages``), memberlist-style
configuration presets (``GossipConfig.lan()/wan()/local()``) and a deterministic
network simulator (``gossip.sim.Simulator``). Knows nothing of applications:
members are ids, metadata and summaries are opaque bytes.

Contract for the transport adapter (asyncio UDP, written separately)
--------------------------------------------------------------------

The core never reads a clock, draws global randomness, blocks or touches a
socket. The adapter owns all of that::

    node = Node(self_id, GossipConfig.wan(), random.Random(), now=loop.time(),
                meta=advertised_address, natted=behind_nat, relay=is_hub)
    node.join(seed_ids)                     # ids the adapter can address
    on datagram (addr, data):
        sender_id = authenticate(addr, data)   # drop unauthenticated or replayed
        remember addr as sender_id's latest address
        node.receive(loop.time(), sender_id, payload)
        flush()
    on timer at node.next_deadline():
        node.tick(loop.time()); flush()
    flush():
        for dest_id, data in node.outbox(): sendto(seal(data), address_of(dest_id))
        for event in node.events(): publish to the hub / site leader
        re-arm the timer at node.next_deadline()

* Identity and addresses: the core speaks member ids only. ``sender_id`` must
  be authenticated per datagram (the core trusts it; it does not trust the
  payload). ``address_of(id)`` should prefer the latest authenticated source
  address seen from that id (this is what reaches a member behind NAT) and fall
  back to the address the member advertises in its ``meta``. Seed ids may be
  placeholders the adapter maps to configured addresses; replies come from the
  real ids. Datagrams to an id with no address are dropped silently: the
  protocol is built for loss.
* Limits: ``payload`` longer than ``config.max_packet_bytes`` is dropped and
  counted; every datagram the core emits is at most that long, before the
  adapter's own authentication overhead.
* Remote bad input never raises: undecodable datagrams are counted in
  ``node.stats.malformed_dropped`` and logged at debug level. Replays of valid
  messages are harmless to the state (incarnations and summary versions only
  move forward) but replay protection belongs to the adapter. Incarnations and
  versions at the wire's limit that could not be refuted are dropped too.
* Summaries: an authenticated member can still lie about another's summary; pass
  ``summary_verifier`` (origin signature check) to ``Node``/``GossipService`` so
  forged ones are dropped before they are stored or relayed.
* Shutdown: ``node.leave()``, keep ticking until ``node.pending_broadcasts()`` is
  0 (or a deadline), then stop.
* NAT: a member behind NAT starts with ``natted=True`` and the hub with
  ``relay=True``. NATed members keep their mapping towards relays open, and
  everyone else probes them through the relays; see ``gossip.core``.

The adapter is ``gossip.udp.GossipService``; datagram authentication (member
certificates issued by a trust anchor, per-datagram signatures, replay windows)
is ``gossip.auth``.

Exceptions: see ``gossip.errors`` (``GossipError`` is the root; ``gossip.auth.AuthError``,
a ``RemoteProtocolError``, heads the authentication failures).
"""

from gossip.auth import (
    AuthError,
    BadCertError,
    BadSignatureError,
    Certificate,
    DatagramOpener,
    DatagramSealer,
    MalformedError,
    ReplayedError,
    StaleError,
    issue_cert,
    parse_cert,
    verify_cert,
)
from gossip.config import GossipConfig
from gossip.core import (
    Event,
    EventKind,
    MemberState,
    MemberView,
    Node,
    Stats,
    SummarySigner,
    SummaryVerifier,
)
from gossip.errors import (
    ConfigError,
    GossipError,
    LocalProtocolError,
    MalformedPacketError,
    OversizedPacketError,
    RemoteProtocolError,
    TruncatedPacketError,
    UnsupportedVersionError,
)
from gossip.udp import GossipService, ServiceStats, address_meta

__all__ = [
    "AuthError",
    "BadCertError",
    "BadSignatureError",
    "Certificate",
    "ConfigError",
    "DatagramOpener",
    "DatagramSealer",
    "Event",
    "EventKind",
    "GossipConfig",
    "GossipError",
    "GossipService",
    "LocalProtocolError",
    "MalformedError",
    "MalformedPacketError",
    "MemberState",
    "MemberView",
    "Node",
    "OversizedPacketError",
    "RemoteProtocolError",
    "ReplayedError",
    "ServiceStats",
    "StaleError",
    "Stats",
    "SummarySigner",
    "SummaryVerifier",
    "TruncatedPacketError",
    "UnsupportedVersionError",
    "address_meta",
    "issue_cert",
    "parse_cert",
    "verify_cert",
]
