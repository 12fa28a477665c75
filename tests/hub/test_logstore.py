"""The hub's fleet log store: ingest (idempotent, gaps, drops), every query filter,
order and pagination, counts, and a comparison with a brute-force filter, on real LMDB.

Most tests use small segments and blocks so that queries go through the token index,
sealed blocks and in-memory tails alike."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from central_hub.logstore import (
    LogGap,
    LogHit,
    LogQuery,
    LogQueryError,
    LogRecord,
    LogStore,
)

T0 = 1_700_000_000.0
STREAM = "acme/api/access"


def rec(seq: int, text: str, *, t: float | None = None, level: int | None = 6,
        host: str = "h1") -> LogRecord:  # fmt: skip
    return LogRecord(seq, T0 + seq if t is None else t, level, host, text.encode())


def recs(first: int, last: int, prefix: str = "line") -> list[LogRecord]:
    return [rec(s, f"{prefix} {s}") for s in range(first, last + 1)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore(tmp_path / "logs", map_size=1 << 28, segment_records=50, block_records=8)
    yield s
    s.close()


def everything(store: LogStore, **filters: object) -> list[LogHit]:
    """All hits of a query, page after page (checking the pages fit together)."""
    hits: list[LogHit] = []
    cursor = None
    for _ in range(1000):
        page = store.query(LogQuery(limit=7, cursor=cursor, **filters))  # type: ignore[arg-type]
        assert len(page.hits) <= 7
        hits.extend(page.hits)
        if page.next_cursor is None:
            return hits
        cursor = page.next_cursor
    raise AssertionError("pagination does not end")


def seqs(hits: list[LogHit]) -> list[int]:
    return [h.seq for h in hits]


# -- ingest -------------------------------------------------------------------------------


def test_overlapping_batches_are_stored_exactly_once_in_order(store: LogStore) -> None:
    first = store.ingest("s1", STREAM, recs(1, 30))
    again = store.ingest("s1", STREAM, recs(20, 60))
    assert (first.accepted, first.duplicates, first.high_water) == (30, 0, 30)
    assert (again.accepted, again.duplicates, again.high_water) == (30, 11, 60)
    replay = store.ingest("s1", STREAM, recs(1, 60))
    assert (replay.accepted, replay.duplicates, replay.high_water) == (0, 60, 60)
    assert seqs(everything(store)) == list(range(60, 0, -1))
    assert [h.text for h in everything(store)][:2] == ["line 60", "line 59"]
    assert store.positions("s1") == {STREAM: 60}


def test_a_gap_is_refused_with_the_high_water_and_nothing_stored(store: LogStore) -> None:
    store.ingest("s1", STREAM, recs(1, 5))
    with pytest.raises(LogGap) as gap:
        store.ingest("s1", STREAM, recs(8, 10))
    assert gap.value.high_water == 5
    assert "resend from 6" in str(gap.value)
    # A gap inside the batch refuses the whole batch too.
    with pytest.raises(LogGap):
        store.ingest("s1", STREAM, [*recs(6, 7), *recs(9, 9)], dropped_through=5)
    assert store.positions("s1") == {STREAM: 5}
    assert seqs(everything(store)) == [5, 4, 3, 2, 1]


def test_dropped_through_covers_a_gap_and_is_counted(store: LogStore) -> None:
    store.ingest("s1", STREAM, recs(1, 5))
    result = store.ingest("s1", STREAM, recs(9, 12), dropped_through=8)
    assert (result.accepted, result.dropped, result.high_water) == (4, 3, 12)
    assert store.dropped("s1") == {STREAM: 3}
    # Dropped with nothing after it: the position moves past the drop.
    result = store.ingest("s1", STREAM, [], dropped_through=20)
    assert (result.high_water, result.dropped) == (20, 8)
    assert store.dropped("s1") == {STREAM: 11}
    assert store.dropped("s2") == {}
    assert seqs(everything(store)) == [12, 11, 10, 9, 5, 4, 3, 2, 1]


def test_bad_records_and_names_are_refused(store: LogStore) -> None:
    with pytest.raises(ValueError, match="ascending"):
        store.ingest("s1", STREAM, [rec(2, "b"), rec(1, "a")])
    with pytest.raises(ValueError, match="level"):
        store.ingest("s1", STREAM, [rec(1, "a", level=9)])
    with pytest.raises(ValueError, match="three parts"):
        store.ingest("s1", "acme/api", recs(1, 1))
    with pytest.raises(ValueError, match="site"):
        store.ingest("Site 1", STREAM, recs(1, 1))
    assert store.positions("s1") == {}


def test_reopen_keeps_records_positions_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "logs"
    store = LogStore(path, map_size=1 << 28, segment_records=50, block_records=8)
    store.ingest("s1", STREAM, recs(1, 70))  # a segment, and a tail
    store.ingest("s1", "acme/web/error", recs(1, 3))
    store.ingest("s2", STREAM, recs(5, 6), dropped_through=4)
    store.flush()
    before = everything(store)
    store.close()
    # A lost vocabulary is rebuilt from the blocks; a file of no segment is removed.
    (vocab,) = (path / "vocab").iterdir()
    vocab.unlink()
    orphan = path / "vocab" / "00000000deadbeef.vocab"
    orphan.write_bytes(b"half written")
    store = LogStore(path, map_size=1 << 28, segment_records=50, block_records=8)
    assert sorted(p.name for p in (path / "vocab").iterdir()) == [vocab.name]
    try:
        assert store.positions("s1") == {STREAM: 70, "acme/web/error": 3}
        assert store.dropped("s2") == {STREAM: 4}
        assert everything(store) == before
        assert len(before) == 75
        assert store.ingest("s1", STREAM, recs(60, 71)).accepted == 1
        assert seqs(everything(store, substring="line 7", site="s1", stream=STREAM)) == [
            71, 70, 7,
        ]  # fmt: skip
    finally:
        store.close()


def test_small_batches_keep_few_tail_entries(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs", map_size=1 << 28, segment_records=10_000)
    try:
        for s in range(1, 1001):
            store.ingest("s1", STREAM, [rec(s, f"one {s}")])
        tail = store._streams[("s1", STREAM)].tail
        assert len(tail) <= 11  # merged like a binary counter
        assert seqs(everything(store, substring="one 1000")) == [1000]
        assert store.query(LogQuery(count=True, limit=1)).total == 1000
    finally:
        store.close()


# -- filters ------------------------------------------------------------------------------


@pytest.fixture
def fleet(store: LogStore) -> LogStore:
    """Two tenants, three sites, several apps and hosts, levels and texts."""
    layout = [
        ("s1", "acme/api/access"), ("s1", "acme/web/error"), ("s2", "acme/api/access"),
        ("s2", "globex/api/access"), ("s3", "globex/billing/events"),
    ]  # fmt: skip
    for n, (site, stream) in enumerate(layout):
        batch = []
        for s in range(1, 41):
            level = (3, 4, 6, None)[s % 4]
            host = f"h{s % 3}"
            text = f"{site} {stream} req=r{n}x{s:03d} took {s}ms"
            if s % 10 == 0:
                text += " connection refused by upstream"
            batch.append(LogRecord(s, T0 + 10 * s + n, level, host, text.encode()))
        store.ingest(site, stream, batch[:25])
        store.ingest(site, stream, batch[20:])
    return store


def test_tenants_isolate_streams(fleet: LogStore) -> None:
    globex = everything(fleet, tenants=frozenset({"globex"}))
    assert {h.stream.split("/")[0] for h in globex} == {"globex"}
    assert len(globex) == 80
    assert everything(fleet, tenants=frozenset()) == []
    both = everything(fleet, tenants=frozenset({"acme", "globex"}))
    assert len(both) == 200
    assert everything(fleet, tenants=frozenset({"acme"}), substring="globex") == []


def test_site_app_stream_and_host_filters(fleet: LogStore) -> None:
    assert {h.site for h in everything(fleet, site="s2")} == {"s2"}
    assert len(everything(fleet, site="s2")) == 80
    api = everything(fleet, app="api")
    assert {h.stream for h in api} == {"acme/api/access", "globex/api/access"}
    assert len(everything(fleet, app="acme/api")) == 80
    only = everything(fleet, stream="acme/web/error")
    assert {(h.site, h.stream) for h in only} == {("s1", "acme/web/error")}
    h2 = everything(fleet, host="h2", site="s3")
    assert len(h2) == 13 and {h.host for h in h2} == {"h2"}
    assert everything(fleet, host="nope") == []


def test_time_range_is_inclusive_exclusive(fleet: LogStore) -> None:
    hits = everything(fleet, stream="acme/api/access", site="s1", since=T0 + 100, until=T0 + 200)
    assert seqs(hits) == list(range(19, 9, -1))  # t = T0 + 10 s: 100 in, 200 out
    assert everything(fleet, since=T0 + 1000) == []


def test_max_level_keeps_severe_records_and_drops_unknown(fleet: LogStore) -> None:
    errors = everything(fleet, max_level=3)
    assert len(errors) == 50 and {h.level for h in errors} == {3}
    warnings = everything(fleet, max_level=4, site="s1")
    assert {h.level for h in warnings} == {3, 4} and len(warnings) == 40
    assert all(h.level is not None for h in everything(fleet, max_level=7))


def test_substring_whole_spanning_and_partial_tokens(fleet: LogStore) -> None:
    refused = everything(fleet, substring="connection refused")
    assert len(refused) == 20 and all("connection refused" in h.text for h in refused)
    spanning = everything(fleet, substring="refused by upst")
    assert len(spanning) == 20
    partial = everything(fleet, substring="x00")  # inside the token r2x007
    assert len(partial) == 5 * 9
    one = everything(fleet, substring="=r2x017 ")
    assert [(h.site, h.stream, h.seq) for h in one] == [("s2", "acme/api/access", 17)]
    suffix = everything(fleet, substring="2x017")
    assert seqs(suffix) == [17]
    assert everything(fleet, substring="Connection") == []  # case-sensitive
    assert everything(fleet, substring="took 4ms r") == []  # never across records
    assert everything(fleet, substring="took \ud800") == []  # a lone surrogate never matches
    with pytest.raises(LogQueryError, match="UTF-8"):  # RE2 takes UTF-8 patterns only
        everything(fleet, regex="took \ud800|refused by")


def test_regex_and_bad_regex(fleet: LogStore) -> None:
    hits = everything(fleet, regex=r"took (1\d)ms$", site="s3")
    assert seqs(hits) == list(range(19, 10, -1))  # 10 ends in "refused by upstream"
    anchored = everything(fleet, regex=r"^s1 acme/web", max_level=3)
    assert len(anchored) == 10
    # Literal text of the regex narrows blocks, but never changes the result.
    assert len(everything(fleet, regex=r"(?i)CONNECTION refused")) == 20
    assert len(everything(fleet, regex=r"connection (refused|accepted) by")) == 20
    assert len(everything(fleet, regex=r"r1x0(07|13) took")) == 2
    assert everything(fleet, regex=r"took 4ms\nr") == []
    with pytest.raises(LogQueryError, match=r"regex .* is invalid"):
        fleet.query(LogQuery(regex="took (\\d"))


def test_bad_queries_say_what_is_wrong(fleet: LogStore) -> None:
    for query, message in [
        (LogQuery(limit=0), "limit"),
        (LogQuery(limit=1001), "limit"),
        (LogQuery(max_level=8), "max_level"),
        (LogQuery(since=float("nan")), "since"),
        (LogQuery(stream="acme/api"), "stream"),
        (LogQuery(substring=""), "substring"),
        (LogQuery(cursor="garbage"), "cursor"),
        (LogQuery(cursor="lc1.!!!!"), "cursor"),
        (LogQuery(cursor="lc1.bm90IGpzb24"), "cursor"),
    ]:
        with pytest.raises(LogQueryError, match=message):
            fleet.query(query)


def test_newest_first_pages_concatenate_without_duplicates(fleet: LogStore) -> None:
    full = fleet.query(LogQuery(limit=1000)).hits
    assert len(full) == 200
    keys = [(h.time_s, h.site, h.stream, h.seq) for h in full]
    assert keys == sorted(keys, reverse=True)
    assert everything(fleet) == full
    paged = everything(fleet, substring="refused")
    assert paged == [h for h in full if "refused" in h.text]
    # A cursor belongs to its query.
    page = fleet.query(LogQuery(limit=5))
    assert page.next_cursor is not None
    with pytest.raises(LogQueryError, match="other filters"):
        fleet.query(LogQuery(limit=5, site="s1", cursor=page.next_cursor))


def test_ties_in_time_are_ordered_deterministically(store: LogStore) -> None:
    store.ingest("s1", STREAM, [rec(s, f"same {s}", t=T0) for s in range(1, 21)])
    store.ingest("s2", STREAM, [rec(s, f"same {s}", t=T0) for s in range(1, 21)])
    hits = everything(store)
    assert [(h.site, h.seq) for h in hits] == [
        *(("s2", s) for s in range(20, 0, -1)),
        *(("s1", s) for s in range(20, 0, -1)),
    ]


def test_count_is_the_total_whatever_the_page(fleet: LogStore) -> None:
    page = fleet.query(LogQuery(limit=3, count=True, substring="refused"))
    assert page.total == 20 and len(page.hits) == 3
    assert fleet.query(LogQuery(limit=1, count=True)).total == 200
    ranged = fleet.query(LogQuery(limit=1, count=True, since=T0 + 100, until=T0 + 250))
    assert ranged.total == 5 * 15
    level = fleet.query(LogQuery(limit=1, count=True, max_level=4, host="h1"))
    assert level.total == len(
        [h for h in everything(fleet) if h.level in (3, 4) and h.host == "h1"]
    )
    nxt = fleet.query(LogQuery(limit=3, count=True, substring="refused", cursor=page.next_cursor))
    assert nxt.total == 20
    assert fleet.query(LogQuery()).total is None


def test_queries_run_while_ingesting(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs", map_size=1 << 28, segment_records=300, block_records=50)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                before = store.positions("s1").get(STREAM, 0)
                total = store.query(LogQuery(count=True, limit=5, substring="tick")).total
                assert total is not None and total >= before
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for first in range(1, 3001, 100):
            store.ingest("s1", STREAM, recs(first, first + 99, prefix="tick"))
    finally:
        done.set()
        thread.join()
        store.close()
    assert errors == []


# -- against a brute-force filter ---------------------------------------------------------

WORDS = ["GET", "POST", "error", "timeout", "ok", "user", "retry", "db", "é", "x"]


def brute(records: list[tuple[str, str, LogRecord]], q: LogQuery) -> list[LogHit]:
    out = []
    for site, stream, r in records:
        text = r.payload.decode("utf-8", "replace")
        tenant, app, _ = stream.split("/")
        if (
            (q.tenants is not None and tenant not in q.tenants)
            or (q.site is not None and site != q.site)
            or (q.app is not None and app != q.app)
            or (q.host is not None and r.host != q.host)
            or (q.since is not None and r.time_s < q.since)
            or (q.until is not None and r.time_s >= q.until)
            or (q.max_level is not None and (r.level is None or r.level > q.max_level))
            or (q.substring is not None and q.substring not in text)
            or (q.regex is not None and re.search(q.regex, text) is None)
        ):
            continue
        out.append(LogHit(site, stream, r.seq, r.time_s, r.level, r.host, text))
    out.sort(key=lambda h: (h.time_s, h.site, h.stream, h.seq), reverse=True)
    return out


@pytest.mark.parametrize("ordered", [False, True])
def test_queries_match_a_brute_force_filter(tmp_path: Path, ordered: bool) -> None:
    """Random records (times in seq order, or not) and random queries, page by page."""
    rnd = random.Random(7)
    store = LogStore(tmp_path / "logs", map_size=1 << 28, segment_records=120, block_records=16)
    stored: list[tuple[str, str, LogRecord]] = []
    streams = [("s1", "acme/api/a"), ("s1", "acme/web/b"), ("s2", "acme/api/a"),
               ("s2", "beta/api/c")]  # fmt: skip
    positions = dict.fromkeys(streams, 0)
    try:
        for _ in range(60):
            key = rnd.choice(streams)
            batch = []
            for _ in range(rnd.randint(1, 25)):
                positions[key] += 1
                words = rnd.choices(WORDS, k=rnd.randint(0, 6))
                text = " ".join(words) + f" id={rnd.randrange(50):x}{rnd.choice(['', '!', '.'])}"
                payload = text.encode() + (b"\xff" if rnd.random() < 0.05 else b"")
                t = T0 + (len(stored) // 3 if ordered else rnd.randrange(500)) / 4
                r = LogRecord(positions[key], t,
                              rnd.choice([None, 0, 3, 4, 6, 7]), rnd.choice(["h1", "h2"]),
                              payload)  # fmt: skip
                batch.append(r)
                stored.append((*key, r))
            store.ingest(*key, batch)
        for _ in range(150):
            q = LogQuery(
                tenants=rnd.choice([None, frozenset({"acme"}), frozenset({"beta"})]),
                site=rnd.choice([None, "s1", "s2"]),
                app=rnd.choice([None, None, "api"]),
                host=rnd.choice([None, None, "h2"]),
                since=rnd.choice([None, T0 + rnd.randrange(125)]),
                until=rnd.choice([None, T0 + rnd.randrange(125)]),
                max_level=rnd.choice([None, None, 3, 6]),
                substring=rnd.choice(
                    [
                        None,
                        None,
                        "error",
                        "rror tim",
                        "id=1",
                        "=2",
                        "user x",
                        "\ufffd",
                        "é",
                        "OST",
                        "ok id",
                        "!",
                    ]
                ),
                regex=rnd.choice([None, None, r"^GET", r"id=[0-3]\b", r"retry.*db"]),
                count=True,
            )
            expected = brute(stored, q)
            got = everything(store, **{f: getattr(q, f) for f in (
                "tenants", "site", "app", "host", "since", "until", "max_level", "substring",
                "regex")})  # fmt: skip
            assert got == expected, q
            assert store.query(replace(q, limit=3)).total == len(expected), q
    finally:
        store.close()
