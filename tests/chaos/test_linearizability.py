"""The linearizability checker: pure, fast, no root."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from meshorch.chaos.linearizability import Operation, OpKind, check_history, check_key


def op(
    op_id: int,
    kind: OpKind,
    call: float,
    ret: float | None,
    value: str | None = None,
    *,
    key: str = "k",
    applied: bool | None = None,
) -> Operation:
    return Operation(key, kind, call, ret, value, applied, op_id, f"c{op_id}")


# --- linearizable ------------------------------------------------------------------------


def test_empty_and_sequential() -> None:
    assert check_history([]).outcome == "ok"
    history = [
        op(1, "get", 0, 1, None),
        op(2, "put", 2, 3, "a"),
        op(3, "get", 4, 5, "a"),
        op(4, "delete", 6, 7),
        op(5, "get", 8, 9, None),
    ]
    assert check_history(history).outcome == "ok"


def test_concurrent_overlaps_may_order_either_way() -> None:
    # Both reads overlap both writes: any order of the writes works.
    history = [
        op(1, "put", 0, 10, "a"),
        op(2, "put", 1, 9, "b"),
        op(3, "get", 2, 3, "b"),
        op(4, "get", 4, 5, "a"),
        op(5, "get", 11, 12, "a"),
    ]
    assert check_history(history).outcome == "ok"


def test_timed_out_write_that_applied_later() -> None:
    history = [
        op(1, "put", 0, 1, "a"),
        op(2, "put", 2, None, "b"),  # outcome unknown
        op(3, "get", 3, 4, "a"),  # not applied yet
        op(4, "get", 50, 51, "b"),  # applied much later: still fine
    ]
    assert check_history(history).outcome == "ok"


def test_timed_out_write_that_never_applied() -> None:
    history = [op(1, "put", 0, 1, "a"), op(2, "put", 2, None, "b"), op(3, "get", 9, 10, "a")]
    assert check_history(history).outcome == "ok"


def test_unknown_delete_and_put_if_absent() -> None:
    history = [
        op(1, "put", 0, 1, "a"),
        op(2, "delete", 2, None),
        op(3, "get", 3, 4, None),
        op(4, "put_if_absent", 5, 6, "b", applied=True),
        op(5, "put_if_absent", 7, 8, "c", applied=False),
        op(6, "put_if_absent", 9, None, "d"),
        op(7, "get", 10, 11, "b"),
    ]
    assert check_history(history).outcome == "ok"


def test_unknown_put_if_absent_that_was_read() -> None:
    history = [
        op(1, "put_if_absent", 0, None, "a"),
        op(2, "get", 1, 2, "a"),
        op(3, "put_if_absent", 3, 4, "b", applied=False),
        op(4, "delete", 5, 6),
        op(5, "put_if_absent", 7, 8, "c", applied=True),
    ]
    assert check_history(history).outcome == "ok"
    # Applied before the read returned, so it cannot also be what a later CAS saw absent.
    history.append(op(6, "get", 0.5, 0.6, None))
    history.append(op(7, "put_if_absent", 9, 10, "d", applied=True))
    assert check_history(history).outcome == "violation"


def test_a_read_cannot_see_a_write_before_its_call() -> None:
    history = [op(1, "get", 0, 1, "a"), op(2, "put", 2, 3, "a")]
    verdict = check_history(history)
    assert verdict.outcome == "violation"


# --- violations --------------------------------------------------------------------------


def test_stale_read_after_a_completed_write() -> None:
    history = [
        op(1, "put", 0, 1, "a"),
        op(2, "put", 2, 3, "b"),
        op(3, "get", 4, 5, "a"),
    ]
    verdict = check_history(history)
    assert verdict.outcome == "violation"
    (bad,) = [k for k in verdict.keys if k.outcome == "violation"]
    assert bad.key == "k"
    assert 3 in bad.involved and 2 in bad.involved
    assert "'b'" in verdict.explanation and "#3" in verdict.explanation


def test_lost_write() -> None:
    history = [op(1, "put", 0, 1, "a"), op(2, "get", 2, 3, None)]
    verdict = check_history(history)
    assert verdict.outcome == "violation"
    assert set(verdict.keys[0].involved) >= {1, 2}


def test_read_of_a_value_never_written() -> None:
    history = [op(1, "put", 0, 1, "a"), op(2, "get", 0.5, 3, "zzz")]
    verdict = check_history(history)
    assert verdict.outcome == "violation"
    assert "ever wrote" in verdict.explanation and verdict.keys[0].involved == (2,)
    future = [op(1, "get", 0, 1, "a"), op(2, "put", 2, 3, "a")]
    assert "called later" in check_history(future).explanation


def test_non_monotonic_reads_across_non_overlapping_ops() -> None:
    # The write overlaps both reads, but the second read starts after the first ended:
    # once the new value was seen, the old one cannot come back.
    history = [
        op(1, "put", 0, 1, "a"),
        op(2, "put", 2, 20, "b"),
        op(3, "get", 3, 4, "b"),
        op(4, "get", 5, 6, "a"),
    ]
    assert check_history(history).outcome == "violation"


def test_put_if_absent_applied_over_a_present_value() -> None:
    history = [op(1, "put", 0, 1, "a"), op(2, "put_if_absent", 2, 3, "b", applied=True)]
    assert check_history(history).outcome == "violation"


def test_keys_are_independent() -> None:
    history = [
        op(1, "put", 0, 1, "a", key="x"),
        op(2, "get", 2, 3, "a", key="x"),
        op(3, "put", 0, 1, "a", key="y"),
        op(4, "get", 2, 3, None, key="y"),
    ]
    verdict = check_history(history)
    assert verdict.outcome == "violation"
    assert [(k.key, k.outcome) for k in verdict.keys] == [("x", "ok"), ("y", "violation")]


def test_budget_gives_unknown_not_a_hang() -> None:
    # Many mutually concurrent writes and reads: exhaustive search is large.
    history = [op(i, "put", 0, 100, f"v{i}") for i in range(24)]
    history += [op(100 + i, "get", 1 + i, 2 + i, f"v{(i * 7) % 24}") for i in range(24)]
    # Once every write is over the register cannot change: a violation, found only by search.
    history += [op(998, "get", 101, 102, "v1"), op(999, "get", 103, 104, "v2")]
    result = check_key("k", history, budget_nodes=1000)
    assert result.outcome == "unknown"
    assert "1000" in result.explanation


def test_malformed_operations_are_refused() -> None:
    with pytest.raises(ValueError, match="before its call"):
        op(1, "put", 5, 4, "a")
    with pytest.raises(ValueError, match="needs a value"):
        op(1, "put", 0, 1, None)
    with pytest.raises(ValueError, match="kind"):
        Operation("k", "cas", 0, 1, "a")  # type: ignore[arg-type]


def test_json_round_trip() -> None:
    ops = [op(1, "put", 0, 1, "a"), op(2, "put_if_absent", 1, None, "b"), op(3, "get", 2, 3)]
    assert [Operation.from_json(o.to_json()) for o in ops] == ops
    with pytest.raises(ValueError, match="malformed"):
        Operation.from_json({"kind": "get"})


# --- generated histories -----------------------------------------------------------------


def simulate(
    rng: random.Random, *, clients: int, ops_per_client: int, keys: int, unknown_rate: float = 0.05
) -> list[Operation]:
    """Clients issuing operations on an atomic register: each takes effect at one instant
    between its call and its return (or, timed out, at some instant or never)."""
    planned: list[tuple[float, int, str, OpKind, str | None, float, float | None, bool]] = []
    kinds: list[OpKind] = ["put", "get", "delete", "put_if_absent"]
    next_id = 0
    for c in range(clients):
        t = rng.random()
        for _ in range(ops_per_client):
            kind = rng.choices(kinds, [4, 5, 1, 1])[0]
            key = f"key{rng.randrange(keys)}"
            call = t + rng.random() * 0.5
            point = call + rng.random() * 2.0
            ret: float | None = point + rng.random() * 2.0
            applies = True
            if rng.random() < unknown_rate:
                ret = None
                applies = rng.random() < 0.5
                point = call + rng.random() * 30.0  # maybe long after everything
            next_id += 1
            value = f"c{c}-{next_id}" if kind in ("put", "put_if_absent") else None
            planned.append((point, next_id, key, kind, value, call, ret, applies))
            t = call + 0.1 if ret is None else ret
    state: dict[str, str | None] = {}
    history = []
    for _point, op_id, key, kind, value, call, ret, applies in sorted(planned):
        applied = None
        if kind == "put" and applies:
            state[key] = value
        elif kind == "delete" and applies:
            state[key] = None
        elif kind == "get":
            value = state.get(key)
        elif kind == "put_if_absent" and applies:
            applied = state.get(key) is None
            if applied:
                state[key] = value
            if ret is None:
                applied = None  # the client never heard
        history.append(Operation(key, kind, call, ret, value, applied, op_id, f"c{op_id}"))
    return sorted(history, key=lambda o: o.op_id)


@pytest.mark.parametrize("seed", range(40))
def test_simulated_atomic_registers_are_linearizable(seed: int) -> None:
    rng = random.Random(seed)
    history = simulate(rng, clients=rng.randint(2, 6), ops_per_client=40, keys=rng.randint(1, 4))
    verdict = check_history(history)
    assert verdict.outcome == "ok", verdict.explanation


def stale_read_mutation(history: list[Operation]) -> list[Operation] | None:
    """Make a read return the value of a write that two completed writes ago was
    overwritten: w1 ends before w2 starts, w2 ends before the read starts."""
    puts = [o for o in history if o.kind == "put" and o.return_s is not None]
    gets = [o for o in history if o.kind == "get" and o.return_s is not None]
    for g in gets:
        for w2 in puts:
            if w2.key != g.key or w2.return_s is None or w2.return_s >= g.call_s:
                continue
            for w1 in puts:
                if w1.key == g.key and w1.return_s is not None and w1.return_s < w2.call_s:
                    return [replace(o, value=w1.value) if o is g else o for o in history]
    return None


@pytest.mark.parametrize("seed", range(40))
def test_mutated_histories_are_caught(seed: int) -> None:
    rng = random.Random(1000 + seed)
    history = simulate(rng, clients=rng.randint(2, 5), ops_per_client=30, keys=rng.randint(1, 3))
    stale = stale_read_mutation(history)
    assert stale is not None
    assert check_history(stale).outcome == "violation"
    gets = [i for i, o in enumerate(history) if o.kind == "get" and o.return_s is not None]
    victim = rng.choice(gets)
    bogus = [replace(o, value="never-written") if i == victim else o for i, o in enumerate(history)]
    verdict = check_history(bogus)
    assert verdict.outcome == "violation"
    assert history[victim].op_id in [i for k in verdict.keys for i in k.involved]


def test_5000_ops_over_20_keys_in_a_few_seconds() -> None:
    history = simulate(random.Random(7), clients=10, ops_per_client=500, keys=20)
    assert len(history) == 5000
    start = time.perf_counter()
    verdict = check_history(history)
    elapsed = time.perf_counter() - start
    assert verdict.outcome == "ok", verdict.explanation
    assert elapsed < 5.0, f"{elapsed:.2f}s"
