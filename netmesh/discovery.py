"""mDNS discovery of a site's agents (zeroconf, asyncio).

Each agent advertises ``_meshorch._tcp.local.`` with TXT properties:

    site  site name            host  host name (unique in the site)
    join  join endpoint ip:port  pk  WireGuard public key (base64)
    v     protocol version, "1"

The pure part is ``parse_peer_record`` and ``PeerTable`` (what we know, from
what we were told); ``SiteDiscovery`` only feeds zeroconf's callbacks into it.
Records of other sites are ignored, malformed ones are ignored and counted:
anyone on the LAN can advertise anything, so nothing here is trusted beyond
"worth asking to join"; the join handshake authenticates.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from netmesh.errors import DiscoveryError, DiscoveryTimeout, InvalidKeyError, RemoteRecordError
from netmesh.keys import decode_key
from netmesh.wireguard import normalize_endpoint

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_meshorch._tcp.local."
PROTOCOL_VERSION = "1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class DiscoveredPeer:
    """An agent of our site as its mDNS record describes it."""

    site: str
    host: str
    join_endpoint: str
    public_key_b64: str
    version: str
    addresses: tuple[str, ...] = ()
    service_name: str = ""


def validate_name(value: str, what: str) -> str:
    """Site and host names: DNS-label-like, so they fit TXT and host names."""
    if not _NAME_RE.match(value):
        raise DiscoveryError(f"bad {what} name {value!r} (letters, digits, '-', max 63)")
    return value


def _text(props: Mapping[bytes, bytes | None], key: str) -> str:
    raw = props.get(key.encode("ascii"))
    if raw is None:
        raise RemoteRecordError(f"TXT property {key!r} missing")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteRecordError(f"TXT property {key!r} is not UTF-8") from exc


def parse_peer_record(
    properties: Mapping[bytes, bytes | None],
    *,
    addresses: Sequence[str] = (),
    service_name: str = "",
) -> DiscoveredPeer:
    """Parse a TXT record into a DiscoveredPeer, or raise RemoteRecordError."""
    version = _text(properties, "v")
    if version != PROTOCOL_VERSION:
        raise RemoteRecordError(f"unsupported protocol version {version!r}")
    site = _text(properties, "site")
    host = _text(properties, "host")
    join = _text(properties, "join")
    pk = _text(properties, "pk")
    try:
        validate_name(site, "site")
        validate_name(host, "host")
    except DiscoveryError as exc:
        raise RemoteRecordError(str(exc)) from exc
    try:
        join = normalize_endpoint(join)
    except ValueError as exc:
        raise RemoteRecordError(f"bad join endpoint {join!r}: {exc}") from exc
    try:
        decode_key(pk)
    except InvalidKeyError as exc:
        raise RemoteRecordError(f"bad public key: {exc}") from exc
    return DiscoveredPeer(
        site=site,
        host=host,
        join_endpoint=join,
        public_key_b64=pk,
        version=version,
        addresses=tuple(addresses),
        service_name=service_name,
    )


def record_properties(
    *, site: str, host: str, join_endpoint: str, public_key_b64: str
) -> dict[str, str]:
    """TXT properties that ``parse_peer_record`` accepts (the advertising side)."""
    return {
        "site": site,
        "host": host,
        "join": join_endpoint,
        "pk": public_key_b64,
        "v": PROTOCOL_VERSION,
    }


@dataclass(slots=True)
class PeerTable:
    """What discovery knows about one site; pure, fed by record events.

    ``self_host`` (our own advertisement, seen by our own browser) is kept
    out of ``peers()``.
    """

    site: str
    self_host: str | None = None
    malformed_count: int = 0
    foreign_count: int = 0
    _by_name: dict[str, DiscoveredPeer] = field(default_factory=dict)

    def observe(
        self,
        service_name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Sequence[str] = (),
    ) -> DiscoveredPeer | None:
        """Take in a resolved record; return the peer if it is one of ours."""
        try:
            peer = parse_peer_record(properties, addresses=addresses, service_name=service_name)
        except RemoteRecordError as exc:
            self.malformed_count += 1
            self._by_name.pop(service_name, None)
            logger.info("ignoring malformed mDNS record %s: %s", service_name, exc)
            return None
        if peer.site != self.site:
            self.foreign_count += 1
            self._by_name.pop(service_name, None)
            logger.debug("ignoring %s of site %s", service_name, peer.site)
            return None
        self._by_name[service_name] = peer
        return peer

    def remove(self, service_name: str) -> DiscoveredPeer | None:
        """Forget a record (its goodbye was heard or its TTL ran out)."""
        return self._by_name.pop(service_name, None)

    def peers(self) -> dict[str, DiscoveredPeer]:
        """Peers of our site other than ourselves, keyed by host name.

        Two records claiming one host name: the later service name wins, so the
        answer does not depend on arrival order.
        """
        out: dict[str, DiscoveredPeer] = {}
        for name in sorted(self._by_name):
            peer = self._by_name[name]
            if peer.host != self.self_host:
                out[peer.host] = peer
        return out


def service_instance_name(site: str, host: str) -> str:
    """mDNS instance name of an agent; ``host@site`` keeps (site, host) unique."""
    return f"{host}@{site}.{SERVICE_TYPE}"


def _server_name(site: str, host: str) -> str:
    # A host name of our own, so two agents on one machine never clash on A records.
    digest = hashlib.sha256(f"{site}\0{host}".encode()).hexdigest()[:16]
    return f"meshorch-{digest}.local."


class SiteDiscovery:
    """Advertise this agent and browse the agents of one site, on one interface.

    Use as ``async with SiteDiscovery(site, interface_ip) as d:``, then
    ``await d.advertise(...)``, ``d.peers()``, ``await d.wait_for_peers(n, t)``.
    """

    def __init__(
        self,
        site: str,
        interface_ip: str,
        *,
        resolve_timeout_ms: int = _RESOLVE_TIMEOUT_MS,
    ) -> None:
        self.site = validate_name(site, "site")
        self.interface_ip = interface_ip
        self._resolve_timeout_ms = resolve_timeout_ms
        self._table = PeerTable(site=site)
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        """Open the mDNS sockets on ``interface_ip`` and start browsing."""
        if self._aiozc is not None:
            return
        try:
            self._aiozc = AsyncZeroconf(interfaces=[self.interface_ip], ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise DiscoveryError(f"cannot open mDNS on {self.interface_ip}: {exc}") from exc
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        logger.info("browsing %s on %s for site %s", SERVICE_TYPE, self.interface_ip, self.site)

    async def stop(self) -> None:
        """Withdraw our record (goodbye packets), stop browsing, close sockets."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            # async_close unregisters every service we registered (sends goodbyes).
            await self._aiozc.async_close()
            self._aiozc = None
        self._info = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- advertising

    async def advertise(self, *, host: str, join_endpoint: str, public_key_b64: str) -> None:
        """Announce this agent; calling again with new values updates the record."""
        aiozc = self._require_started()
        validate_name(host, "host")
        props = record_properties(
            site=self.site,
            host=host,
            join_endpoint=normalize_endpoint(join_endpoint),
            public_key_b64=public_key_b64,
        )
        # Refuse to advertise what our own parser would reject as malformed.
        parse_peer_record({k.encode(): v.encode() for k, v in props.items()})
        port = int(props["join"].rpartition(":")[2])
        if self._info is not None and self._table.self_host != host:
            await (await aiozc.async_unregister_service(self._info))
            self._info = None
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            service_instance_name(self.site, host),
            port=port,
            properties=props,
            server=_server_name(self.site, host),
            addresses=[socket.inet_aton(self.interface_ip)],
        )
        self._table.self_host = host
        if self._info is None:
            await (await aiozc.async_register_service(info))
        else:
            await (await aiozc.async_update_service(info))
        self._info = info
        logger.info("advertising %s (join %s)", info.name, props["join"])

    # -- discovered peers

    def peers(self) -> dict[str, DiscoveredPeer]:
        """Currently known peers of our own site (without ourselves), by host name."""
        return self._table.peers()

    @property
    def malformed_count(self) -> int:
        """Records ignored because they were malformed."""
        return self._table.malformed_count

    @property
    def foreign_count(self) -> int:
        """Records ignored because they belong to another site."""
        return self._table.foreign_count

    async def wait_for_peers(self, min_count: int, timeout_s: float) -> dict[str, DiscoveredPeer]:
        """Wait until at least ``min_count`` peers are known; raise DiscoveryTimeout."""
        self._require_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            peers = self.peers()
            if len(peers) >= min_count:
                return peers
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DiscoveryTimeout(
                    f"found {len(peers)} of {min_count} peers of site {self.site} "
                    f"within {timeout_s} s"
                )
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue

    # -- zeroconf plumbing

    def _require_started(self) -> AsyncZeroconf:
        if self._aiozc is None:
            raise DiscoveryError("SiteDiscovery is not started")
        return self._aiozc

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called on the event loop by AsyncServiceBrowser; must not block.
        if state_change is ServiceStateChange.Removed:
            if self._table.remove(name) is not None:
                logger.info("mDNS peer %s went away", name)
            self._changed.set()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(zeroconf, self._resolve_timeout_ms)
        except Exception:  # zeroconf raises assorted errors on bad packets
            logger.debug("resolving %s failed", name, exc_info=True)
            found = False
        if not found:
            logger.debug("no answer resolving %s", name)
            return
        peer = self._table.observe(name, info.properties, info.parsed_addresses(IPVersion.V4Only))
        if peer is not None:
            logger.debug("mDNS peer %s: %s", name, peer)
        self._changed.set()
