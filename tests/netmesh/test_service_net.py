"""The site's endpoints and the DNS answers, ingress routes and isolation rules derived
from them (pure)."""

from __future__ import annotations

from meshorch.apps.records import InstanceReport
from meshorch.apps.scheduler import Placement
from meshorch.apps.spec import parse_app_spec
from meshorch.net import services as service_net

SPEC = """
api_version: meshorch/v1
name: shop
version: "{version}"
services:
  - name: web
    replicas: 2
    ingress: {{port: 8080, target_port: 80}}
    containers:
      - name: main
        image: busybox:1
        ports: [{{container_port: 80}}, {{container_port: 9100}}]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
  - name: db
    containers:
      - name: main
        image: busybox:1
        ports: [{{container_port: 5432}}]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
"""
ADDRESSES = {"h1": "10.99.0.1", "h2": "10.99.0.2", "h3": "10.99.0.3"}


def placement(instance: str, service: str, host: str, app: str = "shop") -> Placement:
    return Placement(instance, app, service, 0, "1", host, 100, 32 << 20)


def report(instance: str, host: str, ready: bool = True, version: str = "1") -> InstanceReport:
    return InstanceReport(instance, host, version, "running", ready, 0, 0.0)


def world(
    *, web2_ready: bool = True, alive: tuple[str, ...] = ("h1", "h2", "h3")
) -> list[service_net.Endpoint]:
    apps = {
        ("shop", "1"): (parse_app_spec(SPEC.format(version="1")), "acme"),
        ("other", "1"): (
            parse_app_spec(SPEC.format(version="1").replace("shop", "other")),
            "globex",
        ),
    }
    placements = [
        placement("shop.web.0", "web", "h1"),
        placement("shop.web.1", "web", "h2"),
        placement("shop.db.0", "db", "h3"),
        placement("other.web.0", "web", "h3", app="other"),
    ]
    reports = {
        "shop.web.0": report("shop.web.0", "h1"),
        "shop.web.1": report("shop.web.1", "h2", ready=web2_ready),
        "shop.db.0": report("shop.db.0", "h3"),
        "other.web.0": report("other.web.0", "h3"),
    }
    return service_net.build_endpoints(placements, reports, apps, ADDRESSES, alive)


def test_dns_answers_ready_instances_on_live_hosts_only() -> None:
    assert service_net.resolve(world(), "web", "shop", "acme") == ["10.99.0.1", "10.99.0.2"]
    assert service_net.resolve(world(web2_ready=False), "web", "shop", "acme") == ["10.99.0.1"]
    assert service_net.resolve(world(alive=("h3",)), "web", "shop", "acme") == []
    assert service_net.resolve(world(), "web", "shop", "globex") is None  # not that tenant's
    assert service_net.resolve(world(), "nope", "shop", "acme") is None


def test_an_outdated_or_misplaced_report_is_not_ready() -> None:
    apps = {("shop", "1"): (parse_app_spec(SPEC.format(version="1")), "acme")}
    stale = {"shop.web.0": report("shop.web.0", "h1", version="0")}
    moved = {"shop.web.0": report("shop.web.0", "h2")}
    for reports in (stale, moved):
        endpoints = service_net.build_endpoints(
            [placement("shop.web.0", "web", "h1")], reports, apps, ADDRESSES, ADDRESSES
        )
        assert service_net.resolve(endpoints, "web", "shop", "acme") == []


def test_ingress_routes_go_to_ready_backends_and_a_port_has_one_owner() -> None:
    routes = service_net.ingress_routes(world())
    # "other" asks for 8080 too; "other.web.0" sorts first, so it owns the port.
    assert routes == {8080: [("10.99.0.3", 80)]}
    endpoints = [e for e in world(web2_ready=False) if e.app == "shop"]
    assert service_net.ingress_routes(endpoints) == {8080: [("10.99.0.1", 80)]}


def test_isolation_rules_let_a_tenant_reach_its_own_ports_only() -> None:
    rules = service_net.isolation_rules(world(), local_host="h3")
    acme, globex = service_net.tenant_uid("acme"), service_net.tenant_uid("globex")
    assert acme != globex
    db = [r for r in rules if "5432" in r]
    assert [r[r.index("--uid-owner") + 1] for r in db if r[1] == "10.99.0.3"] == [
        str(acme),
        f"{service_net.TENANT_UID_BASE}-{service_net.TENANT_UID_BASE + 99_999}",
    ]
    # Loopback rules only for the instances of this host (h3: shop.db and other.web).
    loopback_ports = {r[r.index("--dport") + 1] for r in rules if r[1] == "127.0.0.0/8"}
    assert loopback_ports == {"5432", "80", "9100"}
    elsewhere = service_net.isolation_rules(world(), local_host="h9")
    assert not any(r[1] == "127.0.0.0/8" for r in elsewhere)
    document = service_net.iptables_restore_input(rules)
    assert document.startswith("*filter\n:MESHORCH-ISOLATE - [0:0]\n-F MESHORCH-ISOLATE\n")
    assert document.endswith("COMMIT\n") and document.count("-A MESHORCH-ISOLATE") == len(rules)


def test_tenant_uids_are_stable_and_clashes_are_found() -> None:
    uid = service_net.tenant_uid("acme")
    assert uid == service_net.tenant_uid("acme")
    assert service_net.TENANT_UID_BASE <= uid < service_net.TENANT_UID_BASE + 100_000
    assert service_net.uid_clashes(["acme", "globex", "acme"]) == []


def test_no_tenant_uid_reaches_the_agents_own_ports_on_any_address() -> None:
    agent = [("tcp", 7700), ("udp", 7700), ("tcp", 7800), ("udp", 51820)]
    rules = service_net.isolation_rules(world(), local_host="h3", agent_ports=agent)
    uid_range = f"{service_net.TENANT_UID_BASE}-{service_net.TENANT_UID_BASE + 99_999}"
    first = rules[: len(agent)]  # before any rule that lets a tenant through
    assert [(r[1], r[3]) for r in first] == [("tcp", "7700"), ("tcp", "7800"), ("udp", "7700"),
                                             ("udp", "51820")]  # fmt: skip
    for rule in first:
        assert "-d" not in rule  # every address: LAN, overlay, loopback
        assert rule[rule.index("--uid-owner") + 1] == uid_range and "REJECT" in rule
    assert not any(r[r.index("--dport") + 1] == "53" for r in first)  # the site DNS stays
    assert len(rules) == len(agent) + len(service_net.isolation_rules(world(), "h3"))


def test_bridge_rules_refuse_agent_ports_and_other_tenants_from_every_bridge() -> None:
    agent = [("tcp", 7700), ("udp", 7700), ("tcp", 7800), ("udp", 51820)]
    lan = {"h1": {"10.1.0.11"}, "h2": {"10.1.0.12"}, "h3": {"10.1.0.13"}}
    chains = service_net.bridge_isolation_rules(world(), "h1", lan, agent)
    inbound, forward = chains[service_net.INPUT_CHAIN], chains[service_net.FORWARD_CHAIN]
    acme, globex = service_net.tenant_bridge("acme"), service_net.tenant_bridge("globex")
    assert acme == f"mo-u{service_net.tenant_uid('acme')}" and len(acme) <= 15
    # Replies pass, and only what comes from a bridge is looked at.
    for chain in (inbound, forward):
        assert chain[0][-1] == "RETURN" and "ESTABLISHED" in chain[0][3]
        assert chain[1] == ["!", "-i", "mo-+", "-j", "RETURN"]
    # INPUT: every agent port, on any address of this host; the DNS port is not among them.
    assert [(r[1], r[3]) for r in inbound[2:]] == [("tcp", "7700"), ("tcp", "7800"),
                                                   ("udp", "7700"), ("udp", "51820")]  # fmt: skip
    assert all("-d" not in r and "REJECT" in r for r in inbound[2:])
    assert not any("53" in r for r in inbound + forward)
    # FORWARD: agent ports on other hosts, then a tenant's own bridge, then no other bridge.
    ports = [r[r.index("--ctorigdstport") + 1] for r in forward[2:6]]
    assert ports == ["7700", "7800", "7700", "51820"]
    others = next(i for i, r in enumerate(forward) if r[:2] == ["-o", "mo-+"])
    assert "REJECT" in forward[others]
    for bridge in (acme, globex):
        assert forward.index(["-i", bridge, "-o", bridge, "-j", "RETURN"]) < others
    # Other hosts' instances, on each of their addresses: their tenant's bridge only.
    db = [r for r in forward if "--ctorigdst" in r and r[r.index("--ctorigdstport") + 1] == "5432"]
    assert {r[r.index("--ctorigdst") + 1] for r in db} == {"10.99.0.3", "10.1.0.13"}
    for returned, rejected in zip(db[::2], db[1::2], strict=True):
        assert returned[:2] == ["-i", acme] and returned[-1] == "RETURN"
        assert "-i" not in rejected and "REJECT" in rejected
    other = [r for r in forward if "--ctorigdst" in r and "-i" in r and r[1] == globex]
    assert {r[r.index("--ctorigdstport") + 1] for r in other} == {"80", "9100"}
    # This host's instances need no address rules: their published ports lead to a bridge.
    assert not any("10.99.0.1" in r or "10.1.0.11" in r for r in forward)
    document = service_net.iptables_restore_input([], chains)
    assert ":MESHORCH-ISOLATE-IN - [0:0]" in document and "-F MESHORCH-ISOLATE-FWD" in document
    assert document.count("-A MESHORCH-ISOLATE-FWD") == len(forward)
