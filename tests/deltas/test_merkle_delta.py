"""Deltas whose target is a Merkle root (meshorch.fleet.delta with meshorch.fleet.merkle):
each site's view proves whether it is targeted; what does not prove it is refused."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.fleet import delta as d
from tests.deltas.conftest import NOW, Log, fresh_state

SITES = [f"shop-{i:03d}" for i in range(0, 200, 2)]  # odd numbers are not targeted
OPS = [{"op": "app.put", "spec": {"name": "web"}}]


def merkle_log(root: SigningKey, sites: list[str] = SITES) -> tuple[Log, bytes]:
    log = Log(root, d.DELTA_V2)
    return log, log.append(OPS, d.Target.merkle_of(sites))


def verdict(raw: bytes, root: SigningKey, site: str) -> str | d.Delta:
    try:
        return d.verify(raw, fresh_state(root), NOW, site)[0]
    except d.DeltaRejected as exc:
        return exc.reason


def edit(raw: bytes, change: Any) -> bytes:
    envelope = orjson.loads(raw)
    change(envelope)
    return orjson.dumps(envelope)


def test_each_site_applies_its_view_and_only_its_own(root: SigningKey) -> None:
    _, full = merkle_log(root)
    body = orjson.loads(orjson.loads(full)["body"])
    assert set(body["target"]) == {"merkle", "count"} and body["target"]["count"] == len(SITES)
    for site, targeted in (("shop-010", True), ("shop-011", False), ("a", False), ("z", False)):
        view = d.view_for(full, site)
        envelope = orjson.loads(view)
        assert "targets" not in envelope and envelope["proof"]["site"] == site
        applied = verdict(view, root, site)
        assert isinstance(applied, d.Delta), applied
        assert applied.has_ops is targeted and list(applied.ops) == (OPS if targeted else [])
        # Kept at the site as applied, its view still says the same to the same site.
        assert d.view_for(view, site) == view
        other = "shop-012" if site != "shop-012" else "shop-014"
        assert verdict(view, root, other) == "proof_missing"


def test_forged_or_altered_proofs_are_refused(root: SigningKey) -> None:
    _, full = merkle_log(root)
    member = d.view_for(full, "shop-010")
    outsider = d.view_for(full, "shop-011")

    def flip_path(envelope: dict[str, Any]) -> None:
        step = envelope["proof"]["path"][0]
        envelope["proof"]["path"][0] = ("f" if step[0] != "f" else "e") + step[1:]

    def claim_outsider_is_member(envelope: dict[str, Any]) -> None:
        envelope["proof"] = {**orjson.loads(member)["proof"], "site": "shop-011"}

    def hide_member(envelope: dict[str, Any]) -> None:
        envelope["proof"] = {**orjson.loads(outsider)["proof"], "site": "shop-010"}
        envelope.pop("ops", None)

    def strip_ops(envelope: dict[str, Any]) -> None:
        del envelope["ops"]

    assert verdict(edit(member, flip_path), root, "shop-010") == "malformed"
    assert verdict(edit(outsider, claim_outsider_is_member), root, "shop-011") == "malformed"
    assert verdict(edit(outsider, hide_member), root, "shop-010") == "malformed"
    assert verdict(edit(member, strip_ops), root, "shop-010") == "ops_missing"
    no_proof = edit(member, lambda e: e.pop("proof"))
    assert verdict(no_proof, root, "shop-010") == "proof_missing"


def test_the_full_envelope_list_must_hash_to_the_signed_root(root: SigningKey) -> None:
    _, full = merkle_log(root)
    assert d.parse(full)[0].target.sites == frozenset(SITES)

    def drop_one(envelope: dict[str, Any]) -> None:
        envelope["targets"] = envelope["targets"][1:]

    def swap_one(envelope: dict[str, Any]) -> None:
        envelope["targets"][0] = "shop-001"

    def unsorted(envelope: dict[str, Any]) -> None:
        envelope["targets"].reverse()

    def both(envelope: dict[str, Any]) -> None:
        envelope["proof"] = orjson.loads(d.view_for(full, "shop-010"))["proof"]

    for change in (drop_one, swap_one, unsorted, both):
        with pytest.raises(d.DeltaRejected) as info:
            d.parse(edit(full, change))
        assert info.value.reason == "malformed", change

    listed = Log(root, d.DELTA_V2).append(OPS, d.Target(sites=frozenset(SITES)))
    with pytest.raises(d.DeltaRejected, match="only with a Merkle target"):
        d.parse(edit(listed, lambda e: e.update(targets=SITES)))


def test_merkle_targets_are_format_2_only(root: SigningKey) -> None:
    with pytest.raises(ValueError, match="format 2"):
        Log(root, d.DELTA_V1).append(OPS, d.Target.merkle_of(SITES))
    v1 = Log(root, d.DELTA_V1).append(OPS, d.Target(sites=frozenset({"shop-000"})))

    def merkle_body(envelope: dict[str, Any]) -> None:
        body = orjson.loads(envelope["body"])
        body["target"] = {"merkle": "ab" * 32, "count": 3}
        envelope["body"] = orjson.dumps(body).decode()

    assert verdict(edit(v1, merkle_body), root, "shop-000") == "malformed"


def test_a_wave_of_20000_sites_is_small_on_every_link(root: SigningKey) -> None:
    """The list of 20,000 ids is over the delta size limit; each view is a few KB. A site
    never parses a full envelope over the limit (a stranger's bytes cost it at most the
    limit)."""
    many = [f"store-{i:06d}" for i in range(20_000)]
    _, full = merkle_log(root, many)
    assert len(full) > d.MAX_DELTA_BYTES
    assert d.parse(full)[0].target.count == 20_000  # the hub's copy
    assert verdict(full, root, "store-000042") == "too_large"
    sizes = []
    for site in ("store-000042", "store-0000425", "zzz"):
        view = d.view_for(full, site)
        sizes.append(len(view))
        assert isinstance(verdict(view, root, site), d.Delta)
    print(f"20,000 sites: full envelope {len(full)} B, views {sizes} B")
    assert max(sizes) < 3_000
