"""The order in which a site's hosts pass a pulled blob on (pure).

While one host pulls an image from a registry, the others would all copy each blob from
it, and its link would carry the blob once per host. Instead the live hosts form a
chain that starts at the puller (puller -> h1 -> h2 -> ...; the others sorted by host
id, so every host computes the same chain with nothing to agree on): each copies from
its predecessor while the predecessor is still receiving, and every link carries the
blob once. A predecessor gone or stalled is replaced by the hosts before it, nearest
first, back to the puller.

Sorting by id also means a host only ever follows the puller or a host with a smaller
id: two hosts that see different live sets still never follow each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ChainSources:
    """Where a host copies a blob from: ``source``, then ``fallbacks`` in order."""

    source: str
    fallbacks: tuple[str, ...]

    def in_order(self) -> tuple[str, ...]:
        return (self.source, *self.fallbacks)


def chain(puller: str, live: Iterable[str]) -> tuple[str, ...]:
    """The puller, then the other live hosts by id."""
    return (puller, *sorted(set(live) - {puller}))


def sources(puller: str, live: Iterable[str], host: str) -> ChainSources | None:
    """Where ``host`` copies from in the chain of ``puller`` and the ``live`` hosts
    (``host`` is counted live); None for the puller itself."""
    if host == puller:
        return None
    order = chain(puller, {*live, host})
    before = order[: order.index(host)]
    return ChainSources(before[-1], tuple(reversed(before[:-1])))
