from pathlib import Path

import pytest

from raft.errors import SnapshotError
from raft.state_machine import Applied, IndexReader, Record, ValueReader, Write
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
    seen: list[int | None] = []

    def compute(read_index: IndexReader, read_value: ValueReader) -> Applied:
        seen.extend([read_index("kv", b"a"), read_index("kv", b"missing")])
        assert read_value("kv", b"a") == b"old" and read_value("kv", b"missing") is None
        return Applied((Write("kv", b"a", Record(4, b"new")),), ())

    view.apply_indexed(4, compute)
    assert seen == [3, None]
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
