"""Requests with bad tokens cost the hub memory, not writes: counted, sampled into the
audit log, rate-limited per source; the audit log is pruned; the store's map grows."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import lmdb
import orjson

from central_hub import Hub, HubConfig
from central_hub.ledger import Txn
from central_hub.store import Store, put_json
from tests.hub.conftest import Clock, admin_token, hub_config
from tests.hub.helpers import Operator

JUNK = 10_000

# Another process floods the hub (its own event loop, real HTTP, 64 connections at once).
FLOOD = """
import asyncio, collections, os, sys, orjson, aiohttp
async def main(url, count):
    statuses = collections.Counter()
    retry_after = set()
    queue = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        async def worker():
            for _ in queue:
                token = f"mht_{os.urandom(8).hex()}_{os.urandom(32).hex()}"
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(url + "/v1/apps", headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status == 429:
                        retry_after.add(resp.headers.get("Retry-After"))
        await asyncio.gather(*(worker() for _ in range(64)))
    statuses = {str(k): v for k, v in statuses.items()}
    print(orjson.dumps({"statuses": statuses, "retry_after": sorted(retry_after)}).decode())
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_ten_thousand_junk_requests_leave_the_audit_log_bounded_and_writes_fast(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    defaults = HubConfig(
        data_dir=tmp_path / "hub", port=0, insecure_http=True, gossip=False
    )  # rate limit on
    async with Hub(defaults) as hub:
        hub.accounts.failures.every_s = 0.5
        admin = Operator(session, hub.url, admin_token(hub))
        await admin.ok("POST", "/v1/tenants", {"id": "warm"}, 201)
        entries_before = (await admin.ok("GET", "/v1/audit?limit=500"))["last"]
        used_before = hub.store.used_bytes()
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, hub.url, str(JUNK),
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        flood_started = time.perf_counter()
        await asyncio.sleep(0.5)  # the flood is under way
        latencies = []
        while flood.returncode is None and len(latencies) < 40:
            started = time.perf_counter()
            await admin.ok("POST", "/v1/tenants", {"id": f"t{len(latencies)}"}, 201)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
        out, _ = await flood.communicate()
        flood_s = time.perf_counter() - flood_started
        assert flood.returncode == 0
        result = orjson.loads(out)
        statuses = {int(k): v for k, v in result["statuses"].items()}
        print(
            f"\n{JUNK} junk requests: {statuses}; admin POST /v1/tenants during the flood "
            f"({len(latencies)} writes): median {statistics.median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )
        assert sum(statuses.values()) == JUNK and set(statuses) <= {401, 429}
        assert statuses.get(429, 0) > 0 and all(int(r) >= 1 for r in result["retry_after"])
        assert len(latencies) >= 3  # the admin wrote during the flood, and succeeded
        assert statistics.median(latencies) < 1.0

        # Counted in memory, then a handful of sampled entries with the whole count.
        await hub.accounts.failures.flush()
        answer = await admin.ok("GET", f"/v1/audit?after={entries_before}&limit=500")
        sampled = [e for e in answer["entries"] if e["outcome"] == "refused 401"]
        assert sum(e["count"] for e in sampled) == JUNK
        assert all(e["object"] == {"type": "source", "id": "127.0.0.1"} for e in sampled)
        assert all(e["actor"] is None for e in sampled)
        written = len(answer["entries"]) - len(latencies)
        # One entry per sampling interval while the flood lasted (longer on a busy
        # machine), plus the flush: not 10,000 entries.
        bound = int(flood_s / hub.accounts.failures.every_s) + 2
        assert written == len(sampled) <= min(bound, 200), (written, flood_s)
        assert hub.store.used_bytes() - used_before < 4 << 20
        assert hub.accounts.failures.total == JUNK

        # The source is over its rate (the bucket refilled a little since: spend it); a
        # good token from the same source is not refused.
        for _ in range(100):
            status, answer = await admin.call("GET", "/v1/apps", token="mht_00_00")
            if status == 429:
                break
        assert status == 429 and answer["error"]["code"] == "too_many_failed_authentications"
        async with session.get(hub.url + "/v1/apps") as resp:  # no credential at all
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert (await admin.call("GET", "/v1/apps"))[0] == 200


async def test_failed_authentications_are_sampled_per_source_and_flushed_at_stop(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = hub_config(tmp_path / "hub", gossip=False)
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        made = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "default"}, 201)
        await admin.ok("DELETE", f"/v1/tokens/{made['id']}")
        before = (await admin.ok("GET", "/v1/audit"))["last"]
        for token in ("mht_1_2", made["token"], "garbage"):  # unknown, revoked, malformed
            assert (await admin.call("GET", "/v1/apps", token=token))[0] == 401
        # Nothing written yet: counted in memory until the sample is due.
        assert (await admin.ok("GET", "/v1/audit"))["last"] == before
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        entries = (await admin.ok("GET", f"/v1/audit?after={before}"))["entries"]
        (sampled,) = [e for e in entries if e["outcome"] == "refused 401"]
        assert sampled["count"] == 3 and sampled["action"] == "apps.read"
        assert "3 failed authentication(s) from 127.0.0.1" in sampled["detail"]


async def test_the_audit_log_is_pruned_by_count_and_age_in_batches(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    hub = clocked_hub
    admin = Operator(session, hub.url, admin_token(hub))

    def many(txn: Txn) -> None:
        for i in range(200):
            txn.audit(None, "hub", None, "test", str(i), "ok")

    await hub.ledger.transact(many)
    retention = hub.audit_retention
    # Only this test's calls prune: the hub's tick would otherwise prune too once the clock
    # jumps, with the bounds of that moment (it took entry 351 while max_entries was 50).
    retention.every_s = float("inf")
    retention.max_entries, retention.max_age_s = 50, 3600.0
    retention.batch, retention.max_batches = 30, 2
    assert await retention.prune() == 60  # two batches a run, then the next run goes on
    assert await retention.prune() == 60
    assert await retention.prune() == 30
    entries = (await admin.ok("GET", "/v1/audit?limit=500"))["entries"]
    assert [e["seq"] for e in entries] == list(range(151, 201))
    clock.advance(1800)
    await hub.ledger.transact(many)  # 200 more, 30 minutes younger
    assert await retention.prune() == 60
    retention.max_batches = 100
    await retention.prune()
    entries = (await admin.ok("GET", "/v1/audit?after=0&limit=500"))["entries"]
    assert [e["seq"] for e in entries] == list(range(351, 401))
    clock.advance(3000)  # the first 200 are past the age now, the rest not
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    retention.max_entries = None
    assert await retention.prune() == 0
    clock.advance(700)
    assert await retention.prune() == 50
    entries = (await admin.ok("GET", "/v1/audit?after=0&limit=500"))["entries"]
    assert [e["action"] for e in entries] == ["tenants.create"]
    assert hub.store.get_json("meta", "audit_pruned_through") == 400


async def test_the_hubs_own_tick_prunes_the_audit_log(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = hub_config(tmp_path / "hub", audit_max_entries=5, heartbeat_s=3600.0)
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        hub.audit_retention.every_s = 0.05
        for name in ("blue", "green", "red", "amber", "grey", "teal", "plum"):
            await admin.ok("POST", "/v1/tenants", {"id": name}, 201)
        deadline = time.monotonic() + 30
        entries = (await admin.ok("GET", "/v1/audit?after=0&limit=500"))["entries"]
        while len(entries) > 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            entries = (await admin.ok("GET", "/v1/audit?after=0&limit=500"))["entries"]
        assert len(entries) == 5, entries
        assert hub.audit_retention.pruned >= 2
        assert [e["action"] for e in entries][-1] == "tenants.create"
        assert entries[-1]["seq"] == hub.store.last_sequence("audit")


def test_the_store_map_grows_before_it_fills_while_readers_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", map_size=1 << 20)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                for value in store.values_json("apps"):
                    assert len(value) in (1000, 1_000_000)
                store.get_json("apps", "k0")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for batch in range(100):  # 100 x 20 x ~5 KB = 10 MB through a 1 MiB map
            store.commit(
                [put_json("apps", f"k{batch}-{i}", ["y" * 4] * 1000) for i in range(20)],
                sync=False,
            )
        store.commit([put_json("apps", "huge", ["z" * 4] * 1_000_000)], sync=True)  # 7 MB
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert store.grown >= 3 and store.map_size > 16 << 20
    assert len(store.keys("apps")) == 2001
    store.close()
    reopened = Store(tmp_path / "s", map_size=1 << 20)  # a smaller size: raised to the file's
    assert len(reopened.keys("apps")) == 2001
    reopened.commit([put_json("apps", "after", [1])], sync=True)
    reopened.close()
    assert lmdb.MapFullError  # the error the growth prevents
