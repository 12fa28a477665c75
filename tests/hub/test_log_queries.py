"""Log queries cannot stall the hub: RE2 regexes, a time budget, a thread pool of their own."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from central_hub import Hub
from central_hub.logindex import BlockRef, BlockSummary, Columns, LogQuery, Matcher, run_query
from central_hub.logstore import LogRecord
from tests.hub.helpers import Operator

STREAM = "blue/web/logs"
# Python's backtracking re takes 2.4 s for ^(a+)+$ on 25 a's and a b, doubling per 'a'.
CATASTROPHIC = "%5E(a%2B)%2B%24"  # ^(a+)+$, URL-encoded


def fill(hub: Hub, count: int, text: str) -> None:
    now = time.time()
    records = [LogRecord(i, now - count + i, 6, "h1", text.encode()) for i in range(1, count + 1)]
    hub.logs.store.ingest("s1", STREAM, records)


async def test_six_catastrophic_regexes_answer_within_budget_while_an_admin_writes(
    hub: Hub, admin: Operator
) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    fill(hub, 20_000, "a" * 40 + "b")
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)

    async def query() -> tuple[float, int, dict[str, object]]:
        started = time.perf_counter()
        status, answer = await admin.call(
            "GET", f"/v1/logs?regex={CATASTROPHIC}&count=true", token=viewer["token"]
        )
        return time.perf_counter() - started, status, answer

    queries = [asyncio.ensure_future(query()) for _ in range(6)]
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await admin.ok("POST", "/v1/tenants", {"id": "green"}, 201)
    write_s = time.perf_counter() - started
    answers = await asyncio.gather(*queries)
    print(f"admin write during six ^(a+)+$ queries: {write_s * 1000:.1f} ms; queries took "
          + ", ".join(f"{q[0]:.2f}s" for q in answers))  # fmt: skip
    for took, status, answer in answers:
        assert status == 200, answer
        assert answer["total"] == 0 and answer["truncated"] is None
        assert took < hub.logs.query_budget_s + 2
    assert write_s < 0.5


async def test_a_query_past_its_budget_says_what_it_scanned(hub: Hub, admin: Operator) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    fill(hub, 5000, "GET /index.html 200")
    hub.logs.query_budget_s = 1e-6
    status, answer = await admin.call("GET", "/v1/logs?regex=index&count=true")
    assert status == 200, answer
    cut = answer["truncated"]
    assert cut is not None and cut["budget_s"] == 1e-6 and "budget" in cut["reason"]
    assert cut["blocks_scanned"] < cut["blocks"] and answer["next_cursor"] is None
    assert answer["total"] is None
    hub.logs.query_budget_s = 5.0
    status, answer = await admin.call("GET", "/v1/logs?regex=index&count=true")
    assert answer["truncated"] is None and answer["total"] == 5000


def test_the_budget_stops_between_and_inside_blocks() -> None:
    """run_query with blocks that take 20 ms each to load and a 50 ms budget."""
    blocks = []
    for b in range(20):
        cols = Columns.from_records(
            [LogRecord(b * 100 + i, 1000.0 + b * 100 + i, 6, "h", b"x") for i in range(1, 101)]
        )
        ref = BlockRef("s1", STREAM, b, BlockSummary.of(cols))
        blocks.append((ref, cols))
    by_id = {ref.block_id: cols for ref, cols in blocks}

    def slow_load(ref: BlockRef) -> Columns:
        time.sleep(0.02)
        return by_id[ref.block_id]

    matcher = Matcher(LogQuery(regex="x", count=True, limit=1000, budget_s=0.05))
    started = time.monotonic()
    page = run_query(matcher, [ref for ref, _ in blocks], slow_load)
    assert time.monotonic() - started < 0.2
    assert page.truncated is not None and 1 <= page.truncated.blocks_scanned < 20
    assert page.truncated.records_scanned == 100 * page.truncated.blocks_scanned
    assert len(page.hits) == page.truncated.records_scanned and page.total is None


async def test_regexes_re2_does_not_take_get_a_clear_400(hub: Hub, admin: Operator) -> None:
    for pattern in ("(a)%5C1", "foo(%3F%3Dbar)", "(%3F%3C%3Dx)y", "a" * 1001):
        status, answer = await admin.call("GET", f"/v1/logs?regex={pattern}")
        assert (status, answer["error"]["code"]) == (400, "bad_regex"), answer
        assert "regex" in answer["error"]["message"]
    status, answer = await admin.call("GET", "/v1/logs?regex=(a)%5C1")
    assert "RE2" in answer["error"]["message"] and "backreferences" in answer["error"]["message"]


async def test_who_may_query_logs(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    """GET /v1/logs: any token of the tenant (logs.read), a fleet token every tenant's;
    others are refused before a query runs (the queries' pool is never even started)."""
    for tenant in ("blue", "red"):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    red = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "red"}, 201)
    revoked = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    await admin.ok("DELETE", f"/v1/tokens/{revoked['id']}")
    async with session.get(f"{hub.url}/v1/logs?regex={CATASTROPHIC}") as resp:
        assert resp.status == 401
    status, _ = await admin.call("GET", "/v1/logs?tenant=blue", token=red["token"])
    assert status == 404
    status, _ = await admin.call("GET", "/v1/logs?regex=x", token=revoked["token"])
    assert status == 401
    assert hub.logs._queries is None
    status, _ = await admin.call("GET", "/v1/logs?tenant=red", token=red["token"])
    assert status == 200
