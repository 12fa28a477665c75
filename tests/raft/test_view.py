import threading
import time
from pathlib import Path

import pytest

from raft.errors import SnapshotError, ViewFullError
from raft.state_machine import Applied, Record, StoredReader, ValueReader, Write
from raft.view import StateView


def test_apply_is_atomic_with_the_index_and_survives_reopen(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",))
    view.apply(7, [Write("kv", b"a", Record(7, b"1")), Write("kv", b"b", Record(7, b"2"))])
    view.apply(8, [Write("kv", b"a", None)])
    view.close()
    reopened = StateView(tmp_path / "v", ("kv",))
    assert reopened.applied_index() == 8
    assert reopened.get("kv", b"a") is None
    assert reopened.get("kv", b"b") == Record(7, b"2")
    reopened.close()


def test_scan_by_prefix_with_limit(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",))
    view.apply(1, [Write("kv", k, Record(1, b"")) for k in (b"a/1", b"a/2", b"a/3", b"b/1")])
    found, more = view.scan("kv", b"a/", 2)
    assert [k for k, _ in found] == [b"a/1", b"a/2"] and more
    found, more = view.scan("kv", b"a/", 10)
    assert [k for k, _ in found] == [b"a/1", b"a/2", b"a/3"] and not more
    assert view.scan("kv", b"z", 10) == ([], False)
    view.close()


def test_snapshot_installs_only_when_ahead(tmp_path: Path) -> None:
    leader = StateView(tmp_path / "leader", ("kv", "sys"))
    leader.apply(20, [Write("kv", b"x", Record(20, b"new")), Write("sys", b"m", Record(3, b"h"))])
    dump = tmp_path / "dump"
    leader.write_snapshot(dump, b"meta-20")

    behind = StateView(tmp_path / "behind", ("kv", "sys"))
    behind.apply(5, [Write("kv", b"stale", Record(5, b"old"))])
    assert behind.restore_snapshot(dump) == b"meta-20"
    assert behind.applied_index() == 20
    assert behind.get("kv", b"stale") is None
    assert behind.get("kv", b"x") == Record(20, b"new")
    assert behind.get("sys", b"m") == Record(3, b"h")

    ahead = StateView(tmp_path / "ahead", ("kv", "sys"))
    ahead.apply(30, [Write("kv", b"mine", Record(30, b"keep"))])
    ahead.restore_snapshot(dump)
    assert ahead.applied_index() == 30 and ahead.get("kv", b"mine") == Record(30, b"keep")
    for view in (leader, behind, ahead):
        view.close()


def test_garbage_dump_raises_a_snapshot_error(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",))
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an lmdb file" * 100)
    with pytest.raises(SnapshotError):
        view.restore_snapshot(bad)
    view.close()


def test_apply_indexed_reads_indexes_and_stores_writes(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",))
    view.apply(3, [Write("kv", b"a", Record(3, b"old"))])
    seen: list[tuple[int, int] | None] = []

    def compute(read_stored: StoredReader, read_value: ValueReader, used: int) -> Applied:
        seen.extend([read_stored("kv", b"a"), read_stored("kv", b"missing")])
        assert read_value("kv", b"a") == b"old" and read_value("kv", b"missing") is None
        return Applied((Write("kv", b"a", Record(4, b"new")),), ())

    view.apply_indexed(4, compute)
    assert seen == [(3, 3), None]
    assert view.get("kv", b"a") == Record(4, b"new") and view.applied_index() == 4
    assert view.size_bytes() > 0
    view.close()


def test_scan_from_a_start_key_with_the_record_preceding_it(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",))
    keys = [b"a", b"s/1", b"s/4", b"s/7", b"t/1"]
    view.apply(1, [Write("kv", k, Record(1, k)) for k in keys])

    def scan(start: bytes, preceding: bool) -> list[bytes]:
        return [k for k, _ in view.scan("kv", b"s/", 10, start=start, preceding=preceding)[0]]

    assert scan(b"s/5", False) == [b"s/7"]
    assert scan(b"s/5", True) == [b"s/4", b"s/7"]
    assert scan(b"s/4", True) == [b"s/1", b"s/4", b"s/7"]
    assert scan(b"s/0", True) == [b"s/1", b"s/4", b"s/7"]  # "a" is outside the prefix
    assert scan(b"s/9", True) == [b"s/7"]
    assert scan(b"s/9", False) == []
    view.close()


MIB = 1 << 20


def test_an_entry_larger_than_the_map_grows_it_and_is_applied(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",), map_size=MIB, max_map_size=64 * MIB)
    view.apply(1, [Write("kv", b"big", Record(1, b"b" * (3 * MIB)))])  # MDB_MAP_FULL first
    assert view.map_size() >= 4 * MIB
    assert view.applied_index() == 1 and view.get("kv", b"big") == Record(1, b"b" * (3 * MIB))
    view.close()


def test_a_view_at_its_largest_map_refuses_the_entry_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    view = StateView(tmp_path / "v", ("kv",), map_size=MIB, max_map_size=2 * MIB)
    view.apply(1, [Write("kv", b"a", Record(1, b"1"))])
    with pytest.raises(ViewFullError, match="max_view_bytes"):
        view.apply(2, [Write("kv", b"big", Record(2, b"b" * (3 * MIB)))])
    assert view.applied_index() == 1 and view.get("kv", b"big") is None
    assert view.map_size() == 2 * MIB
    view.apply(3, [Write("kv", b"b", Record(3, b"2"))])  # smaller entries still apply
    assert view.applied_index() == 3
    view.close()


def test_the_logical_size_follows_writes_and_dumps_and_is_recounted(tmp_path: Path) -> None:
    from raft.state_machine import record_cost

    view = StateView(tmp_path / "v", ("kv", "sys"))
    view.apply(1, [Write("kv", b"a", Record(1, b"12345")), Write("sys", b"b", Record(1, b""))])
    view.apply(2, [Write("kv", b"a", Record(2, b"1")), Write("kv", b"c", Record(2, b"xy"))])
    view.apply(3, [Write("sys", b"b", None), Write("kv", b"missing", None)])
    expected = record_cost(1, 1) + record_cost(1, 2)
    assert view.logical_bytes() == expected
    dump = tmp_path / "dump"
    view.write_snapshot(dump, b"meta")
    view.close()
    assert StateView(tmp_path / "v", ("kv", "sys")).logical_bytes() == expected
    other = StateView(tmp_path / "other", ("kv", "sys"))
    other.apply(1, [Write("kv", b"zzz", Record(1, b"old" * 100))])
    other.restore_snapshot(dump)
    assert other.logical_bytes() == expected
    other.close()
    # A view from before the logical size was kept: counted once when opened.
    import lmdb

    env = lmdb.open(str(tmp_path / "v"), max_dbs=3)
    with env.begin(write=True) as txn:
        txn.delete(b"logical_bytes", db=env.open_db(b"__raft__", txn=txn))
    env.close()
    assert StateView(tmp_path / "v", ("kv", "sys")).logical_bytes() == expected


def test_replicas_with_different_maps_and_histories_reach_the_same_results(
    tmp_path: Path,
) -> None:
    import random

    from raft.commands import Batch, Delete, Guard, Put, encode_batch
    from raft.state_machine import apply_command_indexed, record_cost

    budget = 64 * 1024
    small = StateView(tmp_path / "small", ("kv",), map_size=MIB, max_map_size=16 * MIB)
    large = StateView(tmp_path / "large", ("kv",), map_size=256 * MIB, max_map_size=256 * MIB)
    rng = random.Random(7)
    refused = 0
    for index in range(1, 400):
        ops: list[object] = []
        for _ in range(rng.randint(1, 4)):
            key = b"k%d" % rng.randint(0, 40)
            if rng.random() < 0.25:
                ops.append(Delete("kv", key))
            elif rng.random() < 0.2:
                ops += [Guard("kv", key, 0, 1), Put("kv", key + b"g", b"v" * rng.randint(0, 9000))]
            else:
                ops.append(Put("kv", key, b"v" * rng.randint(0, 9000)))
        payload = encode_batch(Batch(tuple(ops)))  # type: ignore[arg-type]
        results = [
            view.apply_indexed(
                index,
                lambda stored, value, used, payload=payload, index=index: apply_command_indexed(
                    payload, index, stored, ("kv",), value, used_bytes=used, max_bytes=budget
                ),
            ).results
            for view in (small, large)
        ]
        assert results[0] == results[1]
        refused += sum(r.error == "no_space" for r in results[0])
        if index == 200:  # one replica restarts: its logical size is read back
            large.close()
            large = StateView(tmp_path / "large", ("kv",), map_size=256 * MIB)
    found, _ = small.scan("kv", b"", 1000)
    assert found == large.scan("kv", b"", 1000)[0]
    counted = sum(record_cost(len(k), len(r.value)) for k, r in found)
    assert small.logical_bytes() == large.logical_bytes() == counted <= budget
    assert refused > 10 and small.map_size() != large.map_size()
    small.close()
    large.close()


def test_changes_count_the_writes_of_each_table_and_snapshots(tmp_path: Path) -> None:
    view = StateView(tmp_path / "a", ("kv", "sys"))
    kv, sys = view.changes("kv"), view.changes("sys")
    view.apply(1, [Write("kv", b"k", Record(1, b"v"))])
    assert view.changes("sys") == sys and view.changes("kv") != kv
    view.apply(2, [Write("sys", b"access/x", Record(2, b"t"))])
    sys = view.changes("sys")
    view.apply(3, [Write("sys", b"access/x", None)])  # a revocation
    assert view.changes("sys") != sys
    leader = StateView(tmp_path / "b", ("kv", "sys"))
    leader.apply(9, [Write("kv", b"k", Record(9, b"w"))])
    leader.write_snapshot(tmp_path / "dump", b"meta-9")
    sys = view.changes("sys")
    assert view.restore_snapshot(tmp_path / "dump") == b"meta-9"
    assert view.changes("sys") != sys and view.get("sys", b"access/x") is None
    for each in (view, leader):
        each.close()


def test_the_map_grows_only_once_readers_of_other_threads_are_done(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",), map_size=MIB, max_map_size=64 * MIB)
    view.apply(1, [Write("kv", b"a", Record(1, b"x"))])
    opened, release = threading.Event(), threading.Event()

    def hold_a_read() -> None:
        with view.read_txn(view.reader("kv")) as txn:
            assert txn.get(b"a") is not None
            opened.set()
            release.wait(30)

    reader = threading.Thread(target=hold_a_read)
    reader.start()
    assert opened.wait(10)
    before = view.map_size()
    # Only due (pages past three quarters): put off while a reader is open.
    assert view._grow() is False and view.map_size() == before
    # Forced (a write met MDB_MAP_FULL): waits for the reader, then grows.
    writer = threading.Thread(target=lambda: view.apply(2, [Write("kv", b"big",
                              Record(2, b"y" * (2 * MIB)))]))  # fmt: skip
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive() and view.map_size() == before  # waiting, not resized
    release.set()
    writer.join(30)
    reader.join(30)
    assert not writer.is_alive() and view.map_size() > before
    assert view.get("kv", b"big") == Record(2, b"y" * (2 * MIB))
    view.close()


def test_reads_from_threads_while_the_map_grows_many_times(tmp_path: Path) -> None:
    view = StateView(tmp_path / "v", ("kv",), map_size=MIB, max_map_size=256 * MIB)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read_all_the_time() -> None:
        try:
            while not stop.is_set():
                found, _ = view.scan("kv", b"k/", 200)
                seen.append(len(found))
                assert all(r.value == b"v" * 4096 for _, r in found[:50])
                time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read_all_the_time) for _ in range(3)]
    for thread in readers:
        thread.start()
    start = view.map_size()
    for index in range(1, 121):  # 120 x 100 KiB: the map doubles several times
        writes = [Write("kv", b"k/%06d/%02d" % (index, i), Record(index, b"v" * 4096))
                  for i in range(25)]  # fmt: skip
        view.apply(index, writes)
    stop.set()
    for thread in readers:
        thread.join(30)
    assert not errors, errors
    assert view.map_size() >= 8 * start and seen and max(seen) == 200
    assert len(view.scan("kv", b"k/", 1_000_000)[0]) == 120 * 25
    view.close()
