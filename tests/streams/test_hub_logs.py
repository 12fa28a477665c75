"""Streams forwarded to a real hub by a real three-agent site, through an uplink that is cut.

The hub runs in the test process; the site's agents link to it through ``Uplink``, a
relay the test can sever like a dead WAN link. Events produced at the site reach the
hub exactly once and in order, are searchable with every filter, tenants only see their
own, and a million events produced across the hosts while the uplink is down and one
host is killed all reach the hub once it heals.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from central_hub import Hub, HubConfig
from central_hub.logstore import LogQuery
from meshorch import __version__
from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.hub.helpers import Operator
from tests.streams.uplink import Uplink
from tests.waiting import until

SITE = "shop-1"
POS = "/v1/streams/acme/pos/logs"
MILLION = int(os.environ.get("MESHORCH_STREAM_EVENTS", "1000000"))


@dataclass
class World:
    hub: Hub
    admin: Operator
    session: aiohttp.ClientSession
    site: LocalSite
    uplink: Uplink

    async def agent(self, method: str, host: LocalHost, path: str, body: object = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(method, f"{host.url}{path}", data=data) as response:
            answer = await response.json(content_type=None)
            assert response.status == 200, (path, response.status, answer)
            return answer

    async def produce(
        self, host: LocalHost, stream: str, lines: list[str], level: int = 6
    ) -> tuple[int, int]:
        body = {"events": [{"payload": line, "level": level} for line in lines]}
        answer = await self.agent("POST", host, f"{stream}/events", body)
        return answer["first_seq"], answer["last_seq"]

    async def hub_position(self, stream: str) -> int:
        answer = await self.admin.ok("GET", "/v1/logs/streams")
        found = [s["position"] for s in answer["streams"] if s["stream"] == stream]
        return found[0] if found else 0

    async def forwarded(self, stream: str, last: int, timeout_s: float = 30.0) -> None:
        async def there() -> bool:
            return await self.hub_position(stream) >= last

        await until(f"{stream} forwarded to {last}", there, timeout_s)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = HubConfig(
        data_dir=tmp_path / "hub", port=0, insecure_http=True, tick_s=0.05, gossip=False
    )
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=HEADERS) as session,
    ):
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        for tenant in ("acme", "globex"):
            await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
        created = await admin.ok("POST", "/v1/sites", {"id": SITE}, 201)
        host, port = hub.url.removeprefix("http://").rsplit(":", 1)
        uplink = Uplink(host, int(port))
        await uplink.start()
        site = linked_site(tmp_path / "site", hub, SITE, created["enroll_token"], via=uplink.url)
        site.start()
        try:
            await wait_ready(session, site.members, timeout_s=30)
            yield World(hub, admin, session, site, uplink)
        finally:
            site.stop()
            await uplink.stop()


async def logs(world: World, token: str | None = None, **params: str) -> tuple[int, Any]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return await world.admin.call("GET", f"/v1/logs?{query}", token=token)


async def test_events_reach_the_hub_once_in_order_and_are_searchable(world: World) -> None:
    h1, h2, h3 = world.site.members
    sent: list[tuple[int, int]] = []
    for n, host in enumerate((h1, h2, h3, h1)):
        lines = [f"order {n}-{i} accepted in {i * 3} ms" for i in range(50)]
        sent.append(await world.produce(host, POS, lines))
    sent.append(await world.produce(h2, POS, ["payment failed: card declined id=77f3"], 3))
    await world.produce(h3, "/v1/streams/globex/web/logs", ["globex private line"])
    await world.produce(h1, "/v1/streams/ghost/app/logs", ["a tenant the hub does not know"])
    await world.forwarded("acme/pos/logs", 201)
    await world.forwarded("globex/web/logs", 1)

    status, page = await logs(world, stream="acme/pos/logs", limit="1000", count="true")
    assert status == 200 and page["total"] == 201
    seqs = [hit["seq"] for hit in page["logs"]]
    assert seqs == list(range(201, 0, -1))  # newest first, each once
    texts = {hit["seq"]: hit["text"] for hit in page["logs"]}
    for n, (first, last) in enumerate(sent[:4]):
        assert [texts[s] for s in range(first, last + 1)] == [
            f"order {n}-{i} accepted in {i * 3} ms" for i in range(50)
        ]

    status, page = await logs(world, grep="card%20declined", site=SITE)
    assert [hit["host"] for hit in page["logs"]] == ["h2"] and page["logs"][0]["level"] == 3
    status, page = await logs(world, level="3", app="pos")
    assert [hit["text"] for hit in page["logs"]] == ["payment failed: card declined id=77f3"]
    status, page = await logs(world, host="h3", stream="acme/pos/logs", limit="1000")
    assert len(page["logs"]) == 50
    status, page = await logs(world, regex="order%202-4[0-9]%20", count="true")
    assert page["total"] == 10

    # Pages follow each other without overlap, newest first.
    status, first_page = await logs(world, stream="acme/pos/logs", limit="120")
    status, second_page = await logs(
        world, stream="acme/pos/logs", limit="120", cursor=first_page["next_cursor"]
    )
    both = [h["seq"] for h in first_page["logs"] + second_page["logs"]]
    assert both == list(range(201, 0, -1)) and second_page["next_cursor"] is None

    # Tenants see their own streams only; the unknown tenant's stream is refused, not stored.
    made = await world.admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "globex"}, 201)
    status, page = await logs(world, token=made["token"], limit="1000")
    assert status == 200 and [h["text"] for h in page["logs"]] == ["globex private line"]
    status, page = await logs(world, token=made["token"], tenant="acme")
    assert status == 404
    status, page = await logs(world, token=made["token"], grep="payment")
    assert page["logs"] == []
    views = [await world.agent("GET", h, "/v1/fleet") for h in world.site.members]
    (leader,) = [v for v in views if v["is_leader"]]
    assert "ghost/app/logs" in leader["streams"]["refused"]
    status, page = await logs(world, grep="does%20not%20know")
    assert page["logs"] == []

    # The fleet view shows every host's release (reports every 3 s).
    async def versions() -> bool:
        site = await world.admin.ok("GET", f"/v1/sites/{SITE}")
        hosts = site["hosts"]
        return len(hosts) == 3 and all(h.get("agent_version") == __version__ for h in hosts)

    await until("agent versions in the fleet view", versions, 15)
    listed = await world.admin.ok("GET", "/v1/sites")
    assert [s["agent_versions"] for s in listed["sites"] if s["id"] == SITE] == [[__version__]]

    for bad in ("regex=(", "limit=0", "level=9", "since=yesterday", "cursor=garbage", "x=1"):
        status, answer = await world.admin.call("GET", f"/v1/logs?{bad}")
        assert status == 400, (bad, answer)


async def test_a_million_events_through_a_cut_uplink_and_a_killed_host(world: World) -> None:
    hosts = list(world.site.members)
    await world.produce(hosts[0], POS, ["before the cut"])
    await world.forwarded("acme/pos/logs", 1)
    world.uplink.sever()

    batch = 1000
    batches = MILLION // batch
    acked: dict[str, tuple[int, int]] = {}
    lost: list[str] = []
    victim = hosts[1]
    killed = asyncio.Event()
    counter = iter(range(batches))
    started = time.monotonic()

    async def producer(home: LocalHost) -> None:
        for n in counter:
            tag = f"batch-{n:06d}"
            lines = [f"{tag} line {i:04d} door=open temp=21.{i % 10}" for i in range(batch)]
            host = home
            if killed.is_set() and host is victim:
                host = hosts[0]
            try:
                acked[tag] = await world.produce(host, POS, lines)
            except (aiohttp.ClientError, AssertionError, TimeoutError):
                lost.append(tag)  # not acknowledged: never retried, so no duplicate content
            if n == batches // 3 and not killed.is_set():
                world.site.kill(victim)
                killed.set()

    await asyncio.gather(*(producer(h) for h in hosts * 2))
    produce_s = time.monotonic() - started
    assert killed.is_set() and len(acked) >= batches - 10, (len(acked), lost)
    live = hosts[0]
    status = await world.agent("GET", live, POS)
    last = status["last_seq"]
    assert status["dropped_events"] == 0
    assert await world.hub_position("acme/pos/logs") == 1  # nothing crossed the cut

    world.uplink.heal()
    healed = time.monotonic()
    await world.forwarded("acme/pos/logs", last, timeout_s=300)
    forward_s = time.monotonic() - healed
    print(
        f"produced {len(acked) * batch} events in {produce_s:.1f} s, forwarded in {forward_s:.1f} s"
    )

    store = world.hub.logs.store
    total = store.query(LogQuery(stream="acme/pos/logs", count=True, limit=1)).total
    assert total == last  # every sequence 1..last exactly once (the hub keys by sequence)
    for tag, (first, end) in acked.items():
        page = store.query(LogQuery(stream="acme/pos/logs", substring=f"{tag} ", limit=1000))
        hits = list(reversed(page.hits))
        assert [h.seq for h in hits] == list(range(first, end + 1)), tag
        assert [h.text[len(tag) + 6 : len(tag) + 10] for h in hits] == [
            f"{i:04d}" for i in range(batch)
        ], tag


TALKER = """
api_version: meshorch/v1
name: talker
version: "1"
services:
  - name: main
    replicas: 2
    containers:
      - name: main
        image: process
        command:
          - sh
          - -c
          - "i=0; while true; do i=$((i+1)); echo hello $i; echo oops $i >&2; sleep 0.2; done"
        resources: {memory_limit: 32Mi, cpu_request: 0.1}
"""


async def test_application_output_is_captured_and_found_with_meshorch_logs(
    world: World, tmp_path: Path
) -> None:
    h1 = world.site.members[0]
    async with world.session.post(f"{h1.url}/v1/apps?tenant=acme", data=TALKER.encode()) as r:
        assert r.status == 200, await r.text()

    async def both_levels() -> bool:
        # Both levels, and at least the 5 "hello" lines the command below asks for.
        status, page = await logs(world, app="talker", limit="1000")
        if status != 200:
            return False
        hellos = [h for h in page["logs"] if h["text"].startswith("hello")]
        return {h["level"] for h in page["logs"]} == {3, 6} and len(hellos) >= 5

    await until("talker's output at the hub", both_levels, 30)
    _, page = await logs(world, app="talker", grep="oops", limit="1000")
    assert page["logs"] and all(h["level"] == 3 for h in page["logs"])
    assert all(h["stream"] == "acme/talker/logs" for h in page["logs"])
    hosts = {h["host"] for h in page["logs"]}
    assert hosts <= {"h1", "h2", "h3"} and hosts

    base = [
        sys.executable, "-m", "meshorch", "logs", "--hub", world.hub.url,
        "--token", world.admin.token, "--site", SITE, "--app", "talker",
    ]  # fmt: skip
    command = [*base, "--grep", "hello", "--since", "10m", "--limit", "5", "--count"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and all(" talker info   hello " in line for line in lines), lines
    times = [line.split(" ", 1)[0] for line in lines]
    assert times == sorted(times)  # oldest first, ending with the newest
    assert "matching lines" in done.stderr
    command = [*base, "--grep", "hello", "--since", "10m", "--limit", "3", "--output", "json"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    hits = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(hits) == 3 and all(h["text"].startswith("hello") for h in hits), hits
    assert [h["time"] for h in hits] == sorted(h["time"] for h in hits)
    bad = await asyncio.to_thread(
        subprocess.run, [*base, "--regex", "("], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "bad_regex" in bad.stderr


UNPLACEABLE = """
api_version: meshorch/v1
name: giant
version: "1"
services:
  - name: main
    containers:
      - {name: main, image: process, command: ["sleep", "1000"],
         resources: {memory_limit: 32Mi, cpu_request: 512}}
"""


async def test_app_events_of_the_site_are_searchable_at_the_hub(world: World) -> None:
    # No host has 512 CPUs: the site's controller records why, as an app event that also
    # goes to the app's events stream and on to the hub.
    h2 = world.site.members[1]
    async with world.session.post(f"{h2.url}/v1/apps?tenant=acme", data=UNPLACEABLE.encode()) as r:
        assert r.status == 200, await r.text()

    async def found() -> list[dict[str, Any]] | None:
        status, page = await logs(world, stream="acme/giant/events", grep="unplaced")
        return page["logs"] or None if status == 200 else None

    hits = await until("giant's unplaced event at the hub", found, 30)
    assert hits[0]["text"].startswith("instance_unplaced: giant.main.0: "), hits
    assert hits[0]["level"] == 4 and hits[0]["site"] == SITE
    status, others = await logs(world, stream="globex/giant/events")
    assert status == 200 and others["logs"] == []


async def test_retention_drops_oldest_first_and_the_hub_is_told_how_much(world: World) -> None:
    h1, h2, _ = world.site.members
    await world.produce(h1, POS, ["before the cut"])
    await world.forwarded("acme/pos/logs", 1)
    retention = {"retention": {"max_bytes": 262144, "max_age_s": None}}
    await world.agent("PUT", h1, POS, retention)
    aged = "/v1/streams/acme/pos/audit"
    await world.agent("PUT", h2, aged, {"retention": {"max_bytes": None, "max_age_s": 60}})
    world.uplink.sever()
    filler = "z" * 500
    for batch in range(20):
        await world.produce(h2, POS, [f"b{batch:02d} e{i:03d} {filler}" for i in range(100)])
    old = time.time() - 3600
    body = {"events": [{"payload": f"old {i}", "time": old + i} for i in range(10)]}
    await world.agent("POST", h1, f"{aged}/events", body)
    await world.produce(h1, aged, ["fresh"])

    async def trimmed() -> dict[str, Any] | None:
        status = await world.agent("GET", h1, POS)
        return status if status["dropped_events"] else None

    status = await until("retention ran", trimmed, 20)
    assert status["stored_bytes"] <= 262144
    assert status["first_seq"] == status["dropped_events"] + 1  # from seq 1 on
    assert status["dropped_unforwarded"] == status["dropped_events"] - 1  # seq 1 had arrived
    kept = await world.agent("GET", h2, f"{POS}/events?from=0&limit=10")
    assert kept["events"][0]["seq"] == status["first_seq"]  # oldest first
    assert kept["events"][-1]["payload"].startswith("b")
    audit = await until("age retention ran", lambda: _dropped(world, h1, aged, 10), 20)
    assert audit["first_seq"] == 11 and audit["last_seq"] == 11

    world.uplink.heal()
    await world.forwarded("acme/pos/logs", status["last_seq"], timeout_s=60)
    listed = (await world.admin.ok("GET", "/v1/logs/streams"))["streams"]
    hub_view = {s["stream"]: s for s in listed}
    assert hub_view["acme/pos/logs"]["dropped"] == status["dropped_unforwarded"]
    assert hub_view["acme/pos/audit"]["dropped"] == 10
    _, page = await logs(world, stream="acme/pos/logs", count="true", limit="1")
    assert page["total"] == status["last_seq"] - status["dropped_unforwarded"]
    _, page = await logs(world, stream="acme/pos/audit", since="0", limit="100")
    assert [h["text"] for h in page["logs"]] == ["fresh"]


async def _dropped(world: World, host: LocalHost, stream: str, count: int) -> Any:
    status = await world.agent("GET", host, stream)
    return status if status["dropped_events"] == count else None
