"""Writes that can be retried safely: the leader paused mid-write, a definite answer each time.

Three real agents on loopback. A counter key is advanced by compare-and-set while the
leader is paused (SIGSTOP) right after the write leaves; a lost answer would show as a
504, and an answer lost and the write sent again without a session as a 409 (the first
attempt moved the key): every answer must be a 200 and move the counter by exactly one.
"""

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey

from meshorch.apps.records import encode_hostinfo, hostinfo_key
from meshorch.apps.scheduler import HostInfo
from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from meshorch.site.agent import Agent
from meshorch.state.tables import APPS_TABLE
from raft import Delete, Put
from raft.sessions import SESSIONS_TABLE
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.waiting import until

ROUNDS = 100
KEY = "exactly-once/counter"


async def read_counter(session: aiohttp.ClientSession, host: LocalHost) -> tuple[int, int]:
    """(value, the index that last changed it); (0, 0) while absent."""
    async with session.get(f"{host.url}/v1/kv/{KEY}") as response:
        if response.status == 404:
            return 0, 0
        assert response.status == 200, await response.text()
        return int(await response.read()), int(response.headers["X-Meshorch-Index"])


async def cas(
    session: aiohttp.ClientSession,
    host: LocalHost,
    value: int,
    expect_index: int,
    headers: dict[str, str],
) -> tuple[int, str]:
    url = f"{host.url}/v1/kv/{KEY}?expect_index={expect_index}"
    async with session.put(url, data=b"%d" % value, headers=headers) as response:
        return response.status, await response.text()


async def test_leader_paused_mid_write_a_hundred_times_gets_definite_exactly_once_answers(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    rng = random.Random(19)
    async with session.post(f"{site.members[0].url}/v1/sessions") as response:
        assert response.status == 200, await response.text()
        client = (await response.json())["client"]
    seq = 0
    counts = {"resumed_before_answer": 0, "paused_until_answer": 0, "to_leader": 0}
    started = time.monotonic()
    for round_ in range(ROUNDS):
        statuses = await wait_ready(session, site.members)
        leader = site.host(next(iter(statuses.values()))["leader"])
        followers = [h for h in site.members if h is not leader]
        value, index = await read_counter(session, followers[0])
        assert value == round_, f"round {round_}: the counter is {value}"
        # Half the writes name a session of the caller's, half rely on the agent's own.
        headers: dict[str, str] = {}
        if round_ % 2:
            seq += 1
            headers = {"X-Meshorch-Client": client, "X-Meshorch-Seq": str(seq)}
        # Through a follower (forwarded to the leader) mostly, now and then to the leader.
        to_leader = round_ % 5 == 4
        target = leader if to_leader else rng.choice(followers)
        write = asyncio.create_task(cas(session, target, value + 1, index, headers))
        await asyncio.sleep(rng.uniform(0.0, 0.01))
        site.signal(leader, signal.SIGSTOP)
        try:
            if to_leader or rng.random() < 0.5:
                # Back before or after the others elect a new leader.
                await asyncio.sleep(rng.uniform(0.05, 1.2))
                site.signal(leader, signal.SIGCONT)
                counts["to_leader" if to_leader else "resumed_before_answer"] += 1
            else:
                counts["paused_until_answer"] += 1
            status, body = await write
        finally:
            site.signal(leader, signal.SIGCONT)
        assert status == 200, f"round {round_} ({counts}): {status} {body}"
        # Applied once, at the index the answer names.
        after = await read_counter(session, rng.choice(site.members))
        assert after == (value + 1, orjson.loads(body)["index"]), f"round {round_}: {after}"
    final, _ = await read_counter(session, site.members[2])
    assert final == ROUNDS
    elapsed = time.monotonic() - started
    print(f"{ROUNDS} rounds in {elapsed:.1f}s: {counts}")


async def test_sessions_wait_until_every_host_speaks_their_protocol(tmp_path: Path) -> None:
    """A host on protocol 3 cannot decode a session: KV writes go without one until it
    is gone, and a caller's session headers are refused meanwhile."""
    config = lone_agent_config(tmp_path, "gate", "fleet", SigningKey.generate())
    async with Agent(config) as agent, aiohttp.ClientSession(headers=HEADERS) as client:
        await until("leader", lambda: agent.raft.status().is_leader)
        await until(
            "registered",
            lambda: agent.raft.view.get(APPS_TABLE, hostinfo_key("h1")) is not None,
        )
        base = f"http://{config.api_address}"

        def sessions() -> int:
            return len(agent.raft.view.scan(SESSIONS_TABLE, b"c", 1000)[0])

        old = HostInfo("h-old", {}, 1000, 1 << 30, agent_version="0.0.9", protocol=3)
        await agent.raft.propose([Put(APPS_TABLE, hostinfo_key("h-old"), encode_hostinfo(old))])
        async with client.post(f"{base}/v1/sessions") as response:
            named = {"X-Meshorch-Client": (await response.json())["client"], "X-Meshorch-Seq": "1"}
        async with client.put(f"{base}/v1/kv/k", data=b"1") as response:
            assert response.status == 200, await response.text()
        async with client.put(f"{base}/v1/kv/k", data=b"2", headers=named) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "upgrade_in_progress"
        assert sessions() == 0
        await agent.raft.propose([Delete(APPS_TABLE, hostinfo_key("h-old"))])
        async with client.put(f"{base}/v1/kv/k", data=b"2", headers=named) as response:
            assert response.status == 200, await response.text()
        assert sessions() == 1


async def test_a_callers_resend_gets_the_first_answer_and_older_numbers_are_refused(
    tmp_path: Path,
) -> None:
    config = lone_agent_config(tmp_path, "resend", "fleet", SigningKey.generate())
    async with Agent(config) as agent, aiohttp.ClientSession(headers=HEADERS) as client:
        await until("leader", lambda: agent.raft.status().is_leader)
        base = f"http://{config.api_address}"
        async with client.post(f"{base}/v1/sessions") as response:
            session_id = (await response.json())["client"]

        async def put(value: bytes, seq: int, query: str = "") -> tuple[int, dict[str, Any]]:
            headers = {"X-Meshorch-Client": session_id, "X-Meshorch-Seq": str(seq)}
            url = f"{base}/v1/kv/k{query}"
            async with client.put(url, data=value, headers=headers) as response:
                return response.status, await response.json()

        status, first = await put(b"a", 1, "?expect_index=0")
        assert status == 200
        # The same request again: the first answer, not a conflict, and nothing applied.
        assert await put(b"a", 1, "?expect_index=0") == (200, first)
        stored = agent.raft.view.get("kv", b"k")
        assert stored is not None and stored.mod_index == first["index"]
        assert (await put(b"b", 2))[0] == 200
        status, stale = await put(b"c", 1)
        assert status == 409 and stale["error"]["code"] == "session_stale"
        stored = agent.raft.view.get("kv", b"k")
        assert stored is not None and stored.value == b"b"
        async with client.put(f"{base}/v1/kv/k", headers={"X-Meshorch-Seq": "3"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "bad_session"


UPLOAD_ROUNDS = 12


async def post_image(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, str]:
    async with session.post(url, data=data) as response:
        return response.status, await response.text()


async def test_an_image_upload_with_the_leader_paused_gets_a_definite_answer(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    """The image record's proposal may be in flight when the leader stops: the agent
    settles the unknown outcome itself (a barrier, then the state) and answers 200."""
    site = ready_site
    rng = random.Random(22)
    for round_ in range(UPLOAD_ROUNDS):
        statuses = await wait_ready(session, site.members)
        leader = site.host(next(iter(statuses.values()))["leader"])
        target = rng.choice([h for h in site.members if h is not leader])
        ref = f"shop/paused:{round_}"
        data = rng.randbytes(64 * 1024)

        sent = asyncio.create_task(post_image(session, f"{target.url}/v1/images?ref={ref}", data))
        await asyncio.sleep(rng.uniform(0.0, 0.02))
        site.signal(leader, signal.SIGSTOP)
        try:
            if round_ % 2:  # back before or after the others elect a new leader
                await asyncio.sleep(rng.uniform(0.05, 1.2))
                site.signal(leader, signal.SIGCONT)
            status, body = await sent  # else: stopped until the new leader answers
        finally:
            site.signal(leader, signal.SIGCONT)
        assert status == 200, f"round {round_}: {status} {body}"
        async with session.get(f"{target.url}/v1/images") as response:
            images = {i["ref"]: i for i in (await response.json())["images"]}
        assert target.host_id in images[ref]["holders"], images[ref]
