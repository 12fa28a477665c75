"""Merkle targets (meshorch.fleet.merkle): every proof the hub makes verifies and says
the truth; forged, altered, truncated or padded proofs are refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshorch.fleet.merkle import BadProof, Tree, verify

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 100]


@pytest.mark.parametrize("count", SIZES)
def test_every_member_and_every_gap_proves_what_it_is(count: int) -> None:
    ids = [f"shop-{i:04d}" for i in range(0, 2 * count, 2)]  # gaps between them
    tree = Tree.of(ids)
    assert tree.count == count
    for site in ids:
        assert verify(tree.proof(site), tree.root, count) == (site, True)
    outsiders = ["a", "zzz", *(f"shop-{i:04d}" for i in range(1, 2 * count, 2))]
    for site in outsiders:
        assert verify(tree.proof(site), tree.root, count) == (site, False)


def test_the_root_depends_on_every_id_and_on_nothing_else() -> None:
    base = Tree.of(["a", "b", "c"])
    assert Tree.of(["c", "b", "a", "a"]).root == base.root  # a set: order and repeats
    assert Tree.of(["a", "b", "d"]).root != base.root
    assert Tree.of(["a", "b"]).root != base.root
    with pytest.raises(ValueError):
        Tree.of([])


def forgeries(tree: Tree, site: str) -> list[Any]:
    proof = tree.proof(site)
    forged = []
    renamed = dict(proof, site=site + "x")  # another site's proof
    forged.append(renamed)
    if "path" in proof:
        for i in range(len(proof["path"])):
            flipped = copy.deepcopy(proof)
            step = flipped["path"][i]
            flipped["path"][i] = ("0" if step[0] != "0" else "1") + step[1:]
            forged.append(flipped)
        forged.append(dict(proof, path=proof["path"][:-1]))  # truncated
        forged.append(dict(proof, path=[*proof["path"], "00" * 32]))  # padded
        forged.append(dict(proof, index=proof["index"] + 1))
        forged.append(dict(proof, index=-1))
        forged.append(dict(proof, index=True))
        forged.append(dict(proof, path="x"))
    forged += [None, [], {"site": site}, {"site": site, "left": None, "right": None}]
    return forged


def test_forged_membership_proofs_are_refused() -> None:
    tree = Tree.of([f"s{i}" for i in range(13)])
    for bad in forgeries(tree, "s5"):
        with pytest.raises(BadProof):
            result = verify(bad, tree.root, tree.count)
            # A renamed proof may only verify if it is the truth about that name.
            assert result != ("s5x", True), bad
            raise BadProof("verified, but to the truth")


def test_a_member_cannot_be_shown_absent_nor_an_outsider_present() -> None:
    ids = [f"s{i:02d}" for i in range(10)]
    tree = Tree.of(ids)
    member = "s04"
    # Non-adjacent neighbours around a member (s03 and s05) would hide it.
    hide = {
        "site": member,
        "left": tree.proof("s03") | {"id": "s03"},
        "right": tree.proof("s05") | {"id": "s05"},
    }
    for side in ("left", "right"):
        hide[side] = {"id": hide[side]["id"], "index": hide[side]["index"],
                      "path": hide[side]["path"]}  # fmt: skip
    with pytest.raises(BadProof, match="adjacent"):
        verify(hide, tree.root, tree.count)
    # Only one neighbour, not at the end of the list.
    with pytest.raises(BadProof, match="first leaf"):
        verify({"site": member, "left": None, "right": hide["right"]}, tree.root, tree.count)
    with pytest.raises(BadProof, match="last leaf"):
        verify({"site": member, "left": hide["left"], "right": None}, tree.root, tree.count)
    # A neighbour that does not sort on its side.
    outsider = tree.proof("s045")
    swapped = {"site": "s045", "left": outsider["right"], "right": outsider["left"]}
    with pytest.raises(BadProof, match="sort"):
        verify(swapped, tree.root, tree.count)
    # The count is signed with the root: "after the last leaf" is judged by it.
    after = tree.proof("s99")
    assert verify(after, tree.root, tree.count) == ("s99", False)
    with pytest.raises(BadProof):
        verify(after, tree.root, tree.count + 1)


def test_a_proof_is_small_at_fleet_scale() -> None:
    import orjson

    tree = Tree.of(f"shop-{i:05d}" for i in range(10_000))
    member = len(orjson.dumps(tree.proof("shop-04242")))
    outsider = len(orjson.dumps(tree.proof("shop-04242a")))
    listed = len(orjson.dumps(sorted(tree.ids)))
    print(f"10,000 sites: list {listed} B, member proof {member} B, non-member {outsider} B")
    assert member < 1_200 and outsider < 2_400 and listed > 100_000
