"""Partitions: which iptables DROP rules cut two parts of the lab apart (pure).

An endpoint is the hub (``hub``), a site (``s1``: its router) or a host (``s1-h2``).
Rules go where the other side can be told apart precisely:

- hosts of one site see each other's LAN addresses: rules in both hosts;
- anything sees the hub and a site (its router's WAN address) precisely;
- a host behind NAT is seen from outside its site only as the site's public address, so
  a hub or another site cannot single it out: the rules go in the host alone. Between
  hosts of different sites neither side can, so both hosts drop the other *site's*
  public address, which also cuts each from the rest of the other site.

Every rule carries a comment naming the pair, so ``heal`` deletes exactly those rules
(found by listing the rules, so it also works when the state file is gone).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from meshorch.lab.commands import Argv, iptables, rule_tag
from meshorch.lab.errors import LabLookupError, LabPlanError
from meshorch.lab.plan import LabPlan

EndpointKind = Literal["hub", "site", "host"]
Chain = Literal["INPUT", "OUTPUT", "FORWARD"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    kind: EndpointKind
    site: int | None


@dataclass(frozen=True, slots=True)
class PartitionRule:
    netns: str
    chain: Chain
    match: Literal["-s", "-d"]
    address: str
    comment: str

    def spec(self) -> list[str]:
        """The rule without the chain: shared by insert (-I) and delete (-D)."""
        return [self.match, self.address, "-m", "comment", "--comment", self.comment, "-j", "DROP"]

    def insert_argv(self) -> Argv:
        # -I: before the router's ESTABLISHED accept, so live flows are cut too.
        return iptables(self.netns, "-I", self.chain, *self.spec())

    def delete_argv(self) -> Argv:
        return iptables(self.netns, "-D", self.chain, *self.spec())


def parse_endpoint(plan: LabPlan, text: str) -> Endpoint:
    """``hub``, a site (``s1``) or a host (``s1-h2``) of ``plan``."""
    name = text.strip()
    if name == "hub":
        return Endpoint("hub", "hub", None)
    if "-" in name:
        host = plan.host(name)
        return Endpoint(host.name, "host", host.site)
    try:
        site = plan.site(name)
    except LabLookupError:
        raise LabLookupError(
            f"no endpoint {text!r} in lab {plan.prefix!r}: use 'hub', a site ('s1') "
            "or a host ('s1-h1')"
        ) from None
    return Endpoint(site.name, "site", site.index)


def canonical_pair(a: Endpoint, b: Endpoint) -> tuple[str, str]:
    first, second = sorted((a.name, b.name))
    return first, second


def partition_tag(prefix: str, pair: tuple[str, str] | None = None) -> str:
    """The comment of a pair's rules; with no pair, the start common to all of them."""
    base = f"{rule_tag(prefix)}:part:"
    return base if pair is None else f"{base}{pair[0]}~{pair[1]}"


def _sees_precisely(viewer: Endpoint, other: Endpoint) -> bool:
    if other.kind in ("hub", "site"):
        return True
    return viewer.kind == "host" and viewer.site == other.site


def _address_seen(plan: LabPlan, viewer: Endpoint, other: Endpoint) -> str:
    if other.kind == "hub":
        return plan.hub_ip
    if other.kind == "host" and viewer.kind == "host" and viewer.site == other.site:
        return plan.host(other.name).lan_ip
    assert other.site is not None  # hub handled above; sites and hosts have one
    return plan.site(other.site).wan_ip


def _enforce(plan: LabPlan, at: Endpoint, other: Endpoint, tag: str) -> list[PartitionRule]:
    address = _address_seen(plan, at, other)
    chains_in: tuple[Chain, ...] = ("INPUT",)
    chains_out: tuple[Chain, ...] = ("OUTPUT",)
    if at.kind == "hub":
        netns = plan.hub_netns
    elif at.kind == "host":
        netns = plan.host(at.name).netns
    else:
        assert at.site is not None
        # A router drops for itself and for the whole LAN it forwards for.
        netns = plan.site(at.site).router_netns
        chains_in, chains_out = ("INPUT", "FORWARD"), ("OUTPUT", "FORWARD")
    rules = [PartitionRule(netns, c, "-s", address, tag) for c in chains_in]
    rules += [PartitionRule(netns, c, "-d", address, tag) for c in chains_out]
    return rules


def plan_partition(plan: LabPlan, a: str, b: str) -> tuple[tuple[str, str], list[PartitionRule]]:
    """The canonical pair and the DROP rules that cut ``a`` from ``b`` both ways."""
    ea, eb = parse_endpoint(plan, a), parse_endpoint(plan, b)
    if ea.name == eb.name:
        raise LabPlanError(f"cannot partition {ea.name} from itself")
    for x, y in ((ea, eb), (eb, ea)):
        if x.kind == "site" and y.kind == "host" and y.site == x.site:
            raise LabPlanError(
                f"{y.name} is part of {x.name}; partition it from other hosts instead"
            )
    pair = canonical_pair(ea, eb)
    tag = partition_tag(plan.prefix, pair)
    sides = [(x, y) for x, y in ((ea, eb), (eb, ea)) if _sees_precisely(x, y)]
    if not sides:  # hosts of different sites: neither can single out the other
        sides = [(ea, eb), (eb, ea)]
    rules = [r for x, y in sides for r in _enforce(plan, x, y, tag)]
    return pair, rules


def rules_to_delete(iptables_s_output: str, tag: str, *, prefix: bool = False) -> list[list[str]]:
    """From ``iptables -S`` output, the ``-D CHAIN ...`` args of the rules commented
    ``tag`` (or, with ``prefix``, whose comment starts with ``tag``)."""
    out: list[list[str]] = []
    for line in iptables_s_output.splitlines():
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        comment = _comment_of(words)
        if comment is None:
            continue
        if comment == tag or (prefix and comment.startswith(tag)):
            out.append(["-D", *words[1:]])
    return out


def _comment_of(words: list[str]) -> str | None:
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            return words[i + 1]
    return None
