"""The lab planner and its commands: pure, no root."""

from __future__ import annotations

import ipaddress

import pytest

from meshorch.lab import (
    LabLookupError,
    LabPlanError,
    host_commands,
    plan_add_host,
    plan_commands,
    plan_lab,
    plan_lab_from_counts,
    plan_stages,
    render_command,
    teardown_commands,
)
from meshorch.lab.plan import (
    IFNAMSIZ_MAX,
    LabPlan,
    is_lab_link,
    is_lab_netns,
    lab_links_in,
    lab_namespaces_in,
)


def _interface_names(plan: LabPlan) -> list[tuple[str, str]]:
    names = [(b.netns, b.name) for b in plan.bridges]
    for v in plan.veths:
        names += [(v.netns, v.name), (v.peer_netns, v.peer)]
    return names


def test_plan_names_and_addresses() -> None:
    plan = plan_lab(2, 2, "mo")
    assert [h.name for h in plan.hosts] == ["s1-h1", "s1-h2", "s2-h1", "s2-h2"]
    assert plan.host("s2-h1").netns == "mo-s2-h1"
    assert plan.host("s2-h1").lan_ip == "10.2.0.11"
    assert plan.site("s1").wan_ip == "172.30.0.11"
    assert plan.site(2).gateway_ip == "10.2.0.1"
    assert plan.hub_ip == "172.30.0.2"
    assert plan.hub_netns == "mo-hub"
    assert plan.wan_netns == "mo-wan"
    assert plan.site_hosts == (2, 2)


@pytest.mark.parametrize(
    ("prefix", "counts"),
    [("mo", [2, 2]), ("abcdef", [0] * 199 + [200]), ("z9", [3, 0, 5])],
)
def test_names_unique_and_short(prefix: str, counts: list[int]) -> None:
    plan = plan_lab_from_counts(prefix, counts)
    assert len(set(plan.namespaces)) == len(plan.namespaces)
    names = _interface_names(plan)
    assert len(set(names)) == len(names), "an interface name is used twice in a namespace"
    assert all(len(name) <= IFNAMSIZ_MAX for _, name in names)
    # Names outside the hosts' own eth0 carry the prefix, so leftovers can be found.
    for netns, name in names:
        assert netns.startswith(prefix + "-")
        if netns in (plan.wan_netns, *(s.lan_netns for s in plan.sites)):
            assert is_lab_link(prefix, name), name
    assert all(is_lab_netns(prefix, n) for n in plan.namespaces)


def test_addresses_distinct_and_in_their_subnets() -> None:
    plan = plan_lab(3, 4, "mo")
    ips = [n.ip for n in plan.nodes] + [s.gateway_ip for s in plan.sites]
    assert len(set(ips)) == len(ips)
    wan = ipaddress.IPv4Network(plan.wan_subnet)
    assert ipaddress.IPv4Address(plan.hub_ip) in wan
    for site in plan.sites:
        lan = ipaddress.IPv4Network(site.lan_subnet)
        assert ipaddress.IPv4Address(site.wan_ip) in wan
        assert ipaddress.IPv4Address(site.gateway_ip) in lan
        assert not lan.overlaps(wan)
        for host in site.hosts:
            assert ipaddress.IPv4Address(host.lan_ip) in lan
    lans = [ipaddress.IPv4Network(s.lan_subnet) for s in plan.sites]
    assert not any(a.overlaps(b) for i, a in enumerate(lans) for b in lans[i + 1 :])


@pytest.mark.parametrize("prefix", ["", "Mo", "1a", "a-b", "abcdefg", "mo_x"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(LabPlanError, match="prefix"):
        plan_lab(1, 1, prefix)


@pytest.mark.parametrize(("sites", "hosts"), [(0, 1), (201, 1), (1, 201), (1, -1)])
def test_bad_sizes(sites: int, hosts: int) -> None:
    with pytest.raises(LabPlanError):
        plan_lab(sites, hosts)


def test_lookups() -> None:
    plan = plan_lab(2, 1)
    assert plan.site("2").index == 2
    assert plan.node("s1-r").netns == "mo-s1-r"
    assert plan.node("hub").ip == "172.30.0.2"
    with pytest.raises(LabLookupError, match="no host 's1-h9'"):
        plan.host("s1-h9")
    with pytest.raises(LabLookupError, match="no site"):
        plan.site("s3")
    with pytest.raises(LabLookupError, match="not a site name"):
        plan.site("shop")
    with pytest.raises(LabLookupError, match="no node"):
        plan.node("s1")


def _created_namespaces(cmds: list[list[str]]) -> list[str]:
    return [c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]]


def test_commands_only_touch_lab_namespaces_in_order() -> None:
    plan = plan_lab(2, 2, "mo")
    cmds = plan_commands(plan)
    created: set[str] = set()
    for argv in cmds:
        if argv[:3] == ["ip", "netns", "add"]:
            created.add(argv[3])
            continue
        # Everything else runs in a namespace that already exists: nothing in root.
        if argv[:2] == ["ip", "-n"]:
            netns = argv[2]
        else:
            assert argv[:3] == ["ip", "netns", "exec"], argv
            netns = argv[3]
        assert netns in created, f"{argv} before its namespace"
        if "peer" in argv:
            assert argv[argv.index("netns") + 1] in created
        if "link" in argv and "add" in argv:
            name = argv[argv.index("add") + 1]
            assert len(name) <= IFNAMSIZ_MAX
    assert sorted(created) == sorted(plan.namespaces)
    assert cmds == [c for _, stage in plan_stages(plan) for c in stage]


def test_router_has_forwarding_nat_and_inbound_fence() -> None:
    cmds = plan_commands(plan_lab(1, 1, "mo"))
    router = [c for c in cmds if c[:4] == ["ip", "netns", "exec", "mo-s1-r"]]
    joined = [" ".join(c) for c in router]
    assert any("net.ipv4.ip_forward=1" in c for c in joined)
    assert any(
        "-t nat -A POSTROUTING -s 10.1.0.0/24 -o wan0" in c and "MASQUERADE" in c for c in joined
    )
    assert any("FORWARD -i wan0 -o lan0" in c and c.endswith("DROP") for c in joined)
    assert all("meshorch-lab:mo" in c for c in joined if "iptables" in c)


def test_hosts_get_default_route_and_multicast_on_lan() -> None:
    plan = plan_lab(1, 1, "mo")
    cmds = host_commands(plan, plan.host("s1-h1"))
    assert ["ip", "-n", "mo-s1-h1", "route", "add", "default", "via", "10.1.0.1"] in cmds
    assert ["ip", "-n", "mo-s1-h1", "route", "add", "224.0.0.0/4", "dev", "eth0"] in cmds
    assert ["ip", "-n", "mo-s1-h1", "link", "set", "lo", "up"] in cmds
    bridges = [c for c in plan_commands(plan) if "bridge" in c]
    assert bridges and all(c[-2:] == ["mcast_snooping", "0"] for c in bridges)


def test_teardown_covers_everything_up_creates() -> None:
    plan = plan_lab(3, 2, "mo")
    up = plan_commands(plan)
    down = teardown_commands(plan)
    deleted = [c[3] for c in down if c[:3] == ["ip", "netns", "del"]]
    assert len(deleted) == len(down)
    assert sorted(deleted) == sorted(_created_namespaces(up))
    # Interfaces and bridges are created inside namespaces only, so deleting those
    # namespaces deletes them: check that no link is created in the root namespace.
    for argv in up:
        if "link" in argv and "add" in argv:
            assert argv[:2] == ["ip", "-n"] and argv[2] in deleted
            if "peer" in argv:
                assert argv[argv.index("netns") + 1] in deleted
    # Hosts go before the switches they hang off.
    assert deleted.index("mo-s1-h1") < deleted.index("mo-s1-lan") < deleted.index("mo-wan")


def test_add_host() -> None:
    plan = plan_lab(2, 2, "mo")
    bigger, host = plan_add_host(plan, "s1")
    assert (host.name, host.lan_ip, host.netns) == ("s1-h3", "10.1.0.13", "mo-s1-h3")
    assert bigger.site_hosts == (3, 2)
    assert bigger.site("s2") == plan.site("s2")
    assert _created_namespaces(host_commands(bigger, host)) == ["mo-s1-h3"]
    assert "mo-s1-h3" in [c[3] for c in teardown_commands(bigger)]
    with pytest.raises(LabLookupError):
        plan_add_host(plan, "s5")


def test_leftover_matching_is_exact_per_prefix() -> None:
    names = ["mo-wan", "mo-hub", "mo-s1-lan", "mo-s12-r", "mo-s3-h10", "mox-s1-h1", "mo-foo",
             "mo-s1", "other", "mo-s1-h1-x"]  # fmt: skip
    assert lab_namespaces_in("mo", names) == [
        "mo-wan",
        "mo-hub",
        "mo-s1-lan",
        "mo-s12-r",
        "mo-s3-h10",
    ]
    assert lab_namespaces_in("mox", names) == ["mox-s1-h1"]
    links = ["mowan", "mohub", "mos1lan", "mos1r", "mos1w", "mos2h3", "moss1h1", "mos1", "eth0"]
    assert lab_links_in("mo", links) == ["mowan", "mohub", "mos1lan", "mos1r", "mos1w", "mos2h3"]
    assert lab_links_in("mos", links) == ["moss1h1"]


def test_render_command() -> None:
    values = {"host": "s1-h1", "data_dir": "/tmp/my data", "lan_ip": "10.1.0.11"}
    argv = render_command("agent --id {host} --data {data_dir} --ip={lan_ip} '{{x}}'", values)
    assert argv == ["agent", "--id", "s1-h1", "--data", "/tmp/my data", "--ip=10.1.0.11", "{x}"]
    with pytest.raises(LabPlanError, match=r"unknown placeholder \{nope\}"):
        render_command("agent {nope}", values)
    with pytest.raises(LabPlanError, match="empty"):
        render_command("  ", values)
    with pytest.raises(LabPlanError, match="bad command template"):
        render_command("agent 'unclosed", values)
