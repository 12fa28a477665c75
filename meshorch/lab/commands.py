"""The ``ip``/``iptables`` argv lists that build and tear down a planned lab (pure).

The adapter runs them in order; nothing here touches the system, so the exact commands
are unit-tested without root.
"""

from __future__ import annotations

import shlex

from meshorch.lab.errors import LabPlanError
from meshorch.lab.plan import (
    MULTICAST_NET,
    ROUTER_LAN_IFNAME,
    ROUTER_WAN_IFNAME,
    Bridge,
    HostPlan,
    LabPlan,
    SitePlan,
    VethPair,
)

Argv = list[str]


def rule_tag(prefix: str) -> str:
    """The iptables comment on every rule the lab adds, so its rules can be found."""
    return f"meshorch-lab:{prefix}"


def ip_netns_exec(netns: str, *argv: str) -> Argv:
    return ["ip", "netns", "exec", netns, *argv]


def nsenter_net(netns: str, *argv: str) -> Argv:
    """Run in the namespace's network only. ``ip netns exec`` also gives the command a
    mount namespace with a fresh /sys, which hides the cgroup mounts runc needs."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def iptables(netns: str, *args: str) -> Argv:
    # -w: wait for the xtables lock instead of failing when another run holds it.
    return ip_netns_exec(netns, "iptables", "-w", *args)


def _netns_commands(netns: str) -> list[Argv]:
    # Loopback up: services bound to 127.0.0.1 (and the kernel's own lo use) need it.
    return [["ip", "netns", "add", netns], ["ip", "-n", netns, "link", "set", "lo", "up"]]


def _bridge_commands(bridge: Bridge) -> list[Argv]:
    # No multicast snooping: without an IGMP querier on the LAN, a snooping bridge may
    # stop forwarding multicast, and mDNS discovery between hosts depends on it.
    return [
        [
            "ip", "-n", bridge.netns, "link", "add", bridge.name,
            "type", "bridge", "mcast_snooping", "0",
        ],
        ["ip", "-n", bridge.netns, "link", "set", bridge.name, "up"],
    ]  # fmt: skip


def _veth_commands(pair: VethPair) -> list[Argv]:
    # Both ends are born in their namespaces: an interrupted build leaves nothing in root.
    return [
        [
            "ip", "-n", pair.netns, "link", "add", pair.name, "type", "veth",
            "peer", "name", pair.peer, "netns", pair.peer_netns,
        ],
        ["ip", "-n", pair.peer_netns, "link", "set", pair.peer, "master", pair.bridge, "up"],
        ["ip", "-n", pair.netns, "addr", "add", pair.address, "dev", pair.name],
        ["ip", "-n", pair.netns, "link", "set", pair.name, "up"],
    ]  # fmt: skip


def router_commands(plan: LabPlan, site: SitePlan) -> list[Argv]:
    """Build site ``site``'s LAN bridge and router (namespaces must exist)."""
    tag = rule_tag(plan.prefix)
    out = _bridge_commands(Bridge(site.lan_netns, site.bridge))
    for pair in plan.router_veths(site):
        out += _veth_commands(pair)
    r = site.router_netns
    out += [
        ip_netns_exec(r, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
        iptables(
            r, "-t", "nat", "-A", "POSTROUTING", "-s", site.lan_subnet,
            "-o", ROUTER_WAN_IFNAME, "-m", "comment", "--comment", tag, "-j", "MASQUERADE",
        ),
        # A real NAT box: replies come back in, nothing new does, even for a WAN peer
        # that has a route to the LAN (a missing route alone would be a weaker fence).
        iptables(
            r, "-A", "FORWARD", "-i", ROUTER_WAN_IFNAME, "-o", ROUTER_LAN_IFNAME,
            "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
            "-m", "comment", "--comment", tag, "-j", "ACCEPT",
        ),
        iptables(
            r, "-A", "FORWARD", "-i", ROUTER_WAN_IFNAME, "-o", ROUTER_LAN_IFNAME,
            "-m", "comment", "--comment", tag, "-j", "DROP",
        ),
        # Nor UDP to the router itself: otherwise an unsolicited datagram to its WAN address
        # creates a conntrack entry that takes the very address pair a LAN host's reply
        # needs, the reply is remapped to another port, and UDP hole punching fails.
        iptables(
            r, "-A", "INPUT", "-i", ROUTER_WAN_IFNAME, "-p", "udp",
            "-m", "conntrack", "--ctstate", "NEW,INVALID",
            "-m", "comment", "--comment", tag, "-j", "DROP",
        ),
    ]  # fmt: skip
    return out


def host_commands(plan: LabPlan, host: HostPlan) -> list[Argv]:
    """Create and wire one host (its site's LAN and router must exist)."""
    site = plan.site(host.site)
    out = _netns_commands(host.netns) + _veth_commands(plan.host_veth(host))
    out += [
        ["ip", "-n", host.netns, "route", "add", "default", "via", site.gateway_ip],
        # Multicast leaves by the LAN whatever the default route: mDNS must stay local.
        ["ip", "-n", host.netns, "route", "add", MULTICAST_NET, "dev", host.ifname],
    ]
    return out


def plan_stages(plan: LabPlan) -> list[tuple[str, list[Argv]]]:
    """``plan_commands`` in labelled stages, for progress output."""
    netns: list[Argv] = []
    for name in (plan.wan_netns, plan.hub_netns):
        netns += _netns_commands(name)
    for site in plan.sites:
        netns += _netns_commands(site.lan_netns) + _netns_commands(site.router_netns)
    wan = _bridge_commands(Bridge(plan.wan_netns, plan.wan_bridge))
    wan += _veth_commands(plan.hub_veth())
    stages = [("namespaces", netns), (f"WAN {plan.wan_subnet} and hub {plan.hub_ip}", wan)]
    for site in plan.sites:
        stages.append(
            (f"site {site.name}: LAN {site.lan_subnet}, router", router_commands(plan, site))
        )
        stages += [(f"host {h.name} {h.lan_ip}", host_commands(plan, h)) for h in site.hosts]
    return stages


def plan_commands(plan: LabPlan) -> list[Argv]:
    """Every command that builds ``plan`` from nothing, in order."""
    return [argv for _, cmds in plan_stages(plan) for argv in cmds]


def teardown_commands(plan: LabPlan) -> list[Argv]:
    """Delete everything ``plan_commands`` creates, hosts first.

    Deleting a namespace deletes its interfaces, bridges and iptables rules, and a veth
    pair dies with either end, so namespaces are all there is to delete. Each command may
    fail because its object is already gone: the adapter tolerates that (idempotence).
    """
    return [["ip", "netns", "del", netns] for netns in reversed(plan.namespaces)]


TEMPLATE_FIELDS = ("site", "host", "lan_ip", "data_dir", "netns", "hub_ip", "prefix")


def render_command(template: str, values: dict[str, str]) -> Argv:
    """Split ``template`` like a shell would, then fill ``{placeholders}`` per word.

    Splitting first keeps a value with spaces (a data dir) one argument. ``{{``/``}}``
    give literal braces.
    """
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise LabPlanError(f"bad command template {template!r}: {exc}") from exc
    if not words:
        raise LabPlanError("empty command template")
    try:
        return [w.format_map(values) for w in words]
    except KeyError as exc:
        known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        raise LabPlanError(
            f"unknown placeholder {{{exc.args[0]}}} in {template!r} (known: {known})"
        ) from None
    except (ValueError, IndexError) as exc:
        raise LabPlanError(f"bad command template {template!r}: {exc}") from exc
