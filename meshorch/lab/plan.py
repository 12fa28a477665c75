"""The lab's topology as plain data: names, addresses and links (pure, no I/O).

Every piece of the lab lives in a network namespace of its own, never in the root
namespace:

- ``{p}-wan`` holds the WAN bridge ``{p}wan``. A dedicated namespace rather than the
  root one because the root namespace belongs to the machine: its firewall (a Docker
  ``FORWARD DROP`` policy, ``br_netfilter`` hooks) would filter our bridged frames, our
  subnets could clash with real routes, and a crashed run would leave debris there.
  Inside a namespace, deleting the namespace deletes the bridge and every port with it.
- ``{p}-hub`` is the hub, with one leg on the WAN.
- ``{p}-sN-lan`` holds site N's LAN bridge ``{p}sNlan`` (same reasons as the WAN).
- ``{p}-sN-r`` is site N's router: ``wan0`` on the WAN, ``lan0`` on the LAN, NAT between.
- ``{p}-sN-hM`` is host M of site N, ``eth0`` on the site LAN.

Veth pairs are created directly with each end in its namespace, so nothing ever passes
through the root namespace, even when a build is interrupted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Literal

from meshorch.lab.errors import LabLookupError, LabPlanError

DEFAULT_PREFIX = "mo"
# Short, lowercase and without dashes: names stay within IFNAMSIZ and "{p}-" is an
# unambiguous namespace prefix (prefix "mo" never matches lab "mox"'s namespaces).
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
IFNAMSIZ_MAX = 15

WAN_SUBNET = ipaddress.IPv4Network("172.30.0.0/24")
HUB_WAN_IP = ipaddress.IPv4Address("172.30.0.2")
ROUTER_WAN_BASE = 10  # site N's router is 172.30.0.(10+N)
HOST_LAN_BASE = 10  # host M of a site is 10.N.0.(10+M)
MAX_SITES = 200
MAX_HOSTS_PER_SITE = 200

HOST_IFNAME = "eth0"
HUB_IFNAME = "eth0"
ROUTER_WAN_IFNAME = "wan0"
ROUTER_LAN_IFNAME = "lan0"
MULTICAST_NET = "224.0.0.0/4"

NodeKind = Literal["hub", "router", "host"]


@dataclass(frozen=True, slots=True)
class Bridge:
    """A Linux bridge living in ``netns``."""

    netns: str
    name: str


@dataclass(frozen=True, slots=True)
class VethPair:
    """A veth pair: ``name`` in ``netns`` (with ``address``), ``peer`` on ``bridge``."""

    netns: str
    name: str
    peer_netns: str
    peer: str
    bridge: str
    address: str  # CIDR on the ``netns`` end


@dataclass(frozen=True, slots=True)
class HostPlan:
    site: int
    index: int
    name: str  # "s1-h2"
    netns: str
    ifname: str
    lan_ip: str
    port: str  # the bridge-side veth end, in the site's LAN namespace


@dataclass(frozen=True, slots=True)
class SitePlan:
    index: int
    name: str  # "s1"
    lan_netns: str
    bridge: str
    lan_subnet: str
    gateway_ip: str  # the router's LAN address, the hosts' default route
    router_name: str  # "s1-r"
    router_netns: str
    wan_ip: str  # the router's WAN address: the site's public (NAT) address
    router_lan_port: str
    router_wan_port: str
    hosts: tuple[HostPlan, ...]


@dataclass(frozen=True, slots=True)
class Node:
    """Anything with an IP stack that commands can run in."""

    name: str
    kind: NodeKind
    netns: str
    ip: str  # LAN address for hosts, WAN address for the hub and routers
    site: int | None


@dataclass(frozen=True, slots=True)
class LabPlan:
    prefix: str
    wan_netns: str
    wan_bridge: str
    wan_subnet: str
    hub_netns: str
    hub_ip: str
    hub_port: str
    sites: tuple[SitePlan, ...]

    @property
    def hosts(self) -> tuple[HostPlan, ...]:
        return tuple(h for s in self.sites for h in s.hosts)

    @property
    def site_hosts(self) -> tuple[int, ...]:
        """Host count per site: with the prefix, all that is needed to rebuild the plan."""
        return tuple(len(s.hosts) for s in self.sites)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace, in creation order (switches before what plugs into them)."""
        names = [self.wan_netns, self.hub_netns]
        for s in self.sites:
            names += [s.lan_netns, s.router_netns]
        names += [h.netns for h in self.hosts]
        return tuple(names)

    @property
    def bridges(self) -> tuple[Bridge, ...]:
        lans = (Bridge(s.lan_netns, s.bridge) for s in self.sites)
        return (Bridge(self.wan_netns, self.wan_bridge), *lans)

    @property
    def veths(self) -> tuple[VethPair, ...]:
        pairs = [self.hub_veth()]
        for s in self.sites:
            pairs += self.router_veths(s)
            pairs += [self.host_veth(h) for h in s.hosts]
        return tuple(pairs)

    def hub_veth(self) -> VethPair:
        address = f"{self.hub_ip}/{WAN_SUBNET.prefixlen}"
        return VethPair(
            self.hub_netns, HUB_IFNAME, self.wan_netns, self.hub_port, self.wan_bridge, address
        )

    def router_veths(self, site: SitePlan) -> tuple[VethPair, VethPair]:
        """The router's WAN leg, then its LAN leg."""
        wan = VethPair(
            site.router_netns,
            ROUTER_WAN_IFNAME,
            self.wan_netns,
            site.router_wan_port,
            self.wan_bridge,
            f"{site.wan_ip}/{WAN_SUBNET.prefixlen}",
        )
        lan = VethPair(
            site.router_netns,
            ROUTER_LAN_IFNAME,
            site.lan_netns,
            site.router_lan_port,
            site.bridge,
            f"{site.gateway_ip}/{_prefixlen(site.lan_subnet)}",
        )
        return wan, lan

    def host_veth(self, host: HostPlan) -> VethPair:
        site = self.site(host.site)
        address = f"{host.lan_ip}/{_prefixlen(site.lan_subnet)}"
        return VethPair(host.netns, host.ifname, site.lan_netns, host.port, site.bridge, address)

    @property
    def nodes(self) -> tuple[Node, ...]:
        out = [Node("hub", "hub", self.hub_netns, self.hub_ip, None)]
        for s in self.sites:
            out.append(Node(s.router_name, "router", s.router_netns, s.wan_ip, s.index))
            out += [Node(h.name, "host", h.netns, h.lan_ip, s.index) for h in s.hosts]
        return tuple(out)

    def site(self, name: str | int) -> SitePlan:
        """Site by name (``s2``), bare number (``2``) or index."""
        index = _site_index(name)
        for s in self.sites:
            if s.index == index:
                return s
        raise LabLookupError(
            f"no site {name!r} in lab {self.prefix!r} (sites: {self._site_names()})"
        )

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise LabLookupError(f"no host {name!r} in lab {self.prefix!r} (hosts: {known})")

    def node(self, name: str) -> Node:
        """Hub (``hub``), router (``s1-r``) or host (``s1-h2``) by name."""
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise LabLookupError(f"no node {name!r} in lab {self.prefix!r} (nodes: {known})")

    def _site_names(self) -> str:
        return ", ".join(s.name for s in self.sites) or "none"


def _prefixlen(cidr: str) -> int:
    return ipaddress.IPv4Network(cidr).prefixlen


def _site_index(name: str | int) -> int:
    if isinstance(name, int):
        return name
    match = re.fullmatch(r"s?(\d+)", name.strip())
    if match is None:
        raise LabLookupError(f"not a site name: {name!r} (expected e.g. 's1')")
    return int(match.group(1))


def validate_prefix(prefix: str) -> str:
    if not PREFIX_RE.fullmatch(prefix):
        raise LabPlanError(
            f"bad lab prefix {prefix!r}: 1-6 chars, lowercase letter first, then letters "
            "or digits (it starts every namespace and interface name)"
        )
    return prefix


def _plan_host(prefix: str, site: int, index: int) -> HostPlan:
    lan = _lan_subnet(site)
    return HostPlan(
        site=site,
        index=index,
        name=f"s{site}-h{index}",
        netns=f"{prefix}-s{site}-h{index}",
        ifname=HOST_IFNAME,
        lan_ip=str(lan.network_address + HOST_LAN_BASE + index),
        port=f"{prefix}s{site}h{index}",
    )


def _lan_subnet(site: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{site}.0.0/24")


def _plan_site(prefix: str, site: int, hosts: int) -> SitePlan:
    lan = _lan_subnet(site)
    return SitePlan(
        index=site,
        name=f"s{site}",
        lan_netns=f"{prefix}-s{site}-lan",
        bridge=f"{prefix}s{site}lan",
        lan_subnet=str(lan),
        gateway_ip=str(lan.network_address + 1),
        router_name=f"s{site}-r",
        router_netns=f"{prefix}-s{site}-r",
        wan_ip=str(WAN_SUBNET.network_address + ROUTER_WAN_BASE + site),
        router_lan_port=f"{prefix}s{site}r",
        router_wan_port=f"{prefix}s{site}w",
        hosts=tuple(_plan_host(prefix, site, m) for m in range(1, hosts + 1)),
    )


def plan_lab_from_counts(prefix: str, site_hosts: tuple[int, ...] | list[int]) -> LabPlan:
    """Plan a lab whose site N (1-based) has ``site_hosts[N-1]`` hosts."""
    validate_prefix(prefix)
    if not 1 <= len(site_hosts) <= MAX_SITES:
        raise LabPlanError(f"a lab has 1..{MAX_SITES} sites, not {len(site_hosts)}")
    for n, count in enumerate(site_hosts, start=1):
        if not 0 <= count <= MAX_HOSTS_PER_SITE:
            raise LabPlanError(f"site s{n}: 0..{MAX_HOSTS_PER_SITE} hosts, not {count}")
    plan = LabPlan(
        prefix=prefix,
        wan_netns=f"{prefix}-wan",
        wan_bridge=f"{prefix}wan",
        wan_subnet=str(WAN_SUBNET),
        hub_netns=f"{prefix}-hub",
        hub_ip=str(HUB_WAN_IP),
        hub_port=f"{prefix}hub",
        sites=tuple(_plan_site(prefix, n, c) for n, c in enumerate(site_hosts, start=1)),
    )
    _check_names(plan)
    return plan


def plan_lab(sites: int, hosts_per_site: int, prefix: str = DEFAULT_PREFIX) -> LabPlan:
    """Plan a lab of ``sites`` sites with ``hosts_per_site`` hosts each."""
    if sites < 1:
        raise LabPlanError(f"a lab needs at least one site, not {sites}")
    return plan_lab_from_counts(prefix, [hosts_per_site] * sites)


def plan_add_host(plan: LabPlan, site: str | int) -> tuple[LabPlan, HostPlan]:
    """The plan with one more host on ``site``, and that host."""
    target = plan.site(site)
    if len(target.hosts) >= MAX_HOSTS_PER_SITE:
        raise LabPlanError(f"site {target.name} already has {MAX_HOSTS_PER_SITE} hosts")
    host = _plan_host(plan.prefix, target.index, len(target.hosts) + 1)
    grown = replace(target, hosts=(*target.hosts, host))
    new = replace(plan, sites=tuple(grown if s.index == target.index else s for s in plan.sites))
    _check_names(new)
    return new, host


def _check_names(plan: LabPlan) -> None:
    # The sizes are validated above, so this only fires if the naming scheme changes.
    per_netns: set[tuple[str, str]] = set()
    names = [(b.netns, b.name) for b in plan.bridges]
    for v in plan.veths:
        names += [(v.netns, v.name), (v.peer_netns, v.peer)]
    for netns, name in names:
        if len(name) > IFNAMSIZ_MAX:
            raise LabPlanError(f"interface name {name!r} is longer than {IFNAMSIZ_MAX} chars")
        if (netns, name) in per_netns:
            raise LabPlanError(f"interface name {name!r} used twice in {netns}")
        per_netns.add((netns, name))
    if len(set(plan.namespaces)) != len(plan.namespaces):
        raise LabPlanError("namespace names collide")


# Leftover detection: what a lab with this prefix may have created, whatever its size.
def _netns_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(wan|hub|s\d+-(lan|r|h\d+))$")


def _link_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}(wan|hub|s\d+(lan|r|w|h\d+))$")


def is_lab_netns(prefix: str, name: str) -> bool:
    return _netns_re(prefix).fullmatch(name) is not None


def is_lab_link(prefix: str, name: str) -> bool:
    return _link_re(prefix).fullmatch(name) is not None


def lab_namespaces_in(prefix: str, netns_names: list[str] | tuple[str, ...]) -> list[str]:
    """The names among ``netns_names`` that belong to the lab ``prefix``."""
    return [n for n in netns_names if is_lab_netns(prefix, n)]


def lab_links_in(prefix: str, link_names: list[str] | tuple[str, ...]) -> list[str]:
    """The interface names among ``link_names`` that belong to the lab ``prefix``."""
    return [n for n in link_names if is_lab_link(prefix, n)]
