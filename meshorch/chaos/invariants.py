"""What must hold after a chaos run, checked on the recorded history (pure).

Records are the workload's JSON lines (``meshorch.chaos.workload``): ``kind`` put, get,
delete, put_if_absent (``applied``: true, false for a 409 conflict, null when unknown) or
event; ``status`` ok, fail (certainly not applied) or unknown; ``call_s``, ``return_s``
(None unless ok), ``value``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from meshorch.chaos.linearizability import DEFAULT_BUDGET_NODES, Operation, Verdict, check_history

# "allowed": it failed, as the agents' durability mode allows (acknowledged writes lost in
# a power cut by agents that do not fsync); it counts as a pass and the report says so.
Status = Literal["pass", "fail", "unknown", "allowed"]
Durability = Literal["power", "process"]
DURABILITY_MODES: tuple[Durability, ...] = ("power", "process")
Record = Mapping[str, Any]
KV_KINDS = ("put", "get", "delete", "put_if_absent")
WRITE_KINDS = ("put", "delete", "put_if_absent")


@dataclass(frozen=True, slots=True)
class InvariantResult:
    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def kv_operations(records: Iterable[Record], t0: float = 0.0) -> list[Operation]:
    """The KV operations the checker must consider: failed ones certainly did nothing.
    Times become seconds since ``t0`` (the start of the run), as in the report."""
    ops = []
    for r in records:
        if r["kind"] not in KV_KINDS or r["status"] == "fail":
            continue
        ok = r["status"] == "ok"
        ops.append(
            Operation(
                key=str(r["key"]),
                kind=r["kind"],
                call_s=round(float(r["call_s"]) - t0, 6),
                return_s=round(float(r["return_s"]) - t0, 6) if ok else None,
                value=r.get("value"),
                applied=r.get("applied") if ok else None,
                op_id=int(r["id"]),
                client=str(r.get("client", "")),
            )
        )
    return ops


def check_linearizable(
    records: Sequence[Record], *, t0: float = 0.0, budget_nodes: int = DEFAULT_BUDGET_NODES
) -> tuple[InvariantResult, Verdict]:
    verdict = check_history(kv_operations(records, t0), budget_nodes=budget_nodes)
    statuses: dict[str, Status] = {"ok": "pass", "violation": "fail", "unknown": "unknown"}
    status = statuses[verdict.outcome]
    detail = verdict.explanation
    if verdict.outcome == "ok":
        detail = f"{verdict.ops} operations on {len(verdict.keys)} key(s), {verdict.nodes} steps"
    return InvariantResult("linearizable", status, detail), verdict


def _lost_writes(
    records: Sequence[Record], final_reads: Sequence[Record], keys: Sequence[str]
) -> tuple[list[str], int]:
    """The problems of ``check_acknowledged_writes``, and how many of them are keys whose
    last acknowledged write is lost (not: no final read)."""
    problems, lost = [], 0
    final = {str(r["key"]): r.get("value") for r in final_reads if r["status"] == "ok"}
    for key in keys:
        if key not in final:
            problems.append(f"{key}: no final read succeeded")
            continue
        writes = [
            r for r in records if r["key"] == key and r["kind"] in WRITE_KINDS
            and r["status"] != "fail" and r.get("applied") is not False
        ]  # fmt: skip
        acked = [r for r in writes if r["status"] == "ok"]
        if not acked:
            continue
        last = max(acked, key=lambda r: float(r["return_s"]))
        allowed = {
            None if r["kind"] == "delete" else r.get("value")
            for r in writes
            if r["return_s"] is None or float(r["return_s"]) >= float(last["call_s"])
        }
        if final[key] not in allowed:
            lost += 1
            what = "delete" if last["kind"] == "delete" else f"{last['kind']} {last['value']!r}"
            problems.append(
                f"{key}: reads {final[key]!r} but the last acknowledged write (#{last['id']}, "
                f"{what}) could only be superseded by {sorted(map(repr, allowed))}"
            )
    return problems, lost


def check_acknowledged_writes(
    records: Sequence[Record], final_reads: Sequence[Record], keys: Sequence[str]
) -> InvariantResult:
    """Each key's final value is the last acknowledged write's, or that of a write not
    finished before it started (which may have superseded it), including unknown ones."""
    problems, _ = _lost_writes(records, final_reads, keys)
    if problems:
        return InvariantResult("acknowledged_writes_readable", "fail", "; ".join(problems))
    return InvariantResult(
        "acknowledged_writes_readable", "pass", f"{len(keys)} keys hold their last write"
    )


def lost_events(records: Sequence[Record], stored: Sequence[str] | None) -> int:
    """Acknowledged events missing from ``stored`` (0 when it could not be read)."""
    if stored is None:
        return 0
    have = set(stored)
    return sum(1 for r in records if r["kind"] == "event" and r["status"] == "ok"
               and str(r["value"]) not in have)  # fmt: skip


EVENT_INVARIANTS = ("events_exactly_once", "events_at_hub_exactly_once")


def _only_missing_events(result: InvariantResult) -> bool:
    """An events check that failed on acknowledged events missing, and on nothing else."""
    parts = result.detail.split("; ")
    return result.name in EVENT_INVARIANTS and len(parts) == 1 and "but missing" in parts[0]


POWER_CUT_INVARIANT = "acknowledged_writes_survive_power_cut"


def count_losses(
    records: Sequence[Record],
    final_reads: Sequence[Record],
    keys: Sequence[str],
    stored_events: Sequence[str] | None,
) -> tuple[int, int]:
    """Keys whose last acknowledged write is gone, and acknowledged events missing."""
    return _lost_writes(records, final_reads, keys)[1], lost_events(records, stored_events)


def judge_power_cut(
    results: Sequence[InvariantResult],
    durability: Durability,
    records: Sequence[Record],
    final_reads: Sequence[Record],
    keys: Sequence[str],
    stored_events: Sequence[str] | None,
) -> list[InvariantResult]:
    """After a power cut: agents that sync (``power``) must have lost no acknowledged
    write; agents that do not (``process``) may have, and the report says how many, the
    invariants a loss breaks marked "allowed" instead of "fail"."""
    problems, keys_lost = _lost_writes(records, final_reads, keys)
    events_lost = lost_events(records, stored_events)
    # Only a failure that a loss explains is allowed: not a key that could not be read,
    # not an event stored twice.
    explained = {
        "linearizable": keys_lost + events_lost > 0,
        "acknowledged_writes_readable": keys_lost > 0 and keys_lost == len(problems),
    }
    lost = keys_lost + events_lost
    unread = len(problems) - keys_lost
    events_unread = stored_events is None and any(r["kind"] == "event" for r in records)
    head = f"durability={durability}: acknowledged writes lost: {lost}"
    what = f"{keys_lost} key(s) lost their last write, {events_lost} event(s) missing"
    if unread or events_unread:
        # What could not be read may be lost too: say so rather than count it as kept.
        what += f"; {unread} key(s) and {'the' if events_unread else 'no'} stream not read"
    if durability == "power":
        status: Status = "fail" if lost else "unknown" if unread or events_unread else "pass"
        return [*results, InvariantResult(POWER_CUT_INVARIANT, status, f"{head}: {what}")]
    judged = [
        InvariantResult(r.name, "allowed", f"durability=process, power cut: {r.detail}")
        if r.status == "fail" and explained.get(r.name, _only_missing_events(r))
        else r
        for r in results
    ]
    status = "allowed" if lost else "unknown" if unread or events_unread else "pass"
    return [*judged, InvariantResult(POWER_CUT_INVARIANT, status, f"{head} (allowed): {what}")]


def check_events(
    records: Sequence[Record], stored: Sequence[str] | None, name: str = "events_exactly_once"
) -> InvariantResult:
    """Every acknowledged event is stored exactly once; an unknown one at most once; nothing
    that was never produced. ``name``: the site's stream by default, or the hub's copy."""
    produced = [r for r in records if r["kind"] == "event"]
    if stored is None:
        if not produced:
            return InvariantResult(name, "pass", "no events produced")
        return InvariantResult(name, "unknown", "the stream could not be read")
    counts = Counter(stored)
    by_payload = {str(r["value"]): r for r in produced}
    acked = [p for p, r in by_payload.items() if r["status"] == "ok"]
    missing = [p for p in acked if counts[p] == 0]
    duplicated = [p for p, n in counts.items() if n > 1]
    foreign = [p for p in counts if p not in by_payload]
    failed_but_stored = [p for p, r in by_payload.items() if r["status"] == "fail" and counts[p]]
    problems = []
    for label, items in (
        ("acknowledged but missing", missing),
        ("stored more than once", duplicated),
        ("never produced", foreign),
        ("refused but stored", failed_but_stored),
    ):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        return InvariantResult(name, "fail", "; ".join(problems))
    unknown = sum(1 for r in by_payload.values() if r["status"] == "unknown")
    return InvariantResult(
        name,
        "pass",
        f"{len(acked)} acknowledged events stored once each; "
        f"{len(stored)} stored in all ({unknown} produced with an unknown outcome)",
    )


def check_recovery(name: str, seconds: float | None, bound_s: float) -> InvariantResult:
    if seconds is None:
        return InvariantResult(name, "fail", f"not recovered within {bound_s:g}s")
    if seconds > bound_s:
        return InvariantResult(name, "fail", f"recovered in {seconds:.1f}s, over {bound_s:g}s")
    return InvariantResult(name, "pass", f"recovered in {seconds:.1f}s (bound {bound_s:g}s)")


def op_counts(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        by_status = counts.setdefault(str(r["kind"]), {"ok": 0, "fail": 0, "unknown": 0})
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    return counts


def overall(results: Iterable[InvariantResult]) -> Status:
    statuses = {r.status for r in results}  # "allowed" counts as a pass
    return "fail" if "fail" in statuses else "unknown" if "unknown" in statuses else "pass"
