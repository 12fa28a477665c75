"""Signed snapshots of each site's desired state, and the compaction of the delta log.

``Fold`` is the desired state the fleet log gives each site (pure): per thing an operation
sets (``fold_key``), the last operation of the deltas that targeted the site, deletions
included. ``Snapshots`` (a hub part) keeps the fold of the whole log in memory, moved
forward to the head before a snapshot is served: ``GET /v1/link/snapshot`` answers the
calling site's ``meshorch.fleet.snapshot`` envelope at the head, signed by the root key,
with the ``root.rotate`` envelopes after the version the site gives (its proof of the
root key that signed).

Compaction: the deltas up to version C are deleted and the fold at C is stored as the base
(``meta/snapshot_base``) in one transaction; C is the oldest version every registered
site reported applied (0 for one that never reported), or ``head - keep`` when that is
higher (a site away for longer than ``keep`` deltas catches up by snapshot). A fetch from
below C answers 410 ``compacted``: the site fetches the snapshot (agents without snapshots
must be upgraded; the message says so). ``keep`` None: never compact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from central_hub.errors import ApiError
from central_hub.ledger import Ledger, Txn
from central_hub.reports import Reports
from central_hub.store import Store, version_key
from meshorch.fleet.delta import GENESIS_HASH, Delta, DeltaRejected, parse
from meshorch.fleet.snapshot import Snapshot, SnapshotOp, sign_snapshot

logger = logging.getLogger(__name__)

BASE_KEY = "snapshot_base"
PAGE = 500
# (version, index, op): the last operation that set a thing
Entry = tuple[int, int, Mapping[str, Any]]


def fold_key(op: Mapping[str, Any], version: int, index: int) -> str | None:
    """What ``op`` sets at a site (a later op with the same key replaces it); None for an
    op the trust state carries (``root.rotate``)."""
    kind = op.get("op")
    if kind == "root.rotate":
        return None
    if kind == "app.put":
        spec = op.get("spec")
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str):
            return f"app/{name}"
    elif kind == "app.delete" and isinstance(op.get("name"), str):
        return f"app/{op['name']}"
    elif kind == "tenant.quota":
        return f"quota/{op.get('tenant')}"
    elif kind in ("secret.put", "secret.delete"):
        return f"secret/{op.get('tenant')}/{op.get('name')}"
    elif kind in ("site.lockdown", "site.unlock"):
        return "lockdown"
    elif kind in ("secrets.rotate", "site.decommission", "agent.upgrade"):
        return str(kind)
    return f"op/{version}/{index}"  # kept as it is, in order


def for_site(op: Mapping[str, Any], site: str) -> Mapping[str, Any]:
    """``op`` as ``site`` may see it: a secret's values sealed to other sites left out."""
    sealed = op.get("sealed")
    if op.get("op") == "secret.put" and isinstance(sealed, dict):
        return {**op, "sealed": {site: sealed[site]} if site in sealed else {}}
    return op


@dataclass
class Fold:
    """The fold of deltas 1..``version`` (module docstring)."""

    version: int = 0
    hash: str = GENESIS_HASH
    all: dict[str, Entry] = field(default_factory=dict)
    sites: dict[str, dict[str, Entry]] = field(default_factory=dict)
    rotations: list[tuple[int, bytes]] = field(default_factory=list)

    def add(self, delta: Delta, raw: bytes) -> None:
        if delta.version != self.version + 1 or delta.prev != self.hash:
            raise ValueError(f"delta {delta.version} does not follow {self.version}")
        if delta.rotation_key() is not None:
            self.rotations.append((delta.version, raw))
        for index, op in enumerate(delta.ops):
            key = fold_key(op, delta.version, index)
            if key is None:
                continue
            if delta.target.all:
                self.all[key] = (delta.version, index, op)
                continue
            for site in delta.target.sites:
                self.sites.setdefault(site, {})[key] = (delta.version, index, for_site(op, site))
        self.version, self.hash = delta.version, delta.digest

    def ops_for(self, site: str) -> list[SnapshotOp]:
        own = self.sites.get(site, {})
        merged = dict(self.all)
        for key, entry in own.items():
            if key not in merged or entry[:2] > merged[key][:2]:
                merged[key] = entry
        entries = sorted(merged.values(), key=lambda e: (e[0], e[1]))
        return [SnapshotOp(v, for_site(op, site)) for v, _, op in entries]

    def to_json(self) -> dict[str, Any]:
        def entries(found: Mapping[str, Entry]) -> dict[str, Any]:
            return {k: [v, i, dict(op)] for k, (v, i, op) in found.items()}

        return {
            "v": 1,
            "version": self.version,
            "hash": self.hash,
            "all": entries(self.all),
            "sites": {site: entries(found) for site, found in self.sites.items()},
            "rotations": [[v, raw.decode()] for v, raw in self.rotations],
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Fold:
        def entries(found: Mapping[str, Any]) -> dict[str, Entry]:
            return {k: (int(v), int(i), op) for k, (v, i, op) in found.items()}

        return Fold(
            version=int(data["version"]),
            hash=str(data["hash"]),
            all=entries(data["all"]),
            sites={site: entries(found) for site, found in data["sites"].items()},
            rotations=[(int(v), str(raw).encode()) for v, raw in data["rotations"]],
        )


def fold_forward(fold: Fold, store: Store, until: int) -> Fold:
    """Move ``fold`` forward through the stored deltas up to version ``until``."""
    while fold.version < until:
        page = store.deltas_after(fold.version, min(PAGE, until - fold.version), 1 << 62)
        if not page:
            raise ValueError(f"the delta log has no version {fold.version + 1}")
        for version, raw in page:
            if version > until:
                break
            try:
                delta, _, _ = parse(raw)
            except DeltaRejected as exc:  # never stored by the hub
                raise ValueError(f"stored delta {version}: {exc}") from None
            fold.add(delta, raw)
    return fold


def registered_sites(store: Store) -> Iterable[str]:
    """Every registered site (one not enrolled yet holds the log at 0, for an agent
    without snapshots: only the ``keep`` bound goes past it)."""
    for site in store.values_json("sites"):
        yield str(site["id"])


class Snapshots:
    """The hub part serving snapshots and compacting the log (module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        reports: Reports,
        keep: int | None,
        every_s: float,
    ) -> None:
        self.ledger = ledger
        self.reports = reports
        self.keep = keep
        self.every_s = every_s
        self.fold = Fold()
        self.compacted = 0  # deltas up to this version are gone
        self._last_compaction = 0.0

    def restore(self, store: Store) -> None:
        base = store.get_json("meta", BASE_KEY)
        self.fold = Fold() if base is None else Fold.from_json(base)
        self.compacted = self.fold.version

    def _current(self) -> Fold:
        head = self.ledger.head
        if self.fold.version < head.version:
            fold_forward(self.fold, self.ledger.store, head.version)
        return self.fold

    # -- serving --------------------------------------------------------------------------

    def require_deltas_after(self, after: int) -> None:
        """410 ``compacted`` when the deltas right after ``after`` are gone."""
        if after < self.compacted:
            raise ApiError(
                410,
                "compacted",
                f"the deltas up to version {self.compacted} were compacted: fetch "
                "GET /v1/link/snapshot, then the deltas after its version (an agent "
                "that does not fetch snapshots must be upgraded)",
            )

    def snapshot(self, site: str, after: int) -> dict[str, Any]:
        """``GET /v1/link/snapshot`` for ``site``: its envelope, and the rotations after
        ``after`` (the version the site applied)."""
        ledger = self.ledger
        if ledger.head.version == 0:
            raise ApiError(404, "no_snapshot", "the fleet log is empty: nothing to catch up")
        fold = self._current()
        now = ledger.now()
        snapshot = Snapshot(
            fleet=ledger.fleet,
            site=site,
            version=fold.version,
            head=fold.hash,
            issued_at=now,
            expires_at=now + ledger.delta_ttl_s,
            ops=tuple(fold.ops_for(site)),
        )
        envelope = sign_snapshot(snapshot, ledger.signing_keys)
        rotations = [raw for version, raw in fold.rotations if version > after]
        return {
            "version": fold.version,
            "snapshot": orjson.Fragment(envelope),
            "rotations": [orjson.Fragment(raw) for raw in rotations],
        }

    # -- compaction -----------------------------------------------------------------------

    def floor(self) -> int:
        """The version below which the log may go (module docstring)."""
        head = self.ledger.head.version
        if self.keep is None:
            return 0
        oldest = head
        for site in registered_sites(self.ledger.store):
            report = self.reports.latest(site)
            applied = 0 if report is None else int(report.get("applied_version", 0))
            oldest = min(oldest, applied)
        return max(0, min(head, max(oldest, head - self.keep)))

    def due(self, now: float) -> bool:
        return self.keep is not None and now - self._last_compaction >= self.every_s

    async def compact(self) -> int:
        """Compact up to ``floor()`` if that is past what is compacted; returns the floor."""
        self._last_compaction = self.ledger.now()
        target = self.floor()
        if target <= self.compacted:
            return self.compacted

        def plan(txn: Txn) -> int:
            store = self.ledger.store
            raw = store.get_json("meta", BASE_KEY)
            base = Fold() if raw is None else Fold.from_json(raw)
            start = base.version
            fold_forward(base, store, target)
            txn.put("meta", BASE_KEY, base.to_json())
            for version in range(start + 1, target + 1):
                txn.writes.append(("deltas", version_key(version), None))
            txn.audit(None, "hub", None, "delta_log", "", "ok", f"compacted up to {target}")

            def done() -> None:
                self.compacted = target
                if self.fold.version < target:  # the deltas it has yet to fold are gone
                    self.fold = base

            txn.after.append(done)
            return target

        compacted = await self.ledger.transact(plan)
        logger.info("delta log compacted up to version %d", compacted)
        return compacted
