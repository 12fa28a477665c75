"""Who serves what at a site, and the network rules that follow from it (pure).

From the replicated state (placements, the instances' reports, the apps and their
tenants, the hosts' addresses) and the set of hosts this agent hears from, build the
site's *endpoints*: one per instance, with its tenant, app, service, host address, ports
and whether it is ready. Everything the agent does with the network derives from them:

- DNS (``meshorch.net.dns``): ``SERVICE.APP.TENANT.site.meshorch`` -> the addresses of
  the hosts running a ready instance (an instance's ports are published on its host, so it
  is reached at its host's overlay address and its container port, over WireGuard);
- ingress: the site's ingress port of a service -> its ready instances' (address, port);
- tenant isolation: a container runs as its tenant's uid (``tenant_uid``) in a network
  namespace on its tenant's bridge (``tenant_bridge``), and every host rejects what comes
  in from a tenant's bridge towards the agent's ports or another tenant's instances
  (``bridge_isolation_rules``, iptables INPUT and FORWARD). Containers on the host's
  network are held by their uid instead (``isolation_rules``, ``owner`` match in OUTPUT).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshorch.apps.records import InstanceReport
from meshorch.apps.scheduler import Placement
from meshorch.apps.spec import AppSpec
from meshorch.runtime.base import BRIDGE_PREFIX, bridge_name

TENANT_UID_BASE = 300_000
TENANT_UID_SPAN = 100_000
ISOLATION_CHAIN = "MESHORCH-ISOLATE"  # OUTPUT: containers on the host's network
INPUT_CHAIN = "MESHORCH-ISOLATE-IN"  # INPUT: from a bridge to this host
FORWARD_CHAIN = "MESHORCH-ISOLATE-FWD"  # FORWARD: from a bridge to anywhere else


@dataclass(frozen=True, slots=True)
class Endpoint:
    tenant: str
    app: str
    service: str
    instance_id: str
    host_id: str
    address: str
    ports: tuple[int, ...]
    ready: bool  # ready by its host's report, on a host this agent hears from
    ingress: tuple[int, int] | None = None  # (site port, target port)


def host_address(raft_address: str) -> str:
    """The host part of ``HOST:PORT`` (``[v6]:port`` too)."""
    host = raft_address.rpartition(":")[0]
    return host.strip("[]")


def build_endpoints(
    placements: Iterable[Placement],
    reports: Mapping[str, InstanceReport],
    apps: Mapping[tuple[str, str], tuple[AppSpec, str]],
    host_addresses: Mapping[str, str],
    alive_hosts: Iterable[str],
) -> list[Endpoint]:
    """``apps`` maps (app, version) to (spec, tenant); hosts without an address and
    placements whose spec is unknown are left out."""
    alive = set(alive_hosts)
    endpoints: list[Endpoint] = []
    for placement in placements:
        found = apps.get((placement.app, placement.version))
        address = host_addresses.get(placement.host_id)
        if found is None or address is None:
            continue
        spec, tenant = found
        service = spec.service(placement.service)
        if service is None:
            continue
        report = reports.get(placement.instance_id)
        ready = (
            report is not None
            and report.ready
            and report.version == placement.version
            and report.host_id == placement.host_id
            and placement.host_id in alive
        )
        ingress = service.ingress
        endpoints.append(
            Endpoint(
                tenant,
                placement.app,
                placement.service,
                placement.instance_id,
                placement.host_id,
                address,
                service.ports,
                ready,
                None if ingress is None else (ingress.port, ingress.target_port),
            )
        )
    return endpoints


def resolve(endpoints: Iterable[Endpoint], service: str, app: str, tenant: str) -> list[str] | None:
    """Addresses of the ready instances of a service; ``[]`` if it has none ready right
    now, ``None`` if the site has no such service."""
    known = False
    addresses: set[str] = set()
    for e in endpoints:
        if e.service == service and e.app == app and e.tenant == tenant:
            known = True
            if e.ready:
                addresses.add(e.address)
    return sorted(addresses) if known else None


def ingress_routes(endpoints: Iterable[Endpoint]) -> dict[int, list[tuple[str, int]]]:
    """Site port -> ready backends. A port two apps ask for goes to the one whose
    instance id sorts first (deterministic on every host); the other gets none."""
    owner: dict[int, tuple[str, str]] = {}
    routes: dict[int, list[tuple[str, int]]] = {}
    for e in sorted(endpoints, key=lambda e: e.instance_id):
        if e.ingress is None:
            continue
        port, target = e.ingress
        claimant = owner.setdefault(port, (e.app, e.service))
        if claimant != (e.app, e.service):
            continue
        backends = routes.setdefault(port, [])
        if e.ready and (e.address, target) not in backends:
            backends.append((e.address, target))
    return routes


def tenant_uid(tenant: str) -> int:
    """The uid a tenant's containers run as (stable on every host, no coordination).

    Two tenants could share one (a 1 in 100,000 chance per pair); ``uid_clashes``
    finds it so the agent can say so.
    """
    digest = hashlib.sha256(tenant.encode()).digest()
    return TENANT_UID_BASE + int.from_bytes(digest[:8], "big") % TENANT_UID_SPAN


def uid_clashes(tenants: Iterable[str]) -> list[tuple[str, str]]:
    seen: dict[int, str] = {}
    clashes = []
    for tenant in sorted(set(tenants)):
        other = seen.setdefault(tenant_uid(tenant), tenant)
        if other != tenant:
            clashes.append((other, tenant))
    return clashes


def isolation_rules(
    endpoints: Iterable[Endpoint],
    local_host: str,
    agent_ports: Iterable[tuple[str, int]] = (),
) -> list[list[str]]:
    """iptables rules (arguments after ``-A CHAIN``) for the OUTPUT chain of every host.

    A socket owned by a tenant uid may connect to a tenant's instance port only if it
    is that tenant's uid; other sockets (the agent, the host) are not restricted.
    Instances on this host are also reachable on the loopback addresses. No tenant uid
    reaches the agent's own ports (``agent_ports``: protocol and port: its API, Raft,
    gossip, WireGuard) on any address; the site DNS is not among them.
    """
    uid_range = f"{TENANT_UID_BASE}-{TENANT_UID_BASE + TENANT_UID_SPAN - 1}"
    rules: list[list[str]] = []
    for protocol, port in sorted(set(agent_ports)):
        reject = ["--reject-with", "tcp-reset"] if protocol == "tcp" else []
        rules.append(
            ["-p", protocol, "--dport", str(port), "-m", "owner", "--uid-owner", uid_range,
             "-j", "REJECT", *reject]
        )  # fmt: skip
    seen: set[tuple[str, int, str]] = set()
    for e in sorted(endpoints, key=lambda e: (e.address, e.ports, e.tenant)):
        destinations = [e.address] + (["127.0.0.0/8"] if e.host_id == local_host else [])
        for destination in destinations:
            for port in e.ports:
                if (destination, port, e.tenant) in seen:
                    continue
                seen.add((destination, port, e.tenant))
                owner = str(tenant_uid(e.tenant))
                match = ["-d", destination, "-p", "tcp", "--dport", str(port), "-m", "owner"]
                rules.append([*match, "--uid-owner", owner, "-j", "RETURN"])
                rules.append(
                    [*match, "--uid-owner", uid_range, "-j", "REJECT", "--reject-with", "tcp-reset"]
                )
    return rules


def tenant_bridge(tenant: str) -> str:
    """The bridge a tenant's containers are on, on every host (podman, isolated)."""
    return bridge_name(tenant_uid(tenant))


def _reject(protocol: str) -> list[str]:
    # A reset fails the caller at once, not after a timeout.
    return ["-j", "REJECT", *(["--reject-with", "tcp-reset"] if protocol == "tcp" else [])]


# In FORWARD a port unreachable: a reset to a connection whose destination was rewritten
# (a published port) never reaches the caller, the ICMP error does (and reads "refused").
_FORWARD_REJECT = ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"]


def bridge_isolation_rules(
    endpoints: Iterable[Endpoint],
    local_host: str,
    host_addresses: Mapping[str, Iterable[str]],
    agent_ports: Iterable[tuple[str, int]] = (),
) -> dict[str, list[list[str]]]:
    """iptables rules (arguments after ``-A CHAIN``) by chain, for containers on bridges.

    ``INPUT_CHAIN``: nothing from a tenant's bridge reaches the agent's ports
    (``agent_ports``) on any address of this host; the site DNS is not among them.
    ``FORWARD_CHAIN``: nothing from a tenant's bridge reaches the agent's ports of another
    host, nor, on this host, another bridge (another tenant's published ports on any
    address of this host, or its containers' own addresses); a tenant's connections to an
    instance on another host (``host_addresses``: every address the site knows of that
    host) go through only if the instance is its own. Matched on the original
    destination (conntrack), before port publishing rewrites it.
    """
    bridges = f"{BRIDGE_PREFIX}+"
    head = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"],
            ["!", "-i", bridges, "-j", "RETURN"]]  # fmt: skip
    inbound = [list(rule) for rule in head]
    forward = [list(rule) for rule in head]
    for protocol, port in sorted(set(agent_ports)):
        inbound.append(["-p", protocol, "--dport", str(port), *_reject(protocol)])
        forward.append(
            ["-p", protocol, "-m", "conntrack", "--ctproto", protocol,
             "--ctorigdstport", str(port), *_FORWARD_REJECT]
        )  # fmt: skip
    endpoints = sorted(endpoints, key=lambda e: (e.host_id, e.ports, e.tenant))
    for bridge in sorted({tenant_bridge(e.tenant) for e in endpoints}):
        forward.append(["-i", bridge, "-o", bridge, "-j", "RETURN"])
    forward.append(["-o", bridges, *_FORWARD_REJECT])
    seen: set[tuple[str, int, str]] = set()
    for e in endpoints:
        if e.host_id == local_host:
            continue  # covered above: published ports here lead to a bridge
        for address in sorted(set(host_addresses.get(e.host_id, ())) | {e.address}):
            for port in e.ports:
                if (address, port, e.tenant) in seen:
                    continue
                seen.add((address, port, e.tenant))
                match = ["-p", "tcp", "-m", "conntrack", "--ctproto", "tcp",
                         "--ctorigdst", address, "--ctorigdstport", str(port)]  # fmt: skip
                forward.append(["-i", tenant_bridge(e.tenant), *match, "-j", "RETURN"])
                forward.append([*match, *_FORWARD_REJECT])
    return {INPUT_CHAIN: inbound, FORWARD_CHAIN: forward}


def iptables_restore_input(
    rules: Iterable[list[str]], extra: Mapping[str, Iterable[list[str]]] | None = None
) -> str:
    """An ``iptables-restore --noflush`` document that replaces the chains' rules at once:
    ``rules`` in ``ISOLATION_CHAIN``, ``extra`` by chain name."""
    chains: dict[str, Iterable[list[str]]] = {ISOLATION_CHAIN: rules, **(extra or {})}
    lines = ["*filter"]
    lines += [f":{chain} - [0:0]" for chain in chains]
    for chain, chain_rules in chains.items():
        lines.append(f"-F {chain}")
        lines += [" ".join([f"-A {chain}", *rule]) for rule in chain_rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
