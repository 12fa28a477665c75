import random

import pytest

from raft.commands import Append, Barrier, Batch, Delete, Guard, Put, decode_batch, encode_batch
from raft.state_machine import (
    Applied,
    Record,
    Write,
    apply_command,
    apply_command_indexed,
    decode_counter,
    growth_bound,
    item_key,
    record_cost,
)

TABLES = ("kv", "sys")


def run(state: dict[tuple[str, bytes], Record], index: int, *ops: object) -> Applied:
    payload = encode_batch(Batch(tuple(ops)))  # type: ignore[arg-type]
    applied = apply_command(payload, index, lambda t, k: state.get((t, k)), TABLES)
    for write in applied.writes:
        if write.record is None:
            state.pop((write.table, write.key), None)
        else:
            state[(write.table, write.key)] = write.record
    return applied


def test_put_records_the_index_and_reports_whether_the_key_existed() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    first = run(state, 5, Put("kv", b"k", b"v1"))
    second = run(state, 6, Put("kv", b"k", b"v2"))
    assert first.results[0].existed is False and first.results[0].index == 5
    assert second.results[0].existed is True
    assert state[("kv", b"k")] == Record(6, b"v2")


def test_delete_of_missing_key_writes_nothing() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    applied = run(state, 3, Delete("kv", b"nope"))
    assert applied.writes == ()
    assert applied.results[0].ok and not applied.results[0].existed


def test_ops_in_one_batch_see_each_other() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    applied = run(
        state,
        9,
        Put("kv", b"k", b"a"),
        Put("kv", b"k", b"b", expect_index=9),
        Delete("kv", b"k"),
        Put("kv", b"k", b"c", expect_index=0),
    )
    assert [r.ok for r in applied.results] == [True, True, True, True]
    assert applied.writes == (Write("kv", b"k", Record(9, b"c")),)


def test_compare_and_set_conflict_changes_nothing() -> None:
    state = {("kv", b"k"): Record(4, b"old")}
    applied = run(state, 10, Put("kv", b"k", b"new", expect_index=3))
    result = applied.results[0]
    assert not result.ok and result.error == "conflict" and result.current_index == 4
    assert applied.writes == ()
    assert state[("kv", b"k")] == Record(4, b"old")


def test_unknown_table_is_refused_per_operation() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    applied = run(state, 2, Put("nope", b"k", b"v"), Put("kv", b"k", b"v"), Barrier())
    assert [r.error for r in applied.results] == ["unknown_table", None, None]
    assert list(state) == [("kv", b"k")]


def test_undecodable_payload_changes_nothing() -> None:
    applied = apply_command(b"\x07garbage", 1, lambda t, k: None, TABLES)
    assert applied == Applied((), ())


def test_same_log_gives_same_state() -> None:
    log = [
        encode_batch(Batch((Put("kv", b"k%d" % (i % 7), b"v%d" % i), Delete("kv", b"k3"))))
        for i in range(50)
    ]
    states = []
    for _ in range(2):
        state: dict[tuple[str, bytes], Record] = {}
        for index, payload in enumerate(log, start=1):
            applied = apply_command(payload, index, lambda t, k, s=state: s.get((t, k)), TABLES)
            for w in applied.writes:
                if w.record is None:
                    state.pop((w.table, w.key), None)
                else:
                    state[(w.table, w.key)] = w.record
        states.append(state)
    assert states[0] == states[1] and ("kv", b"k3") not in states[0]


def test_guard_applies_its_operations_when_the_index_matches() -> None:
    state = {("sys", b"trust"): Record(4, b"t4")}
    applied = run(
        state,
        11,
        Guard("sys", b"trust", 4, 2),
        Put("kv", b"app", b"a"),
        Put("sys", b"trust", b"t11"),
    )
    assert [r.ok for r in applied.results] == [True, True, True]
    assert state[("kv", b"app")] == Record(11, b"a")
    assert state[("sys", b"trust")] == Record(11, b"t11")


def test_failed_guard_skips_exactly_its_operations() -> None:
    state = {("sys", b"trust"): Record(7, b"t7")}
    applied = run(
        state,
        12,
        Guard("sys", b"trust", 4, 2),
        Put("kv", b"app", b"a"),
        Delete("sys", b"trust"),
        Put("kv", b"other", b"o"),  # another proposal of the same entry
    )
    assert [r.error for r in applied.results] == ["conflict", "guarded", "guarded", None]
    assert applied.results[0].current_index == 7
    assert state == {("sys", b"trust"): Record(7, b"t7"), ("kv", b"other"): Record(12, b"o")}


def test_guard_expecting_absence_and_on_unknown_table() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    applied = run(
        state, 3, Guard("sys", b"x", 0, 1), Put("kv", b"a", b"1"),
        Guard("nope", b"x", 0, 1), Put("kv", b"b", b"2"),
    )  # fmt: skip
    assert [r.error for r in applied.results] == [None, None, "unknown_table", "guarded"]
    assert list(state) == [("kv", b"a")]


def test_append_numbers_items_in_log_order_and_counts_bytes() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    first = run(state, 4, Append("kv", b"s", b"abc", 3), Append("kv", b"s", b"de", 2))
    second = run(state, 5, Append("kv", b"s", b"f", 1), Append("kv", b"t", b"g", 1))
    assert [r.current_index for r in first.results] == [1, 4]
    assert [r.current_index for r in second.results] == [6, 1]
    assert state[("kv", item_key(b"s", 1))] == Record(4, b"abc")
    assert state[("kv", item_key(b"s", 4))] == Record(4, b"de")
    assert state[("kv", item_key(b"s", 6))] == Record(5, b"f")
    assert decode_counter(state[("kv", b"s")].value) == (7, 6)
    assert decode_counter(state[("kv", b"t")].value) == (2, 1)


def test_append_skipped_by_a_failed_guard_takes_no_number() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    run(state, 2, Put("kv", b"g", b"x"))
    skipped = run(state, 3, Guard("kv", b"g", 1, 1), Append("kv", b"s", b"a", 1))
    taken = run(state, 4, Append("kv", b"s", b"b", 1))
    assert skipped.results[1].error == "guarded"
    assert taken.results[0].current_index == 1 and ("kv", item_key(b"s", 2)) not in state


def test_append_without_a_value_reader_is_refused() -> None:
    payload = encode_batch(Batch((Append("kv", b"s", b"a", 1),)))
    applied = apply_command_indexed(payload, 1, lambda t, k: None, TABLES)
    assert applied.writes == () and applied.results[0].error == "unsupported"


def test_append_round_trips_and_rejects_bad_counts() -> None:
    op = Append("kv", b"s", b"payload", 7)
    assert decode_batch(encode_batch(Batch((op,)))).ops == (op,)
    with pytest.raises(ValueError):
        encode_batch(Batch((Append("kv", b"s", b"a", 0),)))


def run_within(
    state: dict[tuple[str, bytes], Record], index: int, budget: int, *ops: object
) -> Applied:
    """``run`` with the state budget, the logical size counted from ``state``."""
    used = sum(record_cost(len(k), len(r.value)) for (_, k), r in state.items())
    payload = encode_batch(Batch(tuple(ops)))  # type: ignore[arg-type]
    applied = apply_command(
        payload, index, lambda t, k: state.get((t, k)), TABLES, used_bytes=used, max_bytes=budget
    )
    for write in applied.writes:
        if write.record is None:
            state.pop((write.table, write.key), None)
        else:
            state[(write.table, write.key)] = write.record
    return applied


def test_writes_past_the_budget_are_refused_and_deletes_make_room() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    budget = 2 * record_cost(1, 100)
    applied = run_within(
        state,
        1,
        budget,
        Put("kv", b"a", b"x" * 100),
        Put("kv", b"b", b"x" * 100),
        Put("kv", b"c", b"x"),
    )
    assert [r.error for r in applied.results] == [None, None, "no_space"]
    assert set(state) == {("kv", b"a"), ("kv", b"b")}
    # Replacing a value with one no larger applies at the limit; a larger one does not.
    applied = run_within(state, 2, budget, Put("kv", b"a", b"y" * 100), Put("kv", b"b", b"z" * 101))
    assert [r.error for r in applied.results] == [None, "no_space"]
    # A delete frees room for the writes after it, in the same entry.
    applied = run_within(state, 3, budget, Delete("kv", b"a"), Put("kv", b"c", b"x" * 100))
    assert [r.ok for r in applied.results] == [True, True]
    assert state[("kv", b"c")] == Record(3, b"x" * 100)


def test_deletes_apply_even_over_budget() -> None:
    state = {("kv", b"a"): Record(1, b"x" * 500), ("kv", b"b"): Record(1, b"x" * 500)}
    applied = run_within(state, 2, 10, Delete("kv", b"a"), Put("kv", b"b", b"small"))
    assert [r.ok for r in applied.results] == [True, True]  # both shrink the state
    assert run_within(state, 3, 10, Put("kv", b"c", b"")).results[0].error == "no_space"


def test_a_guard_and_its_writes_are_refused_together() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    budget = record_cost(1, 10) + record_cost(1, 1) + 5
    applied = run_within(
        state,
        1,
        budget,
        Put("kv", b"a", b"x" * 10),
        Guard("kv", b"g", 0, 2),
        Put("kv", b"g", b"1"),
        Put("kv", b"b", b"too much"),
        Put("kv", b"c", b"1"),
    )
    assert [r.error for r in applied.results] == [None, "no_space", "no_space", "no_space", None]
    assert set(state) == {("kv", b"a"), ("kv", b"c")}


def test_appends_count_their_item_and_counter_against_the_budget() -> None:
    state: dict[tuple[str, bytes], Record] = {}
    first = record_cost(1, 16) + record_cost(9, 3)  # the counter, then item 1
    applied = run_within(state, 1, first + record_cost(9, 3), Append("kv", b"s", b"abc", 1))
    assert applied.results[0].ok
    assert (
        run_within(state, 2, first + record_cost(9, 3), Append("kv", b"s", b"def", 1)).results[0].ok
    )
    refused = run_within(state, 3, first + record_cost(9, 3), Append("kv", b"s", b"g", 1))
    assert refused.results[0].error == "no_space"
    assert decode_counter(state[("kv", b"s")].value) == (3, 6)  # no number taken


def random_ops(rng: random.Random) -> list[object]:
    ops: list[object] = []
    for _ in range(rng.randint(1, 12)):
        key, value = b"k%d" % rng.randrange(8), b"v" * rng.randint(0, 300)
        kind = rng.randrange(5)
        if kind == 0:
            ops.append(Delete("kv", rng.choice([key, b"s"])))
        elif kind == 1:  # appends have keys of their own: a counter is no plain value
            ops.append(Append("kv", b"s%d" % rng.randrange(3), value, rng.randint(1, 3)))
        elif kind == 2:
            ops += [Guard("kv", key, rng.choice([0, 1, 2]), 1), Put("kv", key, value)]
        else:
            ops.append(Put("kv", key, value, rng.choice([None, None, 0])))
    return ops


def logical(state: dict[tuple[str, bytes], Record]) -> int:
    return sum(record_cost(len(k), len(r.value)) for (_, k), r in state.items())


def apply_to(
    state: dict[tuple[str, bytes], Record], payload: bytes, index: int, max_bytes: int
) -> Applied:
    return apply_command(
        payload,
        index,
        lambda t, k: state.get((t, k)),
        TABLES,
        used_bytes=logical(state),
        max_bytes=max_bytes,
    )


def test_an_entry_within_its_growth_bound_applies_as_when_counted() -> None:
    """The shortcut (no accounting when ``growth_bound`` fits the budget) changes no
    result: a random entry applied with its bound to spare gives what the counted path
    gives one byte short of it, and grows the state by less than the bound."""
    rng = random.Random(7)
    state: dict[tuple[str, bytes], Record] = {}
    for index in range(1, 400):
        ops = random_ops(rng)
        payload = encode_batch(Batch(tuple(ops)))  # type: ignore[arg-type]
        used, bound = logical(state), growth_bound(len(payload), len(ops))
        applied = apply_to(state, payload, index, used + bound)
        assert apply_to(state, payload, index, used + bound - 1) == applied
        for write in applied.writes:
            if write.record is None:
                state.pop((write.table, write.key), None)
            else:
                state[(write.table, write.key)] = write.record
        assert logical(state) - used < bound
    assert any(r.ok for r in applied.results) and len(state) > 5
