"""A deployment to many sites names them by a Merkle root (central_hub.deltaformat): each
site fetches its proof, not the list, with the real signed link protocol against a real
hub; and only once every site can read one."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import pytest

from central_hub import Hub
from central_hub.deltaformat import MERKLE_ABOVE
from meshorch.fleet import merkle
from meshorch.fleet.delta import parse, verify_batch
from meshorch.state.protocol import FEATURES
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, Site, probe_hosts, spec_text

SITES = MERKLE_ABOVE + 16
ALL = {"max_parallel": SITES}  # one wave: every site in the first delta


async def fleet(make_site: MakeSite, protocol: int, count: int = SITES) -> list[Site]:
    sites = []
    for i in range(count):
        site = await make_site(f"shop-{i:03d}", region="eu" if i < count - 4 else "us")
        status, answer = await site.report({}, hosts=probe_hosts(protocol))
        assert status == 200, answer
        sites.append(site)
    return sites


async def raw_view(site: Site) -> bytes:
    status, answer = await site.request("GET", "/v1/link/deltas?after=0&wait=0")
    assert status == 200, answer
    return orjson.dumps(answer["deltas"][-1])


async def test_a_deployment_to_many_sites_sends_each_its_proof(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    sites = await fleet(make_site, FEATURES["merkle_targets"])
    eu = sites[:-4]  # fleet(): the last four are in region us
    await admin.ok(
        "POST",
        "/v1/apps",
        {"spec": spec_text(), "placement": {"match": {"region": "eu"}, "max_parallel": SITES}},
        202,
    )
    listed = await admin.ok("GET", "/v1/deltas")
    target = listed["deltas"][-1]["target"]
    assert set(target) == {"merkle", "count", "sites"} and target["count"] == len(eu)
    assert target["sites"] == sorted(s.id for s in eu)
    assert listed["deltas"][-1]["format"] == 2

    member, outsider = eu[0], sites[-1]
    assert outsider not in eu
    for site, gets_ops in ((member, True), (outsider, False)):
        view = await raw_view(site)
        envelope = orjson.loads(view)
        assert "targets" not in envelope and "proof" in envelope
        assert ("ops" in envelope) is gets_ops
        # The proof, not the list: a member's view names no other site, a non-member's
        # its two neighbours in the sorted list at most.
        named = [s.id for s in sites if s is not site and s.id.encode() in view]
        assert len(named) <= (0 if gets_ops else 2), named
        assert len(view) < 4_000
        result = await site.sync()
        assert [d.version for d in result.accepted] == [1]
        (delta,) = result.accepted
        assert delta.has_ops is gets_ops and delta.target.includes(site.id) is gets_ops
        assert [op["op"] for op in delta.ops] == (["app.put"] if gets_ops else [])

    # A member's view relayed to another member does not say whether it is for that one.
    relayed = verify_batch([await raw_view(member)], eu[1].trust, member.clock(), eu[1].id)
    assert relayed.rejected is not None and relayed.rejected.reason == "proof_missing"
    assert relayed.accepted == []


async def test_the_hub_hashes_a_merkle_target_once(
    hub: Hub, admin: Operator, make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree the hub builds as it signs a Merkle target serves its sites' proofs: it is
    not built again from the stored list (20,000 hashes at 10,000 sites), nor for the
    next version deployed to the same sites."""
    sites = await fleet(make_site, FEATURES["merkle_targets"])
    built = 0
    tree_of = merkle.Tree.of

    def counting(ids: Iterable[str]) -> merkle.Tree:
        nonlocal built
        built += 1
        return tree_of(ids)

    monkeypatch.setattr(merkle.Tree, "of", staticmethod(counting))
    for version in (1, 2):
        body = {"spec": spec_text(version=f"{version}.0"), "placement": ALL}
        await admin.ok("POST", "/v1/apps", body, 202)
        for site in (sites[0], sites[-1]):
            result = await site.sync()
            assert [d.version for d in result.accepted] == [version]
            (delta,) = result.accepted
            assert delta.target.root and delta.target.includes(site.id)
            assert delta.ops[0]["spec"]["version"] == f"{version}.0"
    assert built == 1


async def test_a_site_that_cannot_read_a_root_keeps_the_list(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    sites = await fleet(make_site, FEATURES["merkle_targets"])
    old = sites[-1]  # a site still on the release before Merkle targets
    status, _ = await old.report({}, hosts=probe_hosts(FEATURES["merkle_targets"] - 1))
    assert status == 200
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": ALL}, 202)
    listed = await admin.ok("GET", "/v1/deltas")
    assert set(listed["deltas"][-1]["target"]) == {"sites"}
    assert listed["deltas"][-1]["format"] == 2
    assert (await old.sync()).accepted[0].has_ops

    # Upgraded: the next wide delta names its sites by a root.
    status, _ = await old.report({}, hosts=probe_hosts(FEATURES["merkle_targets"]))
    assert status == 200
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(version="2.0"), "placement": ALL}, 202)
    listed = await admin.ok("GET", "/v1/deltas")
    assert "merkle" in listed["deltas"][-1]["target"]
    delta, _, _ = parse(await raw_view(old))
    assert delta.target.root and delta.target.proven == old.id and delta.target.includes(old.id)
