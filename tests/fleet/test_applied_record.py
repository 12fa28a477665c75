"""The record of the envelopes a site applied (``fleet/applied/<v>``, for ``meshorch fleet
export``), pure: it holds the last ``APPLIED_KEEP`` versions as the site applied them, in the
same guarded proposal as the deltas, and starts anew at a snapshot."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.fleet.apply import (
    APPLIED_BATCH_BYTES,
    APPLIED_KEEP,
    APPLIED_PREFIX,
    TRUST_KEY,
    applied_version,
    as_applied,
    plan_apply,
    plan_snapshot,
)
from meshorch.fleet.delta import (
    ALL_SITES,
    DELTA_V2,
    GENESIS_HASH,
    Target,
    TrustState,
    key_id,
    next_delta,
    sign,
    verify_batch,
    view_for,
)
from meshorch.fleet.snapshot import Snapshot
from meshorch.state.tables import SYSTEM_TABLE
from raft import Delete, Guard, Put

ROOT = SigningKey(b"r" * 32)
NOW = 1_790_000_000.0
SITE = "shop-1"


def log_of(count: int, pad_from: int | None = None) -> list[bytes]:
    """Format 2 deltas: every third for another site (its operations not this site's);
    from version ``pad_from`` on, each for all sites and about 30 KB."""
    envelopes, head = [], GENESIS_HASH
    for version in range(1, count + 1):
        target = Target(sites=frozenset({"shop-2"})) if version % 3 == 0 else ALL_SITES
        ops: list[dict[str, object]] = [
            {"op": "tenant.quota", "tenant": "t", "cpu_millis": version}
        ]
        if pad_from is not None and version >= pad_from:
            target, ops = ALL_SITES, [{"op": "note", "text": "x" * 30_000}]
        body = next_delta("acme", version - 1, head, ops, target, NOW, 3600, DELTA_V2)
        envelope, signed = sign(body, [ROOT])
        envelopes.append(envelope)
        head = signed.digest
    return envelopes


class Table:
    """The ``sys`` table, written as Raft would apply a plan (the guard holds here)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}

    def read(self, table: str, key: bytes) -> bytes | None:
        return self.rows.get(key) if table == SYSTEM_TABLE else None

    def apply(self, ops: Sequence[object]) -> None:
        for op in ops:
            if isinstance(op, Put) and op.table == SYSTEM_TABLE:
                self.rows[op.key] = op.value
            elif isinstance(op, Delete) and op.table == SYSTEM_TABLE:
                self.rows.pop(op.key, None)
            else:
                assert isinstance(op, (Guard, Put, Delete))

    def kept(self) -> dict[int, bytes]:
        return {applied_version(k): v for k, v in self.rows.items() if k.startswith(APPLIED_PREFIX)}


def apply_in_batches(table: Table, raws: list[bytes], size: int) -> TrustState:
    state = TrustState("acme", frozenset({key_id(ROOT)}))
    for start in range(0, len(raws), size):
        batch = raws[start : start + size]
        result = verify_batch(batch, state, NOW, SITE)
        assert result.rejected is None and result.state is not None
        applied = [as_applied(r, d, SITE) for r, d in zip(batch, result.accepted, strict=True)]
        plan = plan_apply(result.accepted, result.state, 0, SITE, table.read, applied)
        guard = plan.ops[0]
        assert isinstance(guard, Guard) and guard.count == len(plan.ops) - 1  # all or nothing
        table.apply(plan.ops)
        state = result.state
    return state


@pytest.mark.parametrize("batch", [1, 50, 300])
def test_the_record_holds_the_last_versions_as_the_site_applied_them(batch: int) -> None:
    raws = log_of(300)
    table = Table()
    apply_in_batches(table, raws, batch)
    kept = table.kept()
    assert sorted(kept) == list(range(300 - APPLIED_KEEP + 1, 301))
    for version, envelope in kept.items():
        assert envelope == view_for(raws[version - 1], SITE)
        assert (envelope == raws[version - 1]) == (version % 3 != 0)  # headers for shop-2's


def test_a_relayed_full_envelope_is_kept_as_the_header_this_site_applied() -> None:
    raws = log_of(3)
    table = Table()
    apply_in_batches(table, raws, 3)
    assert b'"ops"' in raws[2] and b'"ops"' not in table.kept()[3]


def test_a_snapshot_starts_the_record_anew() -> None:
    table = Table()
    state = apply_in_batches(table, log_of(300), 100)
    table.rows[TRUST_KEY] = orjson.dumps(state.to_json())
    snapshot = Snapshot("acme", SITE, 400, "ab" * 32, NOW, NOW + 60, ())
    after = TrustState("acme", state.trusted_keys, 400, "ab" * 32)
    plan = plan_snapshot(snapshot, after, 0, SITE, table.read)
    table.apply(plan.ops)
    assert table.kept() == {}


def test_a_batch_keeps_at_most_its_newest_megabyte_and_the_record_stays_a_run() -> None:
    raws = log_of(200, pad_from=101)  # 100 small deltas, then 100 of ~30 KB (3 MB)
    table = Table()
    apply_in_batches(table, raws[:100], 100)
    assert sorted(table.kept()) == list(range(1, 101))
    apply_in_batches_from(table, raws, 100)
    kept = sorted(table.kept())
    assert kept[-1] == 200 and kept == list(range(kept[0], 201))  # a run, no hole
    assert sum(len(v) for v in table.kept().values()) <= APPLIED_BATCH_BYTES
    assert 20 < len(kept) < 40


def apply_in_batches_from(table: Table, raws: list[bytes], start: int) -> None:
    """The deltas after ``start`` in one batch, from the trust state after ``start``."""
    state = TrustState("acme", frozenset({key_id(ROOT)}))
    state = verify_batch(raws[:start], state, NOW, SITE).state or state
    batch = raws[start:]
    result = verify_batch(batch, state, NOW, SITE)
    assert result.rejected is None and result.state is not None
    applied = [as_applied(r, d, SITE) for r, d in zip(batch, result.accepted, strict=True)]
    plan = plan_apply(result.accepted, result.state, 0, SITE, table.read, applied)
    table.apply(plan.ops)
