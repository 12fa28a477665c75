"""Partition rules: pure, no root."""

from __future__ import annotations

import pytest

from meshorch.lab import LabLookupError, LabPlanError, plan_lab, plan_partition
from meshorch.lab.partition import PartitionRule, partition_tag, rules_to_delete

PLAN = plan_lab(2, 2, "mo")


def _summary(rules: list[PartitionRule]) -> set[tuple[str, str, str, str]]:
    return {(r.netns, r.chain, r.match, r.address) for r in rules}


def test_hosts_of_one_site_drop_each_other_in_both_namespaces() -> None:
    pair, rules = plan_partition(PLAN, "s1-h2", "s1-h1")
    assert pair == ("s1-h1", "s1-h2")
    assert _summary(rules) == {
        ("mo-s1-h1", "INPUT", "-s", "10.1.0.12"),
        ("mo-s1-h1", "OUTPUT", "-d", "10.1.0.12"),
        ("mo-s1-h2", "INPUT", "-s", "10.1.0.11"),
        ("mo-s1-h2", "OUTPUT", "-d", "10.1.0.11"),
    }
    assert {r.comment for r in rules} == {"meshorch-lab:mo:part:s1-h1~s1-h2"}


def test_host_and_hub_is_enforced_in_the_host_only() -> None:
    _, rules = plan_partition(PLAN, "hub", "s2-h1")
    assert _summary(rules) == {
        ("mo-s2-h1", "INPUT", "-s", "172.30.0.2"),
        ("mo-s2-h1", "OUTPUT", "-d", "172.30.0.2"),
    }


def test_sites_are_enforced_in_both_routers_including_forward() -> None:
    _, rules = plan_partition(PLAN, "s1", "s2")
    assert _summary(rules) == {
        ("mo-s1-r", "INPUT", "-s", "172.30.0.12"),
        ("mo-s1-r", "FORWARD", "-s", "172.30.0.12"),
        ("mo-s1-r", "OUTPUT", "-d", "172.30.0.12"),
        ("mo-s1-r", "FORWARD", "-d", "172.30.0.12"),
        ("mo-s2-r", "INPUT", "-s", "172.30.0.11"),
        ("mo-s2-r", "FORWARD", "-s", "172.30.0.11"),
        ("mo-s2-r", "OUTPUT", "-d", "172.30.0.11"),
        ("mo-s2-r", "FORWARD", "-d", "172.30.0.11"),
    }


def test_site_and_hub_both_sides() -> None:
    _, rules = plan_partition(PLAN, "s1", "hub")
    assert {r.netns for r in rules} == {"mo-s1-r", "mo-hub"}
    assert {r.address for r in rules if r.netns == "mo-hub"} == {"172.30.0.11"}
    assert {r.address for r in rules if r.netns == "mo-s1-r"} == {"172.30.0.2"}


def test_hosts_of_different_sites_drop_the_other_sites_public_address() -> None:
    _, rules = plan_partition(PLAN, "s1-h1", "s2-h2")
    assert _summary(rules) == {
        ("mo-s1-h1", "INPUT", "-s", "172.30.0.12"),
        ("mo-s1-h1", "OUTPUT", "-d", "172.30.0.12"),
        ("mo-s2-h2", "INPUT", "-s", "172.30.0.11"),
        ("mo-s2-h2", "OUTPUT", "-d", "172.30.0.11"),
    }


def test_host_and_other_site_in_the_host_only() -> None:
    _, rules = plan_partition(PLAN, "s2", "s1-h1")
    assert {r.netns for r in rules} == {"mo-s1-h1"}
    assert {r.address for r in rules} == {"172.30.0.12"}


@pytest.mark.parametrize(("a", "b"), [("s1-h1", "s1-h1"), ("hub", "hub"), ("s1", "s1-h2")])
def test_nonsense_pairs_are_refused(a: str, b: str) -> None:
    with pytest.raises(LabPlanError):
        plan_partition(PLAN, a, b)


def test_unknown_endpoint() -> None:
    with pytest.raises(LabLookupError, match="s1-h7"):
        plan_partition(PLAN, "s1-h1", "s1-h7")
    with pytest.raises(LabLookupError, match="'hub', a site"):
        plan_partition(PLAN, "s1-h1", "shop")


def test_insert_and_delete_use_the_same_spec() -> None:
    _, rules = plan_partition(PLAN, "s1-h1", "s1-h2")
    rule = rules[0]
    insert, delete = rule.insert_argv(), rule.delete_argv()
    assert insert[:7] == ["ip", "netns", "exec", rule.netns, "iptables", "-w", "-I"]
    assert delete[:7] == ["ip", "netns", "exec", rule.netns, "iptables", "-w", "-D"]
    assert insert[7:] == delete[7:]
    assert insert[-2:] == ["-j", "DROP"]


IPTABLES_S = """\
-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-A INPUT -s 10.1.0.12/32 -m comment --comment "meshorch-lab:mo:part:s1-h1~s1-h2" -j DROP
-A INPUT -s 10.1.0.13/32 -m comment --comment "meshorch-lab:mo:part:s1-h1~s1-h20" -j DROP
-A INPUT -s 10.9.9.9/32 -m comment --comment "meshorch-lab:mox:part:s1-h1~s1-h2" -j DROP
-A FORWARD -i wan0 -o lan0 -m comment --comment meshorch-lab:mo -j DROP
-A OUTPUT -d 10.1.0.12/32 -m comment --comment "meshorch-lab:mo:part:s1-h1~s1-h2" -j DROP
-A OUTPUT -d 8.8.8.8/32 -j DROP
"""


def test_rules_to_delete_exactly_the_pair() -> None:
    tag = partition_tag("mo", ("s1-h1", "s1-h2"))
    assert rules_to_delete(IPTABLES_S, tag) == [
        ["-D", "INPUT", "-s", "10.1.0.12/32", "-m", "comment", "--comment", tag, "-j", "DROP"],
        ["-D", "OUTPUT", "-d", "10.1.0.12/32", "-m", "comment", "--comment", tag, "-j", "DROP"],
    ]


def test_rules_to_delete_all_partitions_of_the_lab_only() -> None:
    found = rules_to_delete(IPTABLES_S, partition_tag("mo"), prefix=True)
    assert [r[3] for r in found] == ["10.1.0.12/32", "10.1.0.13/32", "10.1.0.12/32"]
