"""Client sessions in the pure state machine: a request proposed twice is applied once."""

import pytest

from raft import sessions
from raft.commands import Append, Batch, Delete, Put, Session, decode_batch, encode_batch
from raft.sessions import BAD_SESSION, SESSION_EXPIRED, SESSION_STALE, SESSIONS_TABLE
from raft.state_machine import Applied, Record, apply_command, decode_counter

TABLES = ("kv",)
State = dict[tuple[str, bytes], Record]


def run(state: State, index: int, *ops: object, max_bytes: int | None = None) -> Applied:
    payload = encode_batch(Batch(tuple(ops)))  # type: ignore[arg-type]
    used = sum(len(k) + len(r.value) + 64 for (_, k), r in state.items())
    applied = apply_command(
        payload, index, lambda t, k: state.get((t, k)), TABLES, used_bytes=used, max_bytes=max_bytes
    )
    for write in applied.writes:
        if write.record is None:
            state.pop((write.table, write.key), None)
        else:
            state[(write.table, write.key)] = write.record
    return applied


def counter(state: State, key: bytes) -> int:
    record = state.get(("kv", key))
    return decode_counter(None if record is None else record.value)[0] - 1


def sessions_in(state: State) -> int:
    return sum(1 for table, key in state if table == SESSIONS_TABLE and key.startswith(b"c"))


def test_session_round_trips_through_the_codec() -> None:
    batch = Batch((Session(b"client-1", 7, 3, 1), Put("kv", b"k", b"v")))
    assert decode_batch(encode_batch(batch)) == batch
    with pytest.raises(ValueError):
        encode_batch(Batch((Session(b"", 1, 0, 0),)))
    with pytest.raises(ValueError):
        encode_batch(Batch((Session(b"c", 0, 0, 0),)))


def test_a_duplicate_is_answered_with_the_first_result_and_applied_once() -> None:
    state: State = {}
    request = (Session(b"c1", 1, 0, 1), Append("kv", b"n", b"x", 1))
    first = run(state, 5, *request)
    again = run(state, 9, *request)
    assert counter(state, b"n") == 1
    assert first.results[1] == again.results[1]
    assert again.results[1].index == 5 and again.results[1].current_index == 1
    assert not first.results[0].existed and again.results[0].existed  # flagged duplicate
    nxt = run(state, 10, Session(b"c1", 2, 0, 1), Append("kv", b"n", b"x", 1))
    assert counter(state, b"n") == 2 and nxt.results[1].current_index == 2


def test_a_duplicate_keeps_a_failed_compare_and_set_failed() -> None:
    state: State = {}
    run(state, 3, Put("kv", b"k", b"a"))
    request = (Session(b"c", 1, 0, 1), Put("kv", b"k", b"b", expect_index=3))
    assert run(state, 4, *request).results[1].ok
    # A retry of the same request must not answer "conflict" (the key is now at 4).
    assert run(state, 6, *request).results[1].ok
    assert state[("kv", b"k")] == Record(4, b"b")


def test_an_older_request_is_stale_and_changes_nothing() -> None:
    state: State = {}
    run(state, 2, Session(b"c", 3, 0, 1), Put("kv", b"k", b"three"))
    stale = run(state, 4, Session(b"c", 2, 0, 1), Put("kv", b"k", b"two"))
    assert [r.error for r in stale.results] == [SESSION_STALE, SESSION_STALE]
    assert state[("kv", b"k")].value == b"three"


def test_a_floor_not_below_the_entry_is_refused() -> None:
    state: State = {}
    refused = run(state, 4, Session(b"c", 1, 4, 1), Put("kv", b"k", b"v"))
    assert [r.error for r in refused.results] == [BAD_SESSION, BAD_SESSION]
    assert ("kv", b"k") not in state


def test_sessions_are_capped_and_a_dropped_one_is_refused_not_applied_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 3)
    state: State = {}
    for i in range(10):
        run(state, 10 + i, Session(b"c%d" % i, 1, 9 + i, 1), Append("kv", b"n", b"x", 1))
        assert sessions_in(state) <= 3
    assert counter(state, b"n") == 10
    # c0's record is gone: its retry cannot tell whether it was applied and is refused.
    retry = run(state, 30, Session(b"c0", 1, 9, 1), Append("kv", b"n", b"x", 1))
    assert retry.results[1].error == SESSION_EXPIRED and counter(state, b"n") == 10
    # A session that began after the last drop is new.
    fresh = run(state, 31, Session(b"new", 1, 30, 1), Append("kv", b"n", b"x", 1))
    assert fresh.results[1].ok and counter(state, b"n") == 11
    # The most recently used survive: c9 is still known, its retry is a duplicate.
    again = run(state, 32, Session(b"c9", 1, 18, 1), Append("kv", b"n", b"x", 1))
    assert again.results[0].existed and counter(state, b"n") == 11


def test_an_idle_session_expires_after_its_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "SESSION_TTL_ENTRIES", 100)
    state: State = {}
    run(state, 10, Session(b"old", 1, 0, 1), Put("kv", b"a", b"1"))
    run(state, 50, Session(b"busy", 1, 0, 1), Put("kv", b"b", b"1"))
    # Another session's request drops the idle one once it is older than the TTL.
    run(state, 200, Session(b"busy", 2, 0, 1), Put("kv", b"b", b"2"))
    assert sessions_in(state) == 1
    late = run(state, 201, Session(b"old", 2, 0, 1), Put("kv", b"a", b"2"))
    assert late.results[1].error == SESSION_EXPIRED and state[("kv", b"a")].value == b"1"


def test_same_log_same_sessions_on_every_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 5)
    log = [
        (Session(b"c%d" % (i % 8), 1 + i // 8, 0, 1), Append("kv", b"n", b"%d" % i, 1))
        for i in range(60)
    ]
    members: list[State] = [{}, {}]
    for state in members:
        for i, entry in enumerate(log):
            run(state, 1 + i, *entry)
    assert members[0] == members[1]


def test_session_records_never_refuse_a_delete_and_are_undone_with_a_refused_unit() -> None:
    state: State = {}
    run(state, 2, Put("kv", b"big", b"x" * 1000))
    used = sum(len(k) + len(r.value) + 64 for (_, k), r in state.items())
    # Over budget: the growing put is refused, its session records with it.
    refused = run(state, 3, Session(b"c", 1, 0, 1), Put("kv", b"more", b"y" * 500), max_bytes=used)
    assert [r.error for r in refused.results] == ["no_space", "no_space"]
    assert sessions_in(state) == 0
    # A delete with a session frees more than nothing: it applies, its session is kept.
    done = run(state, 4, Session(b"c", 1, 0, 1), Delete("kv", b"big"), max_bytes=used)
    assert done.results[1].ok and ("kv", b"big") not in state and sessions_in(state) == 1


def test_a_pool_reuses_each_session_one_request_at_a_time() -> None:
    made = iter(b"client-%d" % i for i in range(100))
    pool = sessions.SessionPool(lambda: next(made), lambda: 40, max_idle=2)
    first, second = pool.take(), pool.take()  # both outstanding: two sessions
    assert {first.client, second.client} == {b"client-0", b"client-1"}
    assert (first.seq, first.floor) == (1, 40)
    pool.give_back(first)
    again = pool.take()  # the next request of an idle session: same client, next number
    assert (again.client, again.seq, again.floor) == (b"client-0", 2, 40)
    for request in (again, second, pool.take()):
        pool.give_back(request)
    assert pool.idle == 2  # no more than max_idle kept
    assert pool.fresh().client == b"client-3"


def test_pooled_sessions_keep_the_table_small_and_an_expired_one_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 4)
    state: State = {}
    index = 10
    made = iter(b"pooled-%d" % i for i in range(100))
    pool = sessions.SessionPool(lambda: next(made), lambda: index - 1)
    for _ in range(50):
        taken = [pool.take(), pool.take()]  # two writers at a time
        for request in taken:
            s = Session(request.client, request.seq, request.floor, 1)
            assert run(state, index, s, Append("kv", b"n", b"x", 1)).results[1].ok
            index += 1
        for request in taken:
            pool.give_back(request)
    assert counter(state, b"n") == 100 and sessions_in(state) == 2
    # Named clients crowd the pool's sessions out of the table: a pooled request is then
    # refused, not applied; a fresh session goes through.
    for i in range(5):
        run(state, index, Session(b"named-%d" % i, 1, index - 1, 1), Put("kv", b"k", b"v"))
        index += 1
    stale = pool.take()
    refused = run(
        state, index, Session(stale.client, stale.seq, stale.floor, 1), Append("kv", b"n", b"x", 1)
    )
    assert refused.results[1].error == SESSION_EXPIRED and counter(state, b"n") == 100
    index += 1
    fresh = pool.fresh()
    applied = run(
        state, index, Session(fresh.client, fresh.seq, fresh.floor, 1), Append("kv", b"n", b"x", 1)
    )
    assert applied.results[1].ok and counter(state, b"n") == 101
