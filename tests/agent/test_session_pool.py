"""Writes that name no session go through the agent's own pooled sessions: a session
record per writer at a time, not one per write, on real agents."""

import asyncio
from pathlib import Path

import aiohttp
import lmdb

from meshorch.demo.localsite import LocalSite
from raft.sessions import SESSIONS_TABLE

WRITERS = 8
WRITES = 40  # per writer


def session_records(view: Path) -> int:
    env = lmdb.open(str(view), readonly=True, lock=False, max_dbs=64)
    try:
        db = env.open_db(SESSIONS_TABLE.encode(), create=False)
        with env.begin(db=db) as txn:
            return sum(1 for key in txn.cursor().iternext(values=False) if key[:1] == b"c")
    finally:
        env.close()


async def test_anonymous_writes_reuse_the_agents_sessions(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    members = ready_site.members

    async def writer(w: int) -> None:
        host = members[w % len(members)]
        for i in range(WRITES):
            async with session.put(f"{host.url}/v1/kv/w{w}/{i}", data=b"v") as response:
                assert response.status == 200, await response.text()

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    # Every write applied once: each key holds its value.
    for w in range(WRITERS):
        async with session.get(f"{members[0].url}/v1/kv/w{w}/{WRITES - 1}") as response:
            assert response.status == 200 and await response.read() == b"v"
    ready_site.stop()
    for host in members:
        records = session_records(host.data_dir / "raft" / "view")
        # At most one session per writer at a time on each agent (and the few of the
        # agents' own writes), against one per write before.
        assert 0 < records <= 2 * WRITERS, records
