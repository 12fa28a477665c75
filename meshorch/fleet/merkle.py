"""A Merkle tree over a sorted set of site ids, with proofs of membership and of
non-membership (pure).

A delta that targets many sites signs the root of this tree instead of listing them
(``meshorch.fleet.delta``): each site gets, next to the signed body, a proof of 1-2 KB that
it is or is not one of them, instead of a list of 15 bytes per site that every site would
download (150 KB a delta at 10,000 sites).

Leaves are the ids in sorted order, ``H(0x00 || id)``; a node is ``H(0x01 || left ||
right)`` (the prefixes keep a leaf from passing for a node); a level's odd last node is
carried up as it is. The leaf count is signed with the root, so the shape of the tree,
and with it the length of every path, is fixed.

Proofs (JSON)::

    member:      {"site": S, "index": i, "path": ["<hex>", ...]}
    not member:  {"site": S, "left": {"id": A, "index": i, "path": [...]} | null,
                             "right": {"id": B, "index": i + 1, "path": [...]} | null}

Non-membership shows the two neighbours S would sit between (A < S < B, adjacent leaves),
or the first leaf (S sorts before it) or the last (S sorts after it). The set being sorted
and its count signed, nothing can sit between adjacent leaves.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LEAF = b"\x00"
NODE = b"\x01"
MAX_DEPTH = 40  # 2**40 leaves: far past any fleet; bounds the work a proof can ask for


class BadProof(ValueError):
    """A proof that is not well formed or does not lead to the root."""


def _leaf(site: str) -> bytes:
    return hashlib.sha256(LEAF + site.encode()).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE + left + right).digest()


@dataclass(frozen=True)
class Tree:
    """Every level of the tree over ``ids`` (sorted, unique), leaves first."""

    ids: tuple[str, ...]
    levels: tuple[tuple[bytes, ...], ...]

    @staticmethod
    def of(sites: Iterable[str]) -> Tree:
        ids = tuple(sorted(set(sites)))
        if not ids:
            raise ValueError("a Merkle target names at least one site")
        # ``_leaf`` and ``_node`` inlined: a tree over 10,000 sites is 20,000 hashes.
        sha256 = hashlib.sha256
        level = tuple(sha256(LEAF + site.encode()).digest() for site in ids)
        levels = [level]
        while len(level) > 1:
            pairs = [
                sha256(NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                pairs.append(level[-1])
            level = tuple(pairs)
            levels.append(level)
        return Tree(ids, tuple(levels))

    @property
    def root(self) -> str:
        return self.levels[-1][0].hex()

    @property
    def count(self) -> int:
        return len(self.ids)

    def _path(self, index: int) -> list[str]:
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling].hex())
            index //= 2
        return path

    def _leaf_proof(self, index: int) -> dict[str, Any]:
        return {"id": self.ids[index], "index": index, "path": self._path(index)}

    def proof(self, site: str) -> dict[str, Any]:
        """The proof that ``site`` is, or is not, one of the tree's ids."""
        at = bisect.bisect_left(self.ids, site)
        if at < len(self.ids) and self.ids[at] == site:
            return {"site": site, "index": at, "path": self._path(at)}
        return {
            "site": site,
            "left": self._leaf_proof(at - 1) if at > 0 else None,
            "right": self._leaf_proof(at) if at < len(self.ids) else None,
        }


def _root_from(site: str, index: int, path: Sequence[object], count: int) -> bytes:
    """The root the leaf ``site`` at ``index`` leads to through ``path``; BadProof when the
    path's length does not fit the tree's shape."""
    if type(index) is not int or not 0 <= index < count:
        raise BadProof(f"index {index!r} is not within the {count} leaves")
    node, width, used = _leaf(site), count, 0
    while width > 1:
        sibling = index ^ 1
        if sibling < width:
            if used >= len(path):
                raise BadProof("the path is too short")
            step = path[used]
            if not isinstance(step, str) or len(step) != 64:
                raise BadProof("a path step is 64 hex characters")
            try:
                other = bytes.fromhex(step)
            except ValueError:
                raise BadProof("a path step is 64 hex characters") from None
            used += 1
            node = _node(other, node) if index % 2 else _node(node, other)
        index //= 2
        width = (width + 1) // 2
    if used != len(path):
        raise BadProof("the path is too long")
    return node


def _leaf_at(item: object, count: int, root: bytes) -> tuple[str, int]:
    if not isinstance(item, dict) or set(item) != {"id", "index", "path"}:
        raise BadProof("a neighbour is {id, index, path}")
    site, index, path = item["id"], item["index"], item["path"]
    if not isinstance(site, str) or not isinstance(path, list) or len(path) > MAX_DEPTH:
        raise BadProof("a neighbour's id is a string and its path a short list")
    if _root_from(site, index, path, count) != root:
        raise BadProof(f"neighbour {site!r} does not lead to the root")
    return site, index


def verify(proof: object, root_hex: str, count: int) -> tuple[str, bool]:
    """Check ``proof`` against the signed ``root_hex`` and leaf ``count``: returns (the
    site it is about, whether that site is a member). Raises BadProof."""
    if type(count) is not int or not 1 <= count < 2**MAX_DEPTH:
        raise BadProof("the count is a positive integer")
    root = bytes.fromhex(root_hex)
    if not isinstance(proof, Mapping) or not isinstance(proof.get("site"), str):
        raise BadProof("a proof is an object naming its 'site'")
    site: str = proof["site"]
    if set(proof) == {"site", "index", "path"}:
        path = proof["path"]
        if not isinstance(path, list) or len(path) > MAX_DEPTH:
            raise BadProof("'path' is a short list")
        if _root_from(site, proof["index"], path, count) != root:
            raise BadProof(f"the path of {site!r} does not lead to the root")
        return site, True
    if set(proof) != {"site", "left", "right"}:
        raise BadProof("a proof has index and path (member) or left and right (not member)")
    left = None if proof["left"] is None else _leaf_at(proof["left"], count, root)
    right = None if proof["right"] is None else _leaf_at(proof["right"], count, root)
    if left is None and right is None:
        raise BadProof("a proof of non-membership shows a neighbour at least")
    if left is not None and not left[0] < site:
        raise BadProof("the left neighbour does not sort before the site")
    if right is not None and not site < right[0]:
        raise BadProof("the right neighbour does not sort after the site")
    if left is None and right is not None and right[1] != 0:
        raise BadProof("with no left neighbour, the right one is the first leaf")
    if right is None and left is not None and left[1] != count - 1:
        raise BadProof("with no right neighbour, the left one is the last leaf")
    if left is not None and right is not None and right[1] != left[1] + 1:
        raise BadProof("the neighbours are not adjacent leaves")
    return site, False
