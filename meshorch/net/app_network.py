"""The agent's application networking: site DNS, the ingress address, tenant isolation.

An instance's ports are published on its host (podman: its own network namespace; the
process runtime: the host's network); an instance is reached at its host's overlay
address (WireGuard between hosts) and its container port. This adapter turns the replicated state
into the site's endpoints (``meshorch.net.services``) and keeps three things in step:

- the DNS server (``meshorch.net.dns``) on this host answering
  ``SERVICE.APP.TENANT.site.meshorch`` from the endpoints on every query; containers get
  it as their resolver (podman ``--dns``);
- on the Raft leader only, the site's ingress address (``--ingress-address CIDR``) and a
  TCP forwarder per ingress port to the ready instances (``meshorch.net.ingress``); losing
  leadership releases both, the new leader claims them (gratuitous ARP moves the address);
- with podman as root, tenant isolation: containers run as their tenant's uid, each in a
  network namespace of its own on its tenant's bridge (``meshorch.runtime.podman``), and
  iptables chains on every host (``meshorch.net.services.bridge_isolation_rules``) reject,
  from any tenant's bridge: the agent's ports (API, gossip, Raft, WireGuard) on every
  address of this host and of other hosts; another tenant's instances, on this host (any
  address, or its containers' own) and on other hosts (every address the site knows of
  them). Allowed: the site DNS (this host's overlay address, port 53), the tenant's own
  instances everywhere, the ingress address, and anything outside the site. A container
  cannot reach the host's loopback at all. Traffic from the bridges is masqueraded, so
  the host a container runs on is the only one that can tell tenants apart, and filters.
  Containers on the host's network (podman ``network="host"``) are held by uid in OUTPUT
  instead (``isolation_rules``). The rules stay when the agent stops: its containers go
  on running. Without isolation (not root, no iptables) a container still cannot reach
  the host's loopback, but gets what a stranger on the LAN gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp

from meshorch.apps.records import (
    INST_PREFIX,
    STATUS_PREFIX,
    InstanceReport,
    appver_key,
    decode_app,
    decode_placement,
)
from meshorch.apps.scheduler import Placement
from meshorch.errors import ConfigurationError
from meshorch.net import services as service_net
from meshorch.net.ingress import Backends, Ingresses
from meshorch.net.vip import Vip
from meshorch.runtime._proc import run_command
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE
from raft import RaftStatus

if TYPE_CHECKING:
    from meshorch.apps.spec import AppSpec
    from meshorch.net.dns import SiteDns

logger = logging.getLogger(__name__)

DNS_ZONE = "site.meshorch"
DNS_PORT = 53
SYNC_S = 0.25
ENDPOINTS_MAX_AGE_S = 0.2  # host liveness changes without a Raft write
# A peer that has not answered a ping for this long is left out of DNS answers and
# ingress backends. A dead host's TCP connections (Raft's) can take seconds to time out
# when it vanishes without closing them (power loss, a cut link); pings say it sooner.
PING_EVERY_S = 0.25
PING_TIMEOUT_S = 0.5
PEER_SILENT_S = 1.2
IPTABLES_TIMEOUT_S = 10.0
SIOCGIFADDR = 0x8915  # ioctl: an interface's IPv4 address (linux/sockios.h)


@dataclass(frozen=True)
class NetworkSettings:
    # Where this host's DNS server listens: "auto" (the overlay address, port 53, in mesh
    # mode; none otherwise), "off", or HOST:PORT.
    dns: str = "auto"
    dns_upstream: tuple[tuple[str, int], ...] | None = None  # None: from /etc/resolv.conf
    ingress_address: str | None = None  # CIDR on the site LAN, held by the leader
    ingress_device: str | None = None  # None: the interface holding an address of its subnet
    isolate_tenants: bool | None = None  # None: when running podman as root


class WatchedState(SiteState, Protocol):
    """The replicated state, and a call when leadership moves (the ingress follows it)."""

    def on_leader_change(self, listener: Callable[[RaftStatus], None]) -> None: ...


class AppNetwork:
    def __init__(
        self,
        site: WatchedState,
        members: Members,
        *,
        host_id: str,
        overlay_ip: str | None,
        runtime: str,
        agent_ports: tuple[tuple[str, int], ...] = (),
        settings: NetworkSettings | None = None,
    ) -> None:
        self.agent_ports = agent_ports  # ("tcp", 7700)...: no tenant's container reaches them
        self.site = site
        self.members = members
        self.host_id = host_id
        self.overlay_ip = overlay_ip  # None: not a mesh site, so no DNS address of its own
        self.runtime = runtime  # the runtime's name: podman containers get DNS, isolation
        self.settings = settings or NetworkSettings()
        self._cache: tuple[int, frozenset[str], float, list[service_net.Endpoint]] | None = None
        self._apps: dict[tuple[str, str], tuple[AppSpec, str]] = {}
        self._rules: str | None = None
        self.dns: SiteDns | None = None
        self.ingress_held = False
        self._last_ping: dict[str, float] = {}  # host id -> when it last answered a ping

    # -- what the reconciler asks ---------------------------------------------------------

    def isolating(self, runtime: str) -> bool:
        wanted = self.settings.isolate_tenants
        if wanted is None:
            return (
                runtime == "podman" and os.geteuid() == 0 and shutil.which("iptables") is not None
            )
        return wanted and runtime == "podman"

    def dns_address(self) -> tuple[str, int] | None:
        wanted = self.settings.dns
        if wanted == "off":
            return None
        if wanted == "auto":
            return None if self.overlay_ip is None else (self.overlay_ip, DNS_PORT)
        return parse_host_port(wanted, "--dns")

    def dns_servers(self, runtime: str) -> tuple[str, ...]:
        address = self.dns_address()
        if runtime != "podman" or address is None:
            return ()
        if ipaddress.ip_address(address[0]).is_loopback:
            return ()  # a container's loopback is its own: it would ask itself
        return (address[0],)

    def dns_search(self, runtime: str) -> tuple[str, ...]:
        return (DNS_ZONE,) if self.dns_servers(runtime) else ()

    def container_uid(self, runtime: str, tenant: str) -> int | None:
        return service_net.tenant_uid(tenant) if self.isolating(runtime) else None

    # -- endpoints --------------------------------------------------------------------------

    def endpoints(self) -> list[service_net.Endpoint]:
        raft = self.site
        index = raft.view.applied_index()
        now = time.monotonic()
        alive = frozenset(self.alive_hosts(now))
        cached = self._cache
        if (
            cached
            and cached[0] == index
            and cached[1] == alive
            and now - cached[2] < ENDPOINTS_MAX_AGE_S
        ):
            return cached[3]
        view = raft.view
        placements: list[Placement] = [
            decode_placement(r.value) for _, r in view.scan(APPS_TABLE, INST_PREFIX, 1_000_000)[0]
        ]
        reports = {
            key[len(STATUS_PREFIX) :].decode(): InstanceReport.decode(r.value)
            for key, r in view.scan(APPS_TABLE, STATUS_PREFIX, 1_000_000)[0]
        }
        for placement in placements:
            wanted = (placement.app, placement.version)
            if wanted not in self._apps:
                record = view.get(APPS_TABLE, appver_key(*wanted))
                if record is not None:
                    app = decode_app(record.value)
                    self._apps[wanted] = (app.spec, app.tenant)
        addresses = {
            m.host_id: m.overlay_ip or service_net.host_address(m.raft)
            for m in self.members.members()
        }
        endpoints = service_net.build_endpoints(placements, reports, self._apps, addresses, alive)
        self._cache = (index, alive, now, endpoints)
        return endpoints

    def alive_hosts(self, now: float) -> set[str]:
        """Hosts Raft hears from, less peers that stopped answering pings (a peer not
        pinged yet counts as alive: Raft says so)."""
        silent = {host for host, last in self._last_ping.items() if now - last > PEER_SILENT_S}
        return self.members.reachable_hosts() - silent

    async def _ping_peers(self) -> None:
        timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT_S)
        in_flight: dict[str, asyncio.Task[None]] = {}
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def ping(host_id: str, api: str) -> None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"http://{api}/v1/ping") as response:
                        if response.status == 204:
                            self._last_ping[host_id] = time.monotonic()

            try:
                while True:
                    me = self.host_id
                    peers = {m.host_id: m.api for m in self.members.members() if m.host_id != me}
                    for host_id in list(self._last_ping):
                        if host_id not in peers:
                            del self._last_ping[host_id]
                    now = time.monotonic()
                    for host_id, api in peers.items():
                        self._last_ping.setdefault(host_id, now)  # it must answer soon
                        busy = in_flight.get(host_id)
                        if api and (busy is None or busy.done()):
                            # One task per peer: a dead one does not delay the others.
                            in_flight[host_id] = asyncio.create_task(ping(host_id, api))
                    await asyncio.sleep(PING_EVERY_S)
            finally:
                for task in in_flight.values():
                    task.cancel()
                await asyncio.gather(*in_flight.values(), return_exceptions=True)

    def resolve(self, service: str, app: str, tenant: str) -> list[str] | None:
        return service_net.resolve(self.endpoints(), service, app, tenant)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        from meshorch.net.ingress import Ingresses

        ingresses = Ingresses()
        vip = self._vip()
        changed = asyncio.Event()  # leadership moved: act now, not at the next pass
        self.site.on_leader_change(lambda _status: changed.set())
        pinger = asyncio.create_task(self._ping_peers(), name="peer-pings")
        try:
            await self._start_dns()
            while True:
                try:
                    if self.isolating(self.runtime):
                        await self._isolate()
                    if vip is not None:
                        await self._ingress(ingresses, vip)
                except Exception as exc:  # retried at the next pass
                    logger.warning("site network: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SYNC_S):
                        await changed.wait()
                changed.clear()
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            await ingresses.apply({})
            if vip is not None and self.ingress_held:
                with contextlib.suppress(Exception):
                    await vip.release()
            await self._stop_dns()

    async def _start_dns(self) -> None:
        address = self.dns_address()
        if address is None:
            return
        # dnspython: loaded only when this host serves the site's DNS.
        from meshorch.net.dns import SiteDns, upstream_from_resolv_conf

        host, port = address
        upstream = self.settings.dns_upstream
        if upstream is None:
            upstream = tuple(upstream_from_resolv_conf())
        dns = SiteDns(self.resolve, host=host, port=port, zone=DNS_ZONE, upstream=upstream)
        await dns.start()
        self.dns = dns
        logger.info("site DNS on %s:%d (zone %s)", host, dns.port, DNS_ZONE)

    async def _stop_dns(self) -> None:
        dns, self.dns = self.dns, None
        if dns is not None:
            await dns.stop()

    def _vip(self) -> Vip | None:
        address = self.settings.ingress_address
        if address is None:
            return None
        device = self.settings.ingress_device or lan_device_for(address)
        return Vip(address, device)

    async def _ingress(self, ingresses: Ingresses, vip: Vip) -> None:
        leader = self.site.status().is_leader
        address = str(ipaddress.ip_interface(self.settings.ingress_address or "").ip)
        if leader:
            announce = not self.ingress_held
            if announce:
                await vip.add()
                self.ingress_held = True
            routes = service_net.ingress_routes(self.endpoints())
            await ingresses.apply({(address, port): self._backends(port) for port in routes})
            if announce:  # listening already: neighbours' new connections land here
                await vip.announce()
                logger.info("ingress address %s held by this host", address)
        elif self.ingress_held:
            await ingresses.apply({})
            await vip.release()
            self.ingress_held = False
            logger.info("ingress address %s released (no longer the leader)", address)

    def _backends(self, port: int) -> Backends:
        def current() -> list[tuple[str, int]]:
            return service_net.ingress_routes(self.endpoints()).get(port, [])

        return current

    def host_addresses(self) -> dict[str, set[str]]:
        """Every address the site knows of each host (overlay, LAN, API, Raft)."""
        found: dict[str, set[str]] = {}
        for m in self.members.members():
            texts = [m.overlay_ip, service_net.host_address(m.raft)]
            texts += [service_net.host_address(a) for a in (m.api, m.wg_endpoint) if a]
            for text in texts:
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(text or "")
                    if address.version == 4 and not (address.is_unspecified or address.is_loopback):
                        found.setdefault(m.host_id, set()).add(str(address))
        return found

    async def _isolate(self) -> None:
        endpoints = self.endpoints()
        rules = service_net.isolation_rules(endpoints, self.host_id, self.agent_ports)
        bridged = service_net.bridge_isolation_rules(
            endpoints, self.host_id, self.host_addresses(), self.agent_ports
        )
        document = service_net.iptables_restore_input(rules, bridged)
        if document == self._rules:
            return
        if self._rules is None:
            await _ensure_jump()
        result = await run_command(
            ["iptables-restore", "-w", "--noflush"],
            timeout_s=IPTABLES_TIMEOUT_S,
            input_data=document.encode(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"iptables-restore failed: {result.stderr_text}")
        self._rules = document
        logger.info("tenant isolation: %d rules", len(rules))


_BUILT_IN = frozenset({"INPUT", "OUTPUT", "FORWARD"})
_JUMPS = (
    ("OUTPUT", service_net.ISOLATION_CHAIN),
    ("INPUT", service_net.INPUT_CHAIN),
    ("FORWARD", service_net.FORWARD_CHAIN),
    # CNI's firewall plugin puts its jump first in FORWARD when a container starts, and
    # accepts everything from a container there; it calls this chain before that.
    ("CNI-ADMIN", service_net.FORWARD_CHAIN),
)


async def _ensure_jump() -> None:
    timeout = IPTABLES_TIMEOUT_S
    for hook, chain in _JUMPS:
        for made in (hook, chain):
            if made not in _BUILT_IN:  # a chain that exists already is fine
                await run_command(["iptables", "-w", "-N", made], timeout_s=timeout)
        check = await run_command(["iptables", "-w", "-C", hook, "-j", chain], timeout_s=timeout)
        if check.returncode != 0:
            await run_command(["iptables", "-w", "-I", hook, "1", "-j", chain], timeout_s=timeout)


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigurationError(f"{flag}: expected IP:PORT, got {text!r}")
    return host.strip("[]"), number


def lan_device_for(address_cidr: str) -> str:
    """The interface holding an address in the subnet of ``address_cidr``."""
    network = ipaddress.ip_interface(address_cidr).network

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                request = struct.pack("256s", name.encode()[:15])
                raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue
        if ipaddress.ip_address(raw[20:24]) in network:
            return name
    raise ValueError(f"no interface has an address in {network} for the ingress address")
