"""The asyncio UDP adapter: one socket, one ``Node``, authenticated datagrams.

``GossipService`` drives a ``gossip.core.Node`` the way its contract asks (see
``gossip``): every datagram is opened by a ``DatagramOpener`` (certificate,
signature, replay and freshness checks) before the core sees it, every
datagram the core emits is sealed by a ``DatagramSealer``, and a single timer
handle is kept armed at ``node.next_deadline()``. Everything runs in loop
callbacks: the service starts no task.

::

    sealer = DatagramSealer(member_id, signing_key, cert)
    opener = DatagramOpener(trusted_anchors, recipient=member_id)
    async with GossipService(GossipConfig.wan(), sealer, opener, host="0.0.0.0", port=7946,
                             on_events=handle_events, on_app_message=handle_app) as svc:
        svc.set_addresses({"seed:hub": ("203.0.113.7", 7946)})
        svc.join(["seed:hub"])
        svc.publish(summary)
        ...

Sealed payload: one type byte, then the body::

    0x01 GOSSIP  a core datagram, handed to node.receive
    0x02 APP     an application message, handed to on_app_message(sender_id, body)
    0x03 PUNCH   an empty NAT keepalive (see below)

Addresses: ``address_of(id)`` is the latest authenticated source address seen
from ``id`` (what reaches a member behind NAT), else the owner's address book
(``set_addresses``, for seeds and for peers a relay told it about), else what
``address_from_meta`` makes of the member's advertised ``meta`` (members that
learnt of each other through gossip have no other way to reach each other).
By default a member advertises ``address_meta(bound address)``, ``host:port``,
unless it is bound to a wildcard address: then pass ``meta`` yourself, e.g.
``address_meta((public_ip, port))``, or your own encoding together with your own
``address_from_meta``. Addresses are IP literals: nothing here resolves names
(that would block the loop).

Binding: datagrams to a member the core knows, app messages and punches are
sealed *bound* to the destination id, so they cannot be replayed to another
member. Core datagrams to an id the core does not know (a seed placeholder,
``"seed:10.0.0.1:7946"``) are *unbound*; only core datagrams are accepted
unbound (app messages and punches that are not bound to us are dropped as
malformed). An unbound datagram can be replayed to another member within the
replay window and clock skew; for a join that only makes that member answer
the real sender with its state.

NAT hole punching: the owner calls ``punch(ids)`` periodically (more often than
the NAT's UDP mapping timeout) for NATed peers it learned of from a relay; both
sides doing so open their NATs towards each other. A punch from a member is an
authenticated datagram, so its source address becomes that member's address.
The core addresses a NATed member directly only within
``config.nat_contact_window_s`` of hearing from it, so a punch is also reported
to the core (``Node.heard_from``): the core then probes and gossips with that
member directly, not only through the relays, for as long as the punches keep
coming. A punch from a member the core does not know only records the address.

Drops: every refused datagram is counted in ``stats.dropped[reason]`` (reasons:
``auth.REASONS`` and ``"oversized"``), logged at debug level, and summarised in
a warning at most once per ``warn_interval_s``. Callback exceptions are logged
and counted, never propagated into the event loop.

Shutdown (``stop`` / leaving the ``async with``): ``node.leave()``, keep
gossiping until the leave is disseminated (``node.pending_broadcasts() == 0``)
or ``leave_timeout_s`` passes, then close the socket.

Its size: one asyncio adapter around the core (socket, timers, NAT keep-alives, the leave
handshake); split, each half would need the other's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

from gossip.auth import (
    FLAG_BOUND,
    MAX_ID_BYTES,
    OVERHEAD_FIXED_BYTES,
    REASONS,
    AuthError,
    DatagramOpener,
    DatagramSealer,
)
from gossip.config import MAX_UDP_PAYLOAD, GossipConfig
from gossip.core import Event, Node, SummarySigner, SummaryVerifier
from gossip.errors import LocalProtocolError

logger = logging.getLogger(__name__)

Address = tuple[str, int]

#: Drop reasons counted by the service: the opener's, and datagrams over the size limit.
DROP_REASONS: tuple[str, ...] = (*REASONS, "oversized")

# The core may hand back a deadline it has already passed; never tick more
# often than this, so a deadline that does not move cannot spin the loop.
_MIN_TICK_GAP_S = 0.001


class Kind(IntEnum):
    """The first byte of a sealed payload."""

    GOSSIP = 1
    APP = 2
    PUNCH = 3


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service (monotonic). The core's own are in ``node.stats``."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    app_in: int = 0
    app_out: int = 0
    punches_in: int = 0
    punches_out: int = 0
    no_address: int = 0  # datagrams not sent: no address known for the destination
    send_errors: int = 0  # errors the socket reported (ICMP unreachable, ...)
    callback_errors: int = 0  # exceptions raised by on_events / on_app_message
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dropped"}
        out.update({f"dropped_{k}": v for k, v in self.dropped.items()})
        return out


def address_meta(addr: Address) -> bytes:
    """The default ``meta``: the advertised address as ``host:port`` (``[v6]:port``)."""
    host, port = _check_address(addr)
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def address_from_meta_default(meta: bytes) -> Address | None:
    """The address in a ``meta`` made by ``address_meta``, else None."""
    try:
        host, _, port = meta.decode().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return _check_address((host, int(port)))
    except (UnicodeDecodeError, ValueError):
        return None


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return True


def _check_address(addr: Address) -> Address:
    host, port = addr
    ipaddress.ip_address(host)  # ValueError unless an IP literal
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port in {addr!r}")
    return (host, port)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, service: GossipService) -> None:
        self._service = service

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._service._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self._service._on_socket_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._service._on_closed()


class GossipService:
    """A gossip member on a UDP socket. An async context manager (``start``/``stop``).

    ``sealer`` names the member (its id is the node's id); ``opener`` must be
    built with ``recipient=sealer.member_id``. ``meta``, ``natted``, ``relay``,
    ``incarnation``, ``summary_verifier`` and ``summary_signer`` go to the ``Node``. Callbacks run
    inside the event loop's datagram and timer callbacks: they must not block
    (schedule work instead); they may call this service (``publish``,
    ``send_app``, ...).
    """

    def __init__(
        self,
        config: GossipConfig,
        sealer: DatagramSealer,
        opener: DatagramOpener,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        meta: bytes | None = None,
        natted: bool = False,
        relay: bool = False,
        incarnation: int = 0,
        summary_verifier: SummaryVerifier | None = None,
        summary_signer: SummarySigner | None = None,
        addresses: Mapping[str, Address] | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
        on_app_message: Callable[[str, bytes], None] | None = None,
        address_from_meta: Callable[[bytes], Address | None] | None = None,
        rng: random.Random | None = None,
        max_app_bytes: int = 1024,
        max_peers: int = 8192,
        leave_timeout_s: float = 1.0,
        warn_interval_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        config.validate()
        if opener.recipient != sealer.member_id:
            raise LocalProtocolError(
                f"the opener checks datagrams for {opener.recipient!r},"
                f" not for {sealer.member_id!r}"
            )
        limit = MAX_UDP_PAYLOAD - OVERHEAD_FIXED_BYTES - MAX_ID_BYTES - 1
        if not 0 < max_app_bytes <= limit:
            raise LocalProtocolError(f"max_app_bytes must be in 1..{limit}")
        if max_peers < 1 or leave_timeout_s < 0 or warn_interval_s <= 0:
            raise LocalProtocolError("max_peers, leave_timeout_s, warn_interval_s out of range")
        self.config = config
        self.member_id = sealer.member_id
        self.stats = ServiceStats()
        self.on_events = on_events
        self.on_app_message = on_app_message
        self.max_app_bytes = max_app_bytes
        self._sealer = sealer
        self._opener = opener
        self._host = host
        self._port = port
        self._meta = meta
        self._node_args: dict[str, Any] = {
            "natted": natted,
            "relay": relay,
            "incarnation": incarnation,
            "summary_verifier": summary_verifier,
            "summary_signer": summary_signer,
        }
        self._rng = rng if rng is not None else random.Random()
        self._book: dict[str, Address] = {}
        if addresses:
            self.set_addresses(addresses)
        self._learned: OrderedDict[str, Address] = OrderedDict()
        self._max_peers = max_peers
        self._address_from_meta = (
            address_from_meta if address_from_meta is not None else address_from_meta_default
        )
        self._leave_timeout_s = leave_timeout_s
        self._warn_interval_s = warn_interval_s
        self._wall = wall_clock
        self._max_datagram = (
            OVERHEAD_FIXED_BYTES + MAX_ID_BYTES + 1 + max(config.max_packet_bytes, max_app_bytes)
        )
        self._node: Node | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.Handle | None = None  # a TimerHandle, or a Handle (uvloop)
        self._timer_when = math.inf
        self._last_tick = -math.inf
        self._state = "new"  # new -> running -> stopping -> stopped
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._next_warn = -math.inf
        self._unwarned: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> GossipService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the socket and start the node (a service starts once)."""
        if self._state != "new":
            raise LocalProtocolError(f"cannot start a service that is {self._state}")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self._host, self._port)
        )
        self._transport = transport
        meta = self._meta
        if meta is None:
            meta = address_meta(self.address) if not _unspecified(self.address[0]) else b""
        try:
            node = Node(
                self.member_id, self.config, self._rng, loop.time(), meta=meta, **self._node_args
            )
        except BaseException:
            self._transport = None
            transport.close()
            raise
        self._loop = loop
        self._node = node
        self._closed = loop.create_future()
        self._state = "running"
        logger.debug("%s: gossip on %s", self.member_id, self.address)
        self._flush()

    async def stop(self) -> None:
        """Leave the cluster, disseminate the leave (bounded) and close the socket."""
        if self._state != "running":
            return
        node, loop = self.node, self._require_loop()
        self._state = "stopping"
        try:
            node.leave()
            self._flush()
            if node.num_active() and node.pending_broadcasts() and self._leave_timeout_s > 0:
                self._drained = loop.create_future()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._leave_timeout_s):
                        await self._drained
        finally:
            # Also when cancelled while the leave is being disseminated.
            self._drained = None
            closed = self._closed
            self.abort()
        if closed is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await closed
        logger.debug("%s: gossip stopped", self.member_id)

    def abort(self) -> None:
        """Close the socket at once, without leaving: to others it is a crash."""
        if not self.running:
            return
        self._state = "stopped"
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def running(self) -> bool:
        """Started and not yet stopped (datagrams are processed while stopping too)."""
        return self._state in ("running", "stopping")

    @property
    def node(self) -> Node:
        """The core (membership, summaries, ``stats``); available once started."""
        if self._node is None:
            raise LocalProtocolError("the service has not been started")
        return self._node

    @property
    def address(self) -> Address:
        """The bound (host, port), the chosen port when 0 was asked for."""
        if self._transport is None:
            raise LocalProtocolError("the service is not running")
        sockname = self._transport.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1]))

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self.running:
            raise LocalProtocolError("the service is not running")
        return self._loop

    # -- owner API -------------------------------------------------------------------

    def join(self, seed_ids: Iterable[str]) -> None:
        """Join through these ids (members or placeholders with a book address)."""
        self._require_loop()
        self.node.join(seed_ids)
        self._flush()

    def publish(self, value: bytes) -> int:
        """Set this member's summary; returns its version."""
        self._require_loop()
        version = self.node.publish(value)
        self._flush()
        return version

    def set_addresses(self, addresses: Mapping[str, Address], *, replace: bool = False) -> None:
        """Add (or with ``replace``, set) static addresses: seeds, peers a relay named.

        A member's latest authenticated source address takes precedence. Hosts
        must be IP literals (``ValueError`` otherwise).
        """
        checked = {mid: _check_address(addr) for mid, addr in addresses.items()}
        if replace:
            self._book = checked
        else:
            self._book.update(checked)

    def address_of(self, member_id: str) -> Address | None:
        """Where datagrams to ``member_id`` go, or None when no address is known."""
        addr = self._learned.get(member_id) or self._book.get(member_id)
        if addr is None and self._address_from_meta is not None and self._node is not None:
            view = self._node.member(member_id)
            if view is not None and view.meta:
                try:
                    addr = self._address_from_meta(view.meta)
                except Exception:
                    logger.debug("%s: no address in the meta of %s", self.member_id, member_id)
                    addr = None
        return addr

    def learned_address(self, member_id: str) -> Address | None:
        """The latest authenticated source address seen from ``member_id`` (what reaches it
        through its NAT), or None when nothing was heard from it directly."""
        return self._learned.get(member_id)

    def send_app(self, dest_id: str, payload: bytes) -> bool:
        """Send an application message; False when no address is known (it is not sent).

        At most ``max_app_bytes`` (``LocalProtocolError`` otherwise). Delivery is
        UDP's: at most once, unordered; build acknowledgements on top.
        """
        self._require_loop()
        if len(payload) > self.max_app_bytes:
            raise LocalProtocolError(
                f"app message of {len(payload)} bytes, limit {self.max_app_bytes}"
            )
        if self._send(dest_id, Kind.APP, payload, bound=True):
            self.stats.app_out += 1
            return True
        return False

    def punch(self, ids: Iterable[str]) -> int:
        """Send an authenticated NAT keepalive to each id with a known address; how many."""
        self._require_loop()
        sent = 0
        for mid in ids:
            if mid != self.member_id and self._send(mid, Kind.PUNCH, b"", bound=True):
                sent += 1
        self.stats.punches_out += sent
        return sent

    # -- sending ----------------------------------------------------------------------

    def _send(self, dest: str, kind: Kind, body: bytes, *, bound: bool) -> bool:
        transport = self._transport
        if transport is None:
            return False
        addr = self.address_of(dest)
        if addr is None:
            self.stats.no_address += 1
            logger.debug("%s: no address for %s, datagram dropped", self.member_id, dest)
            return False
        data = self._sealer.seal(bytes((kind,)) + body, self._wall(), dest if bound else None)
        transport.sendto(data, addr)
        self.stats.datagrams_out += 1
        self.stats.bytes_out += len(data)
        return True

    def _flush(self) -> None:
        node = self._node
        if node is None:
            return
        member = node.member
        for dest, data in node.outbox():
            self._send(dest, Kind.GOSSIP, data, bound=member(dest) is not None)
        events = node.events()
        if events and self.on_events is not None:
            try:
                self.on_events(events)
            except Exception:
                self.stats.callback_errors += 1
                logger.exception("%s: on_events callback failed", self.member_id)
        drained = self._drained
        if drained is not None and not drained.done() and node.pending_broadcasts() == 0:
            drained.set_result(None)
        self._arm()

    def _arm(self) -> None:
        loop, node = self._loop, self._node
        if loop is None or node is None or self._state not in ("running", "stopping"):
            return
        deadline = node.next_deadline()
        timer = self._timer
        if deadline == math.inf:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        when = max(deadline, self._last_tick + _MIN_TICK_GAP_S)
        if timer is not None:
            # Our own record of the deadline: uvloop hands a plain Handle (no when()) for
            # a time already past.
            if self._timer_when == when:
                return
            timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        loop, node = self._loop, self._node
        if loop is None or node is None or not self.running:
            return
        now = loop.time()
        self._last_tick = now
        node.tick(now)
        self._flush()

    # -- receiving --------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        node, loop = self._node, self._loop
        if node is None or loop is None or not self.running:
            return
        stats = self.stats
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        if len(data) > self._max_datagram:
            self._drop("oversized", f"{len(data)} bytes", addr)
            return
        try:
            sender, payload = self._opener.open(data, self._wall())
        except AuthError as exc:
            self._drop(exc.reason, str(exc), addr)
            return
        if sender == self.member_id:
            self._drop("replayed", "our own datagram came back", addr)
            return
        if not payload:
            self._drop("malformed", f"empty payload from {sender}", addr)
            return
        kind, body = payload[0], payload[1:]
        bound = bool(data[3] & FLAG_BOUND)  # checked by the opener: signed
        if kind != Kind.GOSSIP and not bound:
            self._drop("malformed", f"unbound type {kind} datagram from {sender}", addr)
            return
        if kind not in (Kind.GOSSIP, Kind.APP, Kind.PUNCH):
            self._drop("malformed", f"unknown type {kind} from {sender}", addr)
            return
        self._learn(sender, addr)
        if kind == Kind.GOSSIP:
            node.receive(loop.time(), sender, body)
            self._flush()
        elif kind == Kind.APP:
            stats.app_in += 1
            callback = self.on_app_message
            if callback is not None:
                try:
                    callback(sender, body)
                except Exception:
                    stats.callback_errors += 1
                    logger.exception("%s: on_app_message callback failed", self.member_id)
        else:
            stats.punches_in += 1
            if body == b"":
                node.heard_from(loop.time(), sender)

    def _learn(self, sender: str, addr: Address) -> None:
        learned = self._learned
        if learned.get(sender) == addr:
            learned.move_to_end(sender)
            return
        learned[sender] = addr
        learned.move_to_end(sender)
        if len(learned) > self._max_peers:
            learned.popitem(last=False)

    def _drop(self, reason: str, detail: str, addr: Address) -> None:
        self.stats.dropped[reason] += 1
        logger.debug(
            "%s: dropped datagram from %s:%s (%s): %s", self.member_id, *addr, reason, detail
        )
        self._unwarned[reason] = self._unwarned.get(reason, 0) + 1
        now = self._loop.time() if self._loop is not None else 0.0
        if now >= self._next_warn:
            self._next_warn = now + self._warn_interval_s
            summary = ", ".join(f"{k} {v}" for k, v in sorted(self._unwarned.items()))
            self._unwarned = {}
            logger.warning(
                "%s: dropped unauthenticated or invalid datagrams (%s; last from %s:%s)",
                self.member_id,
                summary,
                *addr,
            )

    def _on_socket_error(self, exc: Exception) -> None:
        self.stats.send_errors += 1
        logger.debug("%s: socket error: %s", self.member_id, exc)

    def _on_closed(self) -> None:
        closed = self._closed
        if closed is not None and not closed.done():
            closed.set_result(None)


__all__ = [
    "DROP_REASONS",
    "Address",
    "GossipService",
    "Kind",
    "ServiceStats",
    "address_from_meta_default",
    "address_meta",
]
