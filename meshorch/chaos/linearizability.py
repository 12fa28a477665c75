"""Linearizability checker for the site's key-value store (pure: no clock, no I/O).

The model is one register per key: ``put(v)`` sets it, ``delete`` empties it, ``get``
returns its value (``None`` when absent) and ``put_if_absent(v)`` (the API's compare-and-set
with ``expect_index=0``) sets it only when absent, answering whether it did. Keys are
independent registers, so a history is linearizable iff each key's sub-history is
(P-compositionality, Horn & Kroening): each key is searched on its own.

The search is Wing & Gong's, with Lowe's memoization of (linearized set, state) as in
Porcupine: walk the calls in order of invocation, tentatively apply one whose step the model
accepts, backtrack when a return is reached whose operation was not linearized yet. An
operation whose outcome is unknown (timeout, ``504 outcome_unknown``, connection lost) has
no return: it may take effect at any point after its call, or never -- its return is put
after everything else, where taking effect changes nothing anyone observed. Reads whose
outcome is unknown say nothing and are dropped. A node budget bounds the search: past it a
key's verdict is ``unknown``, never a hang.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

OpKind = Literal["put", "get", "delete", "put_if_absent"]
Outcome = Literal["ok", "violation", "unknown"]
OP_KINDS: tuple[OpKind, ...] = ("put", "get", "delete", "put_if_absent")
DEFAULT_BUDGET_NODES = 2_000_000


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation on one key, with its invocation and response times (any
    monotonic clock shared by all clients).

    ``value`` is the written value for ``put``/``put_if_absent`` and the value read for
    ``get`` (``None``: the key was absent). ``applied`` is ``put_if_absent``'s answer
    (``None`` when unknown). ``return_s`` is ``None`` when the outcome is unknown.
    """

    key: str
    kind: OpKind
    call_s: float
    return_s: float | None
    value: str | None = None
    applied: bool | None = None
    op_id: int = 0
    client: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"operation kind must be one of {OP_KINDS}, not {self.kind!r}")
        if self.return_s is not None and self.return_s < self.call_s:
            raise ValueError(
                f"operation {self.op_id} returns ({self.return_s}) before its call ({self.call_s})"
            )
        if self.kind in ("put", "put_if_absent") and self.value is None:
            raise ValueError(f"operation {self.op_id}: a {self.kind} needs a value")

    @property
    def unknown(self) -> bool:
        return self.return_s is None

    def describe(self) -> str:
        end = "?" if self.return_s is None else f"{self.return_s:.3f}"
        what = {
            "put": f"put({self.value!r})",
            "delete": "delete()",
            "get": f"get() -> {self.value!r}",
            "put_if_absent": f"put_if_absent({self.value!r}) -> "
            + {True: "applied", False: "conflict", None: "?"}[self.applied],
        }[self.kind]
        if self.unknown and self.kind != "put_if_absent":
            what += " -> outcome unknown"
        who = f" by {self.client}" if self.client else ""
        return f"#{self.op_id}{who} [{self.call_s:.3f}, {end}] {what}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.op_id,
            "client": self.client,
            "key": self.key,
            "kind": self.kind,
            "call_s": self.call_s,
            "return_s": self.return_s,
            "value": self.value,
        }
        if self.kind == "put_if_absent":
            out["applied"] = self.applied
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Operation:
        try:
            return_s = raw["return_s"]
            return cls(
                key=str(raw["key"]),
                kind=raw["kind"],
                call_s=float(raw["call_s"]),
                return_s=None if return_s is None else float(return_s),
                value=None if raw.get("value") is None else str(raw["value"]),
                applied=raw.get("applied"),
                op_id=int(raw.get("id", 0)),
                client=str(raw.get("client", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed operation {dict(raw)!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class KeyResult:
    """The verdict for one key. ``involved`` are the op ids that explain a violation."""

    key: str
    outcome: Outcome
    ops: int
    nodes: int
    explanation: str = ""
    involved: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """``violation`` if any key has one, else ``unknown`` if any key ran out of budget."""

    outcome: Outcome
    keys: tuple[KeyResult, ...] = field(default=())

    @property
    def ops(self) -> int:
        return sum(k.ops for k in self.keys)

    @property
    def nodes(self) -> int:
        return sum(k.nodes for k in self.keys)

    @property
    def explanation(self) -> str:
        if self.outcome == "ok":
            return f"linearizable: {self.ops} operations on {len(self.keys)} key(s)"
        bad = [k for k in self.keys if k.outcome == self.outcome]
        return "\n".join(k.explanation for k in bad)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "ops": self.ops,
            "keys": len(self.keys),
            "nodes": self.nodes,
            "explanation": self.explanation,
            "violations": [
                {"key": k.key, "explanation": k.explanation, "ops": list(k.involved)}
                for k in self.keys
                if k.outcome == "violation"
            ],
            "unknown_keys": [k.key for k in self.keys if k.outcome == "unknown"],
        }


def check_history(
    history: Iterable[Operation], *, budget_nodes: int = DEFAULT_BUDGET_NODES
) -> Verdict:
    """Check a whole history; ``budget_nodes`` bounds the search steps of each key."""
    by_key: dict[str, list[Operation]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    results = tuple(
        check_key(k, ops, budget_nodes=budget_nodes) for k, ops in sorted(by_key.items())
    )
    outcomes = {r.outcome for r in results}
    outcome: Outcome = (
        "violation" if "violation" in outcomes else "unknown" if "unknown" in outcomes else "ok"
    )
    return Verdict(outcome, results)


def prune(ops: Sequence[Operation]) -> list[Operation]:
    """Drop or narrow what cannot change the verdict.

    - Reads with an unknown outcome say nothing: dropped.
    - A write with an unknown outcome whose value nobody read: taking effect or not is
      unobservable (unless a ``put_if_absent`` could see it), so it is dropped.
    - A write with an unknown outcome whose value was read, and that is the only write of
      that value: it took effect before that read returned -- a bounded window instead of
      "any time after the call", which keeps the search small.
    """
    kept = [op for op in ops if not (op.kind == "get" and op.unknown)]
    has_cas = any(op.kind == "put_if_absent" for op in kept)
    first_read_return: dict[str | None, float] = {}
    for op in kept:
        if op.kind == "get" and op.return_s is not None:
            prev = first_read_return.get(op.value, math.inf)
            first_read_return[op.value] = min(prev, op.return_s)
    writers: dict[str | None, int] = {}
    for op in kept:
        if op.kind in ("put", "put_if_absent"):
            writers[op.value] = writers.get(op.value, 0) + 1
    out = []
    for op in kept:
        if op.kind in ("put", "put_if_absent") and op.unknown:
            if op.value not in first_read_return:
                if op.kind == "put" and not has_cas:
                    continue
            elif writers[op.value] == 1:
                end = max(op.call_s, first_read_return[op.value])
                op = replace(op, return_s=end, applied=True if op.kind == "put_if_absent" else None)
        out.append(op)
    return out


def _step(state: str | None, op: Operation) -> tuple[bool, str | None]:
    """The register's transition: (is ``op``'s observed output legal here, next state)."""
    if op.kind == "put":
        return True, op.value
    if op.kind == "delete":
        return True, None
    if op.kind == "get":
        return op.value == state, state
    # put_if_absent
    if op.applied is None:
        return True, op.value if state is None else state
    if op.applied:
        return state is None, op.value
    return state is not None, state


def check_key(
    key: str, history: Sequence[Operation], *, budget_nodes: int = DEFAULT_BUDGET_NODES
) -> KeyResult:
    """Wing & Gong search with memoization over one key's operations."""
    ops = prune(history)
    n = len(ops)
    if n == 0:
        return KeyResult(key, "ok", 0, 0)
    impossible = _impossible_read(key, ops)
    if impossible is not None:
        return impossible
    # Entries: 0 is the list head; op i's call is 2i+1, its return 2i+2. At equal times
    # calls sort first: touching operations count as concurrent (the lenient reading).
    events = []
    for i, op in enumerate(ops):
        events.append((op.call_s, 0, 2 * i + 1))
        events.append((math.inf if op.return_s is None else op.return_s, 1, 2 * i + 2))
    events.sort()
    size = 2 * n + 1
    nxt = [-1] * size
    prv = [-1] * size
    chain = [0, *(e[2] for e in events)]
    for a, b in itertools.pairwise(chain):
        nxt[a] = b
        prv[b] = a

    def unlink(e: int) -> None:
        nxt[prv[e]] = nxt[e]
        if nxt[e] != -1:
            prv[nxt[e]] = prv[e]

    def relink(e: int) -> None:
        nxt[prv[e]] = e
        if nxt[e] != -1:
            prv[nxt[e]] = e

    state: str | None = None
    linearized = 0
    seen: set[tuple[int, str | None]] = set()
    stack: list[tuple[int, str | None]] = []  # (call entry, state before it)
    entry = nxt[0]
    nodes = 0
    deepest = -1
    failure: tuple[str | None, int, list[int], list[int]] | None = None
    while nxt[0] != -1:
        nodes += 1
        if nodes > budget_nodes:
            return KeyResult(
                key,
                "unknown",
                n,
                nodes,
                f"key {key!r}: undecided after {budget_nodes} search steps "
                f"({n} operations, {sum(op.unknown for op in ops)} with unknown outcome)",
            )
        if entry & 1:  # a call
            i = (entry - 1) >> 1
            legal, new_state = _step(state, ops[i])
            if legal:
                new_linearized = linearized | (1 << i)
                memo = (new_linearized, new_state)
                if memo not in seen:
                    seen.add(memo)
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    unlink(entry)
                    unlink(entry + 1)
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        # A return whose operation is not linearized yet: this branch is dead.
        if len(stack) > deepest:
            deepest = len(stack)
            failure = (state, (entry - 2) >> 1, _pending_calls(nxt, entry), [c for c, _ in stack])
        # Backtrack. A read that was legal where it was taken need not be tried later: it
        # changes nothing, and every operation that must precede it already did, so if
        # no linearization followed it there, none exists from that point at all.
        backtracked = False
        while stack:
            entry, state = stack.pop()
            i = (entry - 1) >> 1
            linearized &= ~(1 << i)
            relink(entry + 1)
            relink(entry)
            if ops[i].kind != "get":
                backtracked = True
                break
        if not backtracked:
            break
        entry = nxt[entry]
    else:
        return KeyResult(key, "ok", n, nodes)
    assert failure is not None  # set on the first dead branch
    return _explain(key, ops, nodes, *failure)


def _impossible_read(key: str, ops: Sequence[Operation]) -> KeyResult | None:
    """A cheap first look: a read of a value no operation wrote, or whose every write was
    called after the read returned, needs no search to be called a violation."""
    first_call: dict[str, float] = {}
    for op in ops:
        if op.kind in ("put", "put_if_absent") and op.value is not None:
            first_call[op.value] = min(first_call.get(op.value, math.inf), op.call_s)
    for op in ops:
        if op.kind != "get" or op.value is None or op.return_s is None:
            continue
        called = first_call.get(op.value)
        if called is None:
            why = "which no operation on this key ever wrote"
        elif called > op.return_s:
            why = f"which was first written by an operation called later, at {called:.3f}"
        else:
            continue
        explanation = f"key {key!r}: not linearizable: {op.describe()} read a value {why}"
        return KeyResult(key, "violation", len(ops), 0, explanation, (op.op_id,))
    return None


def _pending_calls(nxt: list[int], stop: int) -> list[int]:
    out, e = [], nxt[0]
    while e != stop and e != -1:
        if e & 1:
            out.append((e - 1) >> 1)
        e = nxt[e]
    return out


def _explain(
    key: str,
    ops: Sequence[Operation],
    nodes: int,
    state: str | None,
    blocked: int,
    pending: list[int],
    done_calls: list[int],
) -> KeyResult:
    """Describe the furthest point the search reached: what the register held, which
    write put it there, and the operations none of which could take effect next."""
    done = [(c - 1) >> 1 for c in done_calls]
    writer = next((i for i in reversed(done) if ops[i].kind != "get"), None)
    cause = "initially absent" if writer is None else f"set by {ops[writer].describe()}"
    involved = [i for i in ([writer] if writer is not None else []) if i is not None]
    involved += [i for i in pending if i not in involved]
    if blocked not in involved:
        involved.append(blocked)
    lines = [
        f"key {key!r}: not linearizable. After {len(done)} of {len(ops)} operations the "
        f"register holds {state!r} ({cause}); "
        f"{ops[blocked].describe()} must take effect before its return, but none of the "
        "operations pending then can take effect next:"
    ]
    lines += [f"  {ops[i].describe()}" for i in involved if i != writer]
    return KeyResult(
        key, "violation", len(ops), nodes, "\n".join(lines), tuple(ops[i].op_id for i in involved)
    )
