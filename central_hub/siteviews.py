"""The delta log as each site sees it, and the sites' long-polls waiting for their deltas.

Shared by the hub's ledger (``central_hub.ledger``: the leader, which indexes each delta as
it commits it) and a follower replica of a replicated hub (``central_hub.replica_polls``:
it indexes each delta as it applies it from the replicated log), so a site's long-poll is
answered with the same bytes wherever it waits.

``view`` is a stored delta as one site may see it (a format 2 delta that does not target
it without its operations, ``meshorch.fleet.delta.view_for``; a Merkle target with the
site's proof; cached by version). Long-polls of sites that know such views wait for a delta
that targets their site (or all sites): the waiters are indexed by site id, so a delta
wakes its sites' polls only (and those of sites that do not know such views, which wait
for any delta: ``wait_any``), and the newest version that concerns each site is kept in
memory (``site_head``; for the deltas before the index began, the head then).

``answer`` is a long-poll's answer body (the head and the site's views of the deltas).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import orjson

from meshorch.fleet.delta import (
    DELTA_V2,
    DeltaRejected,
    ParsedEnvelope,
    Target,
    header_of,
    parse_full,
    view_of,
)
from meshorch.fleet.merkle import Tree

VIEW_CACHE = 4096  # deltas whose target and header are kept (per-site views)
TREE_CACHE = 16  # deltas with a Merkle target whose tree is kept
ALL = "*"  # the waiters' index entry of a delta that targets every site
# Long-polls woken per turn of the event loop: the requests that arrive meanwhile are served
# between the batches (about 32 answers, 10-20 ms of work, at a time).
WAKE_BATCH = 32


def answer(head: int, envelopes: list[bytes]) -> dict[str, Any]:
    """A site's long-poll answer: the head and the site's views (``GET /v1/link/deltas``)."""
    return {"head": head, "deltas": [orjson.Fragment(e) for e in envelopes]}


class SiteViews:
    """Per-site views and their waiters (module docstring)."""

    def __init__(self) -> None:
        self.closing = False
        self.waiting = 0  # long-polls waiting right now
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._to_wake: deque[asyncio.Future[None]] = deque()  # woken a batch a turn
        self._waking = False  # a ``_wake_some`` is scheduled
        self._site_last: dict[str, int] = {}
        self._all_last = 0
        self._known_from = 0
        self._interrupts = 0  # ``interrupt`` calls: a poll waiting through one answers
        self._views: OrderedDict[int, tuple[Target, bytes] | None] = OrderedDict()
        # Merkle targets: the parsed envelope and its tree, for the proofs of the views; and
        # the trees the hub built as it signed them, until their first view.
        self._trees: OrderedDict[int, tuple[ParsedEnvelope, Tree]] = OrderedDict()
        self._built: OrderedDict[int, Tree] = OrderedDict()

    def known_from(self, version: int) -> None:
        """Nothing is known of the deltas up to ``version``: each site's head is at least
        that (and the polls waiting below it answer)."""
        self._known_from = max(self._known_from, version)
        self._wake(None)

    def index(self, version: int, target: Target) -> None:
        """Delta ``version`` targets ``target``: wake its sites' polls (only theirs)."""
        if target.all:
            self._all_last = version
            self._wake(None)
            return
        if target.tree is not None:
            self._built[version] = target.tree
            if len(self._built) > TREE_CACHE:
                self._built.popitem(last=False)
        self._site_last.update(dict.fromkeys(target.sites, version))
        # O(sites waiting) rather than O(sites targeted): a delta may target 10,000.
        for site in self._waiters.keys() & target.sites:
            self._wake(site)
        self._wake(ALL)  # the polls waiting for any delta wake too

    def index_envelope(self, version: int, raw: bytes) -> None:
        """``index`` a stored delta by the target its envelope names."""
        try:
            target = parse_full(raw).delta.target
        except DeltaRejected:  # never stored by a hub
            return
        self.index(version, target)

    def interrupt(self) -> None:
        """Every waiting poll answers now (with what there is)."""
        self._interrupts += 1
        self._wake(None, paced=False)

    def close(self) -> None:
        """Stopping: long-polls answer now, and wait no more."""
        self.closing = True
        self._wake(None, paced=False)

    def _wake(self, site: str | None, *, paced: bool = True) -> None:
        """Wake the long-polls of ``site`` and those waiting for any delta (None: all).

        ``paced``: at most ``WAKE_BATCH`` a turn of the event loop. A delta for every site
        wakes thousands of polls, each of which then builds its answer (a view, a proof,
        TLS); woken at once, they would all run before any other request is read."""
        keys = list(self._waiters) if site is None else [site, ALL]
        woken = self._to_wake
        for key in keys:
            woken.extend(self._waiters.pop(key, ()))
        try:
            loop = asyncio.get_running_loop() if paced else None
        except RuntimeError:  # no loop runs: nothing else to serve
            loop = None
        if loop is None:
            self._wake_some(len(woken))  # a ``_wake_some`` scheduled finds none left
        elif woken and not self._waking:
            self._waking = True
            loop.call_soon(self._wake_some, WAKE_BATCH)

    def _wake_some(self, count: int) -> None:
        woken = self._to_wake
        while woken and count > 0:
            future = woken.popleft()
            if not future.done():  # else timed out meanwhile
                future.set_result(None)
                count -= 1
        if woken and self._waking:
            asyncio.get_running_loop().call_soon(self._wake_some, WAKE_BATCH)
        else:
            self._waking = False

    def site_head(self, site: str) -> int:
        """The newest version that targets ``site`` or all sites (for the deltas issued
        before the index began: the head then)."""
        return max(self._known_from, self._all_last, self._site_last.get(site, 0))

    def view(self, version: int, raw: bytes, site: str) -> bytes:
        """The stored delta ``version`` (``raw``) as ``site`` may see it (module docstring)."""
        cached = self._views.get(version)
        if cached is None and version not in self._views:
            try:
                parsed = parse_full(raw, self._built.get(version))
            except DeltaRejected:  # never stored by the hub
                cached = None
            else:
                delta = parsed.delta
                cached = (delta.target, header_of(parsed)) if delta.format == DELTA_V2 else None
                if delta.target.root:
                    self._keep_tree(version, parsed)
            self._views[version] = cached
            if len(self._views) > VIEW_CACHE:
                self._views.popitem(last=False)
        if cached is not None and cached[0].root:
            return self._merkle_view(version, raw, site)
        if cached is None or cached[0].includes(site):
            return raw
        return cached[1]

    def _merkle_view(self, version: int, raw: bytes, site: str) -> bytes:
        """A Merkle target's view: ``site``'s proof (O(log sites)) from the tree kept for
        the newest ``TREE_CACHE`` such deltas (a tree is 10,000 hashes at 10,000 sites)."""
        kept = self._trees.get(version)
        if kept is None:
            kept = self._keep_tree(version, parse_full(raw, self._built.get(version)))
        else:
            self._trees.move_to_end(version)
        return view_of(kept[0], raw, site, kept[1])

    def _keep_tree(self, version: int, parsed: ParsedEnvelope) -> tuple[ParsedEnvelope, Tree]:
        """Keep a Merkle target's tree: the one the hub built as it signed it, if any."""
        built = self._built.pop(version, None)
        target = parsed.delta.target
        tree = built if built is not None and built.root == target.root else None
        kept = parsed, tree or Tree.of(target.sites)
        self._trees[version] = kept
        if len(self._trees) > TREE_CACHE:
            self._trees.popitem(last=False)
        return kept

    def views(self, deltas: list[tuple[int, bytes]], site: str) -> list[bytes]:
        return [self.view(version, raw, site) for version, raw in deltas]

    async def wait(self, site: str, after: int, wait_s: float) -> None:
        """Return once a delta after ``after`` targets ``site`` (or all sites), after
        ``wait_s`` at most, or at once when stopping or interrupted."""
        await self._wait(site, lambda: self.site_head(site) > after, wait_s)

    async def wait_any(self, after: int, wait_s: float, head: Callable[[], int]) -> None:
        """``wait`` for any delta after ``after`` (a site that does not know per-site
        views); ``head``: the newest version indexed."""
        await self._wait(ALL, lambda: head() > after, wait_s)

    async def _wait(self, key: str, done: Callable[[], bool], wait_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        interrupts = self._interrupts
        while not done() and not self.closing and self._interrupts == interrupts:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            future: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(key, set())
            waiters.add(future)
            self.waiting += 1
            try:
                async with asyncio.timeout(remaining):
                    await future
            except TimeoutError:
                break
            finally:
                self.waiting -= 1
                waiters.discard(future)
                if not waiters and self._waiters.get(key) is waiters:
                    del self._waiters[key]
