"""A site of three real agent processes on loopback: Raft, LMDB and HTTP for real."""

import asyncio
import signal

import aiohttp

from meshorch.demo.localsite import LocalHost, LocalSite, get_status, wait_ready


async def put(session: aiohttp.ClientSession, host: LocalHost, key: str, value: bytes) -> int:
    async with session.put(f"{host.url}/v1/kv/{key}", data=value) as response:
        assert response.status == 200, await response.text()
        return int((await response.json())["index"])


async def get(
    session: aiohttp.ClientSession, host: LocalHost, key: str, consistency: str = "linearizable"
) -> bytes | None:
    url = f"{host.url}/v1/kv/{key}?consistency={consistency}"
    async with session.get(url) as response:
        if response.status == 404:
            return None
        assert response.status == 200, await response.text()
        return await response.read()


async def leader_of(session: aiohttp.ClientSession, site: LocalSite) -> LocalHost:
    statuses = await wait_ready(
        session,
        [h for h in site.members if h.process is not None and h.process.poll() is None],
        members=len(site.members),
    )
    leader_id = next(iter(statuses.values()))["leader"]
    return site.host(leader_id)


async def test_a_write_on_any_host_is_readable_on_every_host(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    for writer in ready_site.members:
        await put(session, writer, f"from/{writer.host_id}", writer.host_id.encode())
        for reader in ready_site.members:
            assert await get(session, reader, f"from/{writer.host_id}") == writer.host_id.encode()
    async with session.get(f"{ready_site.members[1].url}/v1/kv/?prefix=from/") as response:
        listing = await response.json()
    assert listing == {"keys": ["from/h1", "from/h2", "from/h3"], "more": False}


async def test_status_names_site_host_leader_and_members(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    status = await get_status(session, ready_site.members[0])
    assert status is not None
    assert status["site"] == "test" and status["host_id"] == "h1" and status["ready"] is True
    assert status["leader"] in {"h1", "h2", "h3"}
    assert sorted(m["host_id"] for m in status["members"]) == ["h1", "h2", "h3"]
    assert status["term"] >= 1 and status["commit_index"] >= 1


async def test_killed_leader_is_replaced_and_catches_up_on_return(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    old = await leader_of(session, site)
    await put(session, old, "before", b"1")
    site.kill(old)
    survivors = [h for h in site.members if h is not old]
    await wait_ready(session, survivors, members=3, not_leader=old.host_id)
    for i in range(20):
        await put(session, survivors[i % 2], f"during/{i}", b"x%d" % i)
    site.start_host(old)
    await wait_ready(session, site.members)
    for i in range(20):
        assert await get(session, old, f"during/{i}", consistency="local") in (None, b"x%d" % i)
    assert await get(session, old, "during/19") == b"x19"  # linearizable: caught up
    assert await get(session, old, "during/0", consistency="local") == b"x0"


async def test_every_acknowledged_write_survives_kill_9_of_all_hosts(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    acknowledged: dict[str, bytes] = {}
    enough = asyncio.Event()

    async def writer(worker: int) -> None:
        host = site.members[worker % 3]
        for i in range(1000):
            key, value = f"w{worker}/{i}", b"%d-%d" % (worker, i)
            try:
                async with session.put(f"{host.url}/v1/kv/{key}", data=value) as response:
                    if response.status == 200:
                        acknowledged[key] = value
                        if len(acknowledged) >= 600:
                            enough.set()
            except aiohttp.ClientError:
                return

    writers = [asyncio.create_task(writer(w)) for w in range(12)]
    await asyncio.wait_for(enough.wait(), 60)
    for host in site.members:  # pull the plug on everyone mid-stream
        site.kill(host)
    await asyncio.gather(*writers)
    snapshot = dict(acknowledged)
    assert len(snapshot) >= 600
    site.start()
    await wait_ready(session, site.members)
    reader = site.members[2]
    async with session.get(f"{reader.url}/v1/kv/?prefix=w&limit=10000") as response:
        present = set((await response.json())["keys"])
    missing = set(snapshot) - present
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"
    for key in list(snapshot)[:: max(1, len(snapshot) // 50)]:
        assert await get(session, reader, key, consistency="local") == snapshot[key]


async def test_minority_cannot_acknowledge_but_majority_can(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    three = await leader_of(session, site)
    one, two = (h for h in site.members if h is not three)
    # Majority: the leader paused, the other two elect another and still commit. The write
    # goes through a follower, which loses its answer when the leadership changes: the
    # agent resends it under its client session, where it is applied once.
    site.signal(three, signal.SIGSTOP)
    try:
        await put(session, one, "majority", b"ok")
        assert await get(session, two, "majority") == b"ok"
    finally:
        site.signal(three, signal.SIGCONT)
    await wait_ready(session, site.members)
    # Minority: two hosts paused, the third alone must not acknowledge anything.
    site.signal(two, signal.SIGSTOP)
    site.signal(three, signal.SIGSTOP)
    try:
        async with session.put(f"{one.url}/v1/kv/minority", data=b"no") as response:
            assert response.status in (503, 504)
            error = (await response.json())["error"]
            assert error["code"] in ("not_committed", "outcome_unknown")
            said = "may or may not have been applied" if response.status == 504 else "nothing"
            assert said in error["message"], error
        async with session.get(f"{one.url}/v1/kv/majority?consistency=linearizable") as response:
            assert response.status in (503, 504)  # cannot prove it is up to date
    finally:
        site.signal(two, signal.SIGCONT)
        site.signal(three, signal.SIGCONT)
    await wait_ready(session, site.members)


async def test_add_a_fourth_member_then_remove_one(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    for i in range(10):
        await put(session, site.members[i % 3], f"pre/{i}", b"%d" % i)
    newcomer = site.add_host()
    body = {"host_id": newcomer.host_id, "raft": newcomer.raft, "api": newcomer.api}
    async with session.post(f"{site.members[1].url}/v1/members", json=body) as response:
        assert response.status == 200, await response.text()
    await wait_ready(session, site.members, members=4)
    assert await get(session, newcomer, "pre/9") == b"9"
    await put(session, newcomer, "from/newcomer", b"hi")

    leader = await leader_of(session, site)
    leaving = next(h for h in site.members[:3] if h is not leader)
    async with session.delete(f"{newcomer.url}/v1/members/{leaving.host_id}") as response:
        assert response.status == 200, await response.text()
    site.stop_host(leaving)
    staying = [h for h in site.members if h is not leaving]
    statuses = await wait_ready(session, staying, members=3)
    for status in statuses.values():
        ids = sorted(m["host_id"] for m in status["members"])
        assert ids == sorted(h.host_id for h in staying)
    for host in staying:
        assert await get(session, host, "from/newcomer") == b"hi"
    async with session.get(f"{staying[0].url}/v1/members") as response:
        listed = sorted(m["host_id"] for m in (await response.json())["members"])
    assert listed == sorted(h.host_id for h in staying)
