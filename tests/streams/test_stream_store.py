"""The LMDB stream store, on a real LMDB environment in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from meshorch.stream_store import StreamStore
from meshorch.streams import (
    HEADER_BYTES,
    MAX_EVENT_BYTES,
    EventTooLarge,
    InvalidStreamName,
    MalformedEvent,
    NewEvent,
    OffsetOutOfRange,
    RetentionPolicy,
    StreamError,
    StreamStoreCorrupt,
    UnknownStream,
)

S = "acme/pos/sales"


def events(n: int, t0: float = 0.0, size: int = 10) -> list[NewEvent]:
    return [NewEvent(b"%0*d" % (size, i), t0 + i) for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> StreamStore:
    return StreamStore(tmp_path / "streams", sync=False)


def test_append_and_read(store: StreamStore) -> None:
    assert store.append_batch(S, events(3)) == (1, 3)
    assert store.append_batch(S, [NewEvent(b"k", 9.0, key=b"id-1", level=4)]) == (4, 4)
    got = store.read(S)
    assert [e.seq for e in got] == [1, 2, 3, 4]
    assert got[3].key == b"id-1" and got[3].level == 4 and got[3].time_s == 9.0
    assert [e.seq for e in store.read(S, after_seq=2)] == [3, 4]
    assert [e.seq for e in store.read(S, after_seq=0, limit=2)] == [1, 2]
    assert store.read(S, after_seq=4) == []
    stats = store.stats(S)
    assert (stats.first_seq, stats.last_seq, stats.count) == (1, 4, 4)
    assert stats.total_bytes == 3 * (HEADER_BYTES + 10) + HEADER_BYTES + 5


def test_read_max_bytes_returns_at_least_one(store: StreamStore) -> None:
    store.append_batch(S, events(5, size=1000))
    assert len(store.read(S, max_bytes=1)) == 1
    assert len(store.read(S, max_bytes=2 * (HEADER_BYTES + 1000))) == 2


def test_streams_are_separate(store: StreamStore) -> None:
    other = "acme/pos/audit"
    store.append_batch(S, events(3))
    store.append_batch(other, events(2))
    store.append_batch(S, events(1))
    assert [e.seq for e in store.read(S)] == [1, 2, 3, 4]
    assert [e.seq for e in store.read(other)] == [1, 2]
    assert sorted(store.streams()) == [other, S]


def test_bad_requests_are_refused(store: StreamStore) -> None:
    with pytest.raises(InvalidStreamName):
        store.append_batch("nope", events(1))
    with pytest.raises(EventTooLarge) as info:
        store.append_batch(S, [NewEvent(b"ok", 1.0), NewEvent(b"x" * MAX_EVENT_BYTES, 1.0)])
    assert info.value.code == "event_too_large"
    with pytest.raises(MalformedEvent):
        store.append_batch(S, [NewEvent(b"x", float("inf"))])
    with pytest.raises(UnknownStream):
        store.read(S)  # nothing was created by the refused batches
    store.append_batch(S, events(1))
    with pytest.raises(StreamError) as err:
        store.read(S, limit=0)
    assert err.value.code == "invalid_read"


def test_offsets(store: StreamStore) -> None:
    store.append_batch(S, events(5))
    assert store.offset(S, "billing") == 0
    store.commit_offset(S, "billing", 3)
    store.commit_offset(S, "audit", 5)
    assert store.offset(S, "billing") == 3
    assert store.offset(S, "audit") == 5
    with pytest.raises(OffsetOutOfRange):
        store.commit_offset(S, "billing", 6)
    with pytest.raises(StreamError) as info:
        store.commit_offset(S, "Bad Name", 1)
    assert info.value.code == "invalid_consumer"
    with pytest.raises(UnknownStream):
        store.offset("acme/pos/other", "billing")


def test_durable_across_reopen(tmp_path: Path) -> None:
    with StreamStore(tmp_path / "s") as store:
        store.append_batch(S, events(10))
        store.commit_offset(S, "c", 4)
        store.set_forward_position(S, 6)
    with StreamStore(tmp_path / "s") as store:
        assert store.append_batch(S, events(2)) == (11, 12)
        assert [e.seq for e in store.read(S, after_seq=9)] == [10, 11, 12]
        assert store.offset(S, "c") == 4
        assert store.forward_position(S) == 6


def test_sequences_never_reused_after_everything_is_dropped(tmp_path: Path) -> None:
    policy = RetentionPolicy(max_bytes=None, max_age_s=1.0)
    with StreamStore(tmp_path / "s", default_policy=policy) as store:
        store.append_batch(S, events(3))
        assert store.apply_retention(S, now=1000.0).dropped_events == 3
        assert store.stats(S).count == 0
    with StreamStore(tmp_path / "s", default_policy=policy) as store:
        assert store.append_batch(S, events(1)) == (4, 4)


def test_retention_by_size_drops_oldest_first_and_reports(store: StreamStore) -> None:
    size = HEADER_BYTES + 1000
    store.create_stream(S, RetentionPolicy(max_bytes=MAX_EVENT_BYTES, max_age_s=None))
    store.append_batch(S, events(300, size=1000))  # ~308 kB > 256 KiB
    keep = MAX_EVENT_BYTES // size
    result = store.apply_retention(S, now=0.0)
    assert result.dropped_events == 300 - keep
    assert result.dropped_bytes == (300 - keep) * size
    assert result.dropped_unforwarded == 300 - keep
    stats = store.stats(S)
    assert stats.total_bytes <= MAX_EVENT_BYTES
    assert (stats.first_seq, stats.last_seq) == (300 - keep + 1, 300)
    assert (stats.dropped_events, stats.dropped_bytes) == (300 - keep, (300 - keep) * size)
    assert store.read(S)[0].seq == 300 - keep + 1
    assert store.apply_retention(S, now=0.0).dropped_events == 0
    # counters are cumulative
    store.append_batch(S, events(10, size=1000))
    assert store.apply_retention(S, now=0.0).dropped_events == 10
    assert store.stats(S).dropped_events == 300 - keep + 10


def test_retention_by_age(store: StreamStore) -> None:
    store.create_stream(S, RetentionPolicy(max_bytes=None, max_age_s=60.0))
    store.append_batch(S, events(100, t0=1000.0))  # times 1000..1099
    store.set_forward_position(S, 30)
    result = store.apply_retention(S, now=1100.0)  # cutoff 1040: drop 1000..1039
    assert (result.dropped_events, result.dropped_unforwarded) == (40, 10)
    stats = store.stats(S)
    assert (stats.first_seq, stats.dropped_events, stats.dropped_unforwarded) == (41, 40, 10)
    assert store.read(S, after_seq=0, limit=1)[0].time_s == 1040.0


def test_forward_position(store: StreamStore) -> None:
    store.append_batch(S, events(10))
    assert store.forward_position(S) == 0
    assert [e.seq for e in store.pending_forward(S, limit=4)] == [1, 2, 3, 4]
    assert store.set_forward_position(S, 4) == 4
    assert store.set_forward_position(S, 2) == 4  # a stale ack does not move it back
    assert [e.seq for e in store.pending_forward(S)] == [5, 6, 7, 8, 9, 10]
    with pytest.raises(OffsetOutOfRange):
        store.set_forward_position(S, 11)
    store.set_forward_position(S, 10)
    assert store.pending_forward(S) == []


def test_garbage_in_metadata_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StreamStore(path) as store:
        store.append_batch(S, events(2))
    for garbage in (b"\xff not json", b"[]", b'{"v": 99}', b'{"v": 1, "id": -1}'):
        env = lmdb.open(str(path), max_dbs=4)
        with env.begin(write=True, db=env.open_db(b"streams")) as txn:
            txn.put(S.encode(), garbage)
        env.close()
        with StreamStore(path) as store, pytest.raises(StreamStoreCorrupt, match=S):
            store.read(S)


def test_wrong_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    StreamStore(path).close()
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"store")) as txn:
        txn.put(b"schema_version", b"junk")
    env.close()
    with pytest.raises(StreamStoreCorrupt, match="schema"):
        StreamStore(path)
