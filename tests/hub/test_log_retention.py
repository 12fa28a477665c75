"""The hub's retention of fleet logs: the pure selection, a real LogStore (real LMDB,
records at chosen times) whose queries after retention return exactly the surviving
records, and a real hub over HTTP with a tiny max age and an injected clock.

The expected survivors are worked out from the store's block layout *before* retention
(which records each block holds), so the test checks that exactly whole expired blocks
went, and nothing else."""

from __future__ import annotations

import base64
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import lmdb
import orjson
import pytest

from central_hub import Hub
from central_hub.cli import build_parser, config_from_args, parse_age, parse_bytes
from central_hub.errors import HubConfigError
from central_hub.logindex import BlockUsage, expired_blocks
from central_hub.logstore import LogQuery, LogRecord, LogStore
from meshorch.streams.model import NewEvent, encode_chunk
from tests.hub.conftest import Clock, admin_token, hub_config
from tests.hub.helpers import Operator, Site
from tests.hub.test_logstore import WORDS, brute, everything
from tests.waiting import until

T0 = 1_700_000_000.0
Stored = list[tuple[str, str, LogRecord]]

# -- the selection (pure) -----------------------------------------------------------------


def usage(*blocks: tuple[int, float, int]) -> list[BlockUsage]:
    return [BlockUsage(block_id, newest, size) for block_id, newest, size in blocks]


def test_age_drops_blocks_whose_newest_record_is_too_old() -> None:
    blocks = usage((1, 100.0, 10), (2, 250.0, 10), (3, 199.9, 10), (4, 200.0, 10))
    assert expired_blocks(blocks, 300.0, 100.0, None) == [1, 3]  # 200.0 is not older
    assert expired_blocks(blocks, 300.0, 1000.0, None) == []
    assert expired_blocks(blocks, 300.0, None, None) == []
    assert expired_blocks([], 300.0, 1.0, 1) == []


def test_size_drops_the_oldest_until_the_total_fits() -> None:
    blocks = usage((5, 30.0, 40), (1, 10.0, 30), (2, 20.0, 20), (9, 40.0, 10))
    assert expired_blocks(blocks, 50.0, None, 100) == []  # exactly at the limit
    assert expired_blocks(blocks, 50.0, None, 99) == [1]
    assert expired_blocks(blocks, 50.0, None, 50) == [1, 2]
    assert expired_blocks(blocks, 50.0, None, 1) == [1, 2, 5, 9]
    # Age first, then size among the rest; ties in time go by id (storage order).
    assert expired_blocks(blocks, 50.0, 35.0, 50) == [1, 2]
    tied = usage((7, 10.0, 5), (3, 10.0, 5), (4, 10.0, 5))
    assert expired_blocks(tied, 50.0, None, 10) == [3]


def test_the_selection_is_oldest_first_and_minimal() -> None:
    rnd = random.Random(3)
    for _ in range(200):
        blocks = usage(*((i, rnd.randrange(100), rnd.randint(1, 50)) for i in range(30)))
        now, age, limit = 100.0, rnd.choice([None, 20.0, 60.0]), rnd.choice([None, 200, 600])
        dropped = set(expired_blocks(blocks, now, age, limit))
        kept = [b for b in blocks if b.block_id not in dropped]
        gone = [b for b in blocks if b.block_id in dropped]
        if age is not None:
            assert all(b.newest_s >= now - age for b in kept)
        if limit is not None:
            assert sum(b.size for b in kept) <= limit
        if gone and kept:
            assert max(b.newest_s for b in gone) <= min(b.newest_s for b in kept)
        # Minimal: keeping the youngest dropped block would break a limit.
        if gone:
            youngest = max(gone, key=lambda b: (b.newest_s, b.block_id))
            too_old = age is not None and youngest.newest_s < now - age
            too_big = limit is not None and sum(b.size for b in kept) + youngest.size > limit
            assert too_old or too_big


def test_hub_options_take_durations_and_sizes(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--data-dir", str(tmp_path)])
    config = config_from_args(args)
    assert (config.logs_max_age_s, config.logs_max_bytes) == (30 * 86400.0, None)
    args = build_parser().parse_args(
        ["--data-dir", str(tmp_path), "--logs-max-age", "12h", "--logs-max-bytes", "50GiB"]
    )
    config = config_from_args(args)
    assert (config.logs_max_age_s, config.logs_max_bytes) == (43200.0, 50 << 30)
    assert [parse_age(t) for t in ("7d", "1h30m", "90", "none")] == [604800.0, 5400.0, 90.0, None]
    sizes = ("500MiB", "2Gi", "1TB", "1G", "4096", "none")
    assert [parse_bytes(t) for t in sizes] == [500 << 20, 2 << 30, 10**12, 10**9, 4096, None]
    for bad_age in ("0", "-1h", "7y", "inf", ""):
        with pytest.raises(HubConfigError, match="--logs-max-age"):
            parse_age(bad_age)
    for bad_size in ("0", "-5", "GiB", "5PiB", "nan"):
        with pytest.raises(HubConfigError, match="--logs-max-bytes"):
            parse_bytes(bad_size)
    with pytest.raises(HubConfigError, match="logs_max_bytes"):
        hub_config(tmp_path, logs_max_bytes=0).validate()


# -- a real store -------------------------------------------------------------------------

STREAMS = [("s1", "acme/api/a"), ("s1", "acme/web/b"), ("s2", "acme/api/a"),
           ("s2", "beta/api/c"), ("s3", "beta/db/slow")]  # fmt: skip


def open_store(path: Path) -> LogStore:
    return LogStore(path, map_size=1 << 28, segment_records=120, block_records=16)


def fill(store: LogStore, rnd: random.Random, batches: int = 80) -> Stored:
    """Random batches of random streams; times rise by 1 s a record, shuffled a little."""
    stored: Stored = []
    positions = dict.fromkeys(STREAMS, 0)
    for _ in range(batches):
        key = rnd.choice(STREAMS)
        batch = []
        for _ in range(rnd.randint(1, 25)):
            positions[key] += 1
            words = rnd.choices(WORDS, k=rnd.randint(0, 6))
            text = " ".join(words) + f" id={rnd.randrange(50):x}"
            t = T0 + len(stored) + rnd.uniform(-3, 3)
            record = LogRecord(positions[key], t, rnd.choice([None, 0, 3, 4, 6]),
                               rnd.choice(["h1", "h2"]), text.encode())  # fmt: skip
            batch.append(record)
            stored.append((*key, record))
        store.ingest(*key, batch)
    return stored


def layout(store: LogStore) -> dict[tuple[str, str, int], tuple[int, float, int]]:
    """(site, stream, seq) -> (block id, newest time of its block, block size), sealed
    blocks and tail entries alike."""
    where = {}
    for (site, stream), state in store._streams.items():
        for ref in (*state.blocks, *state.tail):
            for seq in range(ref.summary.first_seq, ref.summary.last_seq + 1):
                where[(site, stream, seq)] = (ref.block_id, ref.summary.max_t, ref.size)
    return where


def survivors(stored: Stored, where: dict[tuple[str, str, int], tuple[int, float, int]],
              dropped_blocks: set[int]) -> Stored:  # fmt: skip
    return [(s, n, r) for s, n, r in stored if where[(s, n, r.seq)][0] not in dropped_blocks]


FILTERS = ("site", "app", "host", "since", "until", "max_level", "substring", "regex")


def check_queries(store: LogStore, expected: Stored, rnd: random.Random, runs: int = 60) -> None:
    """Every filter, page by page and counted, against a brute-force filter of ``expected``."""
    assert everything(store) == brute(expected, LogQuery())
    assert store.query(LogQuery(count=True, limit=1)).total == len(expected)
    for _ in range(runs):
        q = LogQuery(
            site=rnd.choice([None, "s1", "s2", "s3"]),
            app=rnd.choice([None, None, "api"]),
            host=rnd.choice([None, None, "h2"]),
            since=rnd.choice([None, T0 + rnd.randrange(1500)]),
            until=rnd.choice([None, None, T0 + rnd.randrange(1500)]),
            max_level=rnd.choice([None, None, 3, 6]),
            substring=rnd.choice([None, None, "error", "rror tim", "id=1", "user x", "é"]),
            regex=rnd.choice([None, None, r"^GET", r"id=[0-3]\b", r"retry.*db"]),
            count=True,
        )
        want = brute(expected, q)
        got = everything(store, **{f: getattr(q, f) for f in FILTERS})
        assert got == want, q
        assert store.query(replace(q, limit=3)).total == len(want), q


def positions(store: LogStore) -> dict[str, dict[str, int]]:
    return {site: store.positions(site) for site in ("s1", "s2", "s3")}


def dropped_per_stream(gone: Stored) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {"s1": {}, "s2": {}, "s3": {}}
    for site, stream, _ in gone:
        counts[site][stream] = counts[site].get(stream, 0) + 1
    return counts


def test_age_retention_drops_whole_old_blocks_and_queries_see_only_the_rest(
    tmp_path: Path,
) -> None:
    rnd = random.Random(11)
    path = tmp_path / "logs"
    store = open_store(path)
    try:
        stored = fill(store, rnd)
        assert len(store._segments) >= 5  # sealed segments, and tails
        where = layout(store)
        before = positions(store)
        now = T0 + 2000.0
        cutoff = now - 1300.0  # about the older half of the records
        expected_gone = {bid for bid, newest, _ in where.values() if newest < cutoff}
        result = store.apply_retention(now, max_age_s=1300.0, max_bytes=None, batch=7)
        kept = survivors(stored, where, expected_gone)
        gone = [x for x in stored if x not in kept]
        assert result.blocks == len(expected_gone) and result.records == len(gone)
        assert result.segments >= 1  # the oldest segments went whole, with their vocabulary
        assert len(list((path / "vocab").iterdir())) == len(store._segments)
        # Whole blocks: every recent record stays, some older ones stay with them.
        assert [x for x in stored if x[2].time_s >= cutoff and x not in kept] == []
        assert any(r.time_s < cutoff for _, _, r in kept)
        # Positions never move back; what went is counted per stream.
        assert positions(store) == before
        assert {site: store.hub_dropped(site) for site in before} == dropped_per_stream(gone)
        check_queries(store, kept, rnd)
        # A second run finds nothing more; the figures add up.
        again = store.apply_retention(now, max_age_s=1300.0, max_bytes=None)
        assert again.blocks == 0
        stats = store.stats()
        assert (stats.records, stats.hub_dropped) == (len(kept), len(gone))
    finally:
        store.close()
    # The drop is durable: reopened, the store answers the same, and ingest goes on; a
    # lost vocabulary of a partly dropped segment is rebuilt with its ordinals intact.
    max(p for p in (path / "vocab").iterdir()).unlink()
    store = open_store(path)
    try:
        assert positions(store) == before
        assert store.stats().hub_dropped == len(gone)
        check_queries(store, kept, rnd, runs=30)
        site, stream = "s1", "acme/api/a"
        high = before[site][stream]
        replay = [LogRecord(s, T0, 6, "h1", b"resent") for s in range(1, high + 1)]
        ingested = store.ingest(site, stream, replay)
        assert (ingested.accepted, ingested.duplicates) == (0, high)  # nothing resent is stored
        fresh = LogRecord(high + 1, now, 6, "h1", b"after retention")
        assert store.ingest(site, stream, [fresh]).accepted == 1
        check_queries(store, [*kept, (site, stream, fresh)], rnd, runs=10)
    finally:
        store.close()


def test_size_retention_drops_the_oldest_blocks_across_sites_and_streams(
    tmp_path: Path,
) -> None:
    rnd = random.Random(5)
    path = tmp_path / "logs"
    store = open_store(path)
    try:
        stored = fill(store, rnd, batches=100)
        where = layout(store)
        before = positions(store)
        total = store.stats().stored_bytes
        blocks = {bid: (newest, size) for bid, newest, size in where.values()}
        assert total == sum(size for _, size in blocks.values())
        limit = total // 3
        result = store.apply_retention(T0 + 10**6, max_age_s=None, max_bytes=limit, batch=5)
        assert store.stats().stored_bytes <= limit
        remaining = {ref.block_id for st in store._streams.values()
                     for ref in (*st.blocks, *st.tail)}  # fmt: skip
        dropped = set(blocks) - remaining
        assert len(dropped) == result.blocks
        # Oldest first, fleet-wide, and no more than needed.
        order = {b: (blocks[b][0], b) for b in blocks}
        assert max(order[b] for b in dropped) < min(order[b] for b in remaining)
        youngest = max(dropped, key=order.__getitem__)
        assert store.stats().stored_bytes + blocks[youngest][1] > limit
        assert {site for site, _, _ in survivors(stored, where, dropped)} == {"s1", "s2", "s3"}
        sites_hit = {where_site for (where_site, _, _), (bid, _, _) in where.items()
                     if bid in dropped}  # fmt: skip
        assert len(sites_hit) >= 2  # across sites, not one stream after the other
        kept = survivors(stored, where, dropped)
        assert positions(store) == before
        check_queries(store, kept, rnd)
    finally:
        store.close()
    store = open_store(path)
    try:
        check_queries(store, kept, rnd, runs=20)
        assert store.stats().stored_bytes <= limit
    finally:
        store.close()


def test_dropping_everything_keeps_positions_and_removes_every_segment(tmp_path: Path) -> None:
    path = tmp_path / "logs"
    store = open_store(path)
    try:
        stored = fill(store, random.Random(2), batches=40)
        before = positions(store)
        result = store.apply_retention(T0 + 10**6, max_age_s=60.0, max_bytes=None)
        assert result.records == len(stored)
        assert store._segments == [] and list((path / "vocab").iterdir()) == []
        assert everything(store) == []
        assert everything(store, substring="error") == []
        assert store.query(LogQuery(count=True, max_level=3)).total == 0
        assert positions(store) == before
        assert store.stats().records == 0 and store.stats().stored_bytes == 0
    finally:
        store.close()
    store = open_store(path)
    try:
        assert positions(store) == before and everything(store) == []
        assert store.stats().hub_dropped == len(stored)
    finally:
        store.close()


def test_segments_written_before_retention_get_their_sizes(tmp_path: Path) -> None:
    """Segment lists without sizes (older hubs) are sized from their blocks at open."""
    path = tmp_path / "logs"
    store = open_store(path)
    stored = fill(store, random.Random(4), batches=40)
    total = store.stats().stored_bytes
    store.close()
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 28)
    segments = env.open_db(b"segments")
    with env.begin(write=True) as txn:
        for key, value in list(txn.cursor(db=segments)):
            entries = [entry[:4] for entry in orjson.loads(value)]
            txn.put(key, orjson.dumps(entries), db=segments)
    env.close()
    store = open_store(path)
    try:
        assert store.stats().stored_bytes == pytest.approx(total, abs=40)  # rounding only
        where = layout(store)
        result = store.apply_retention(T0 + 10**6, max_age_s=None, max_bytes=total // 2)
        assert result.blocks > 0 and store.stats().stored_bytes <= total // 2
        kept = {ref.block_id for st in store._streams.values() for ref in (*st.blocks, *st.tail)}
        dropped = {bid for bid, _, _ in where.values()} - kept
        check_queries(store, survivors(stored, where, dropped), random.Random(1), runs=10)
    finally:
        store.close()


def test_queries_run_while_retention_drops(tmp_path: Path) -> None:
    """A query that took its snapshot before a drop still reads every block it lists."""
    store = open_store(tmp_path / "logs")
    rnd = random.Random(9)
    stored = fill(store, rnd, batches=150)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                for q in (LogQuery(count=True, substring="error"), LogQuery(count=True),
                          LogQuery(regex=r"id=[0-3]\b", limit=50)):  # fmt: skip
                    store.query(q)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        newest = max(r.time_s for _, _, r in stored)
        for step in range(20):
            store.apply_retention(newest, max_age_s=newest - T0 - 100 * step, max_bytes=None,
                                  batch=2)  # fmt: skip
    finally:
        done.set()
        for thread in threads:
            thread.join()
        store.close()
    assert errors == []


# -- a real hub over HTTP -----------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def push_body(stream: str, first: int, lines: list[tuple[float, str]]) -> bytes:
    events = [NewEvent(text.encode(), t, level=6) for t, text in lines]
    chunk = base64.b64encode(encode_chunk("h1", events)).decode()
    body = {"streams": [{"stream": stream, "dropped_through": 0,
                         "chunks": [{"first": first, "data": chunk}]}]}  # fmt: skip
    return orjson.dumps(body)


async def test_a_hub_with_a_tiny_max_age_drops_old_logs(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    config = hub_config(tmp_path / "hub", clock=clock, logs_max_age_s=3600.0,
                        logs_retention_every_s=0.05)  # fmt: skip
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
        site.clock = clock
        body = {"id": "shop-1", "labels": {}, "public_key": site.public_key}
        await admin.ok("POST", "/v1/sites", body, 201)

        async def push(stream: str, first: int, lines: list[tuple[float, str]]) -> Any:
            status, answer = await site.request(
                "POST", "/v1/link/streams", push_body(stream, first, lines)
            )
            assert status == 200, answer
            return answer["positions"][stream]

        old, new = "default/pos/logs", "default/pos/events"
        start = clock()
        assert await push(old, 1, [(start + i, f"old line {i}") for i in range(20)]) == 20
        clock.advance(2 * 3600.0)  # the first 20 lines are now two hours old
        now = clock()
        assert await push(new, 1, [(now + i, f"new line {i}") for i in range(5)]) == 5
        # Fewer than the tail entry before it: a separate entry, so it can go alone.
        assert await push(old, 21, [(now + i, f"fresh line {i}") for i in range(3)]) == 23

        async def streams() -> dict[str, dict[str, Any]]:
            answer = await admin.ok("GET", "/v1/logs/streams")
            return {s["stream"]: s for s in answer["streams"]}

        async def dropped() -> bool:
            return bool((await streams())[old]["hub_dropped"] == 20)

        await until("the old lines dropped", dropped)
        listed = await streams()
        assert listed[old] == {"site": "shop-1", "stream": old, "position": 23, "dropped": 0,
                               "hub_dropped": 20}  # fmt: skip
        assert listed[new]["hub_dropped"] == 0 and listed[new]["position"] == 5
        page = await admin.ok("GET", "/v1/logs?count=true&limit=100")
        assert page["total"] == 8
        assert sorted(h["text"] for h in page["logs"] if h["stream"] == old) == [
            f"fresh line {i}" for i in range(3)
        ]
        assert (await admin.ok("GET", "/v1/logs?grep=old%20line&count=true"))["total"] == 0
        # The site's position did not move back: resending the old lines stores nothing.
        status, answer = await site.request("GET", "/v1/link/streams")
        assert status == 200 and answer["positions"] == {old: 23, new: 5}
        assert await push(old, 1, [(start + i, f"old line {i}") for i in range(20)]) == 23
        assert (await admin.ok("GET", "/v1/logs?grep=old%20line&count=true"))["total"] == 0
        async with session.get(hub.url + "/metrics") as response:
            metrics = await response.text()
        assert "meshorch_hub_logs_retention_dropped_records_total 20.0" in metrics
        assert "meshorch_hub_logs_records 8.0" in metrics
        assert "meshorch_hub_logs_stored_bytes" in metrics
