"""Hosts of a real three-agent site (process runtime, loopback): their release and protocol,
drain (work moves, the host stays a member), undrain, remove (drain, then revoke), and the
protocol gate that keeps stream appends away from hosts on an older release."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nacl.signing import SigningKey

from meshorch import __version__
from meshorch.apps.records import encode_hostinfo, hostinfo_key
from meshorch.apps.scheduler import HostInfo
from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from meshorch.site.agent import Agent
from meshorch.state.protocol import PROTOCOL, FeatureUnavailable
from meshorch.state.tables import APPS_TABLE
from meshorch.streams.model import NewEvent
from raft import Delete, Put
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config, peer_headers
from tests.waiting import until

APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: web
    replicas: 4
    containers:
      - name: main
        image: process
        command: ["sleep", "1000"]
        resources: {memory_limit: 32Mi, cpu_request: 0.1}
"""


async def get(session: aiohttp.ClientSession, host: LocalHost, path: str) -> Any:
    async with session.get(f"{host.url}{path}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshorch", "host", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_drain_undrain_and_remove_a_host(
    site: LocalSite, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, site.members)
    h1, h2, _ = site.members
    hosts = (await get(session, h1, "/v1/hosts"))["hosts"]
    assert [h["host_id"] for h in hosts] == ["h1", "h2", "h3"]
    assert all(h["alive"] and not h["drained"] for h in hosts)
    assert {(h["agent_version"], h["protocol"]) for h in hosts} == {(__version__, PROTOCOL)}
    async with session.post(f"{h1.url}/v1/apps", data=APP.encode()) as response:
        assert response.status == 200

    async def spread() -> bool:
        counts = {
            h["host_id"]: h["instances"] for h in (await get(session, h1, "/v1/hosts"))["hosts"]
        }
        return sum(counts.values()) == 4 and counts["h3"] > 0

    await until("instances on every host", spread, 30)

    drained = await asyncio.to_thread(cli, "drain", "h3", "--wait", "--api", h2.api)
    assert drained.returncode == 0, drained.stderr
    assert "h3: 0 instance(s) still placed here" in drained.stdout
    hosts = {h["host_id"]: h for h in (await get(session, h1, "/v1/hosts"))["hosts"]}
    assert hosts["h3"]["drained"] and hosts["h3"]["alive"] and hosts["h3"]["instances"] == 0

    async def all_ready_elsewhere() -> bool:
        view = await get(session, h1, "/v1/apps/shop?consistency=local")
        instances = view["instances"]
        return len(instances) == 4 and all(i["ready"] and i["host"] != "h3" for i in instances)

    await until("app ready on h1 and h2", all_ready_elsewhere, 30)

    undrained = await asyncio.to_thread(cli, "undrain", "h3", "--api", h1.api)
    assert undrained.returncode == 0, undrained.stderr
    hosts = {h["host_id"]: h for h in (await get(session, h1, "/v1/hosts"))["hosts"]}
    assert not hosts["h3"]["drained"]

    listed = await asyncio.to_thread(cli, "list", "--api", h1.api)
    assert listed.returncode == 0 and "h3" in listed.stdout and __version__ in listed.stdout

    removed = await asyncio.to_thread(cli, "remove", "h3", "--api", h1.api)
    assert removed.returncode == 0, removed.stderr + removed.stdout
    members = (await get(session, h1, "/v1/members"))["members"]
    assert sorted(m["host_id"] for m in members) == ["h1", "h2"]
    await until("app ready without h3", all_ready_elsewhere, 30)

    missing = await asyncio.to_thread(cli, "drain", "h9", "--api", h1.api)
    assert missing.returncode != 0 and "no host 'h9'" in missing.stderr


async def test_removing_the_leader_hands_leadership_over_first(
    site: LocalSite, session: aiohttp.ClientSession
) -> None:
    # pysyncobj refuses to remove its leader: the member handling the removal asks the
    # leader to step down, then removes it under the new one.
    statuses = await wait_ready(session, site.members)
    leader_id = next(iter(statuses.values()))["leader"]
    leader = next(h for h in site.members if h.host_id == leader_id)
    asker, other = [h for h in site.members if h is not leader]

    # A peer route: asked as a member asks it, signed by the third host.
    signed = peer_headers(other.data_dir, other.host_id, "POST", "/v1/raft/step-down")
    async with (
        aiohttp.ClientSession() as peer,
        peer.post(f"{asker.url}/v1/raft/step-down", headers=signed) as follower_answer,
    ):
        assert follower_answer.status == 409
        assert (await follower_answer.json())["error"]["code"] == "not_leader"

    removed = await asyncio.to_thread(cli, "remove", leader_id, "--api", asker.api)
    assert removed.returncode == 0, removed.stderr + removed.stdout

    async def new_leader() -> str | None:
        status = await get(session, other, "/v1/status")
        return status["leader"] if status["leader"] not in (None, leader_id) else None

    assert await until("a new leader", new_leader, 15) in (asker.host_id, other.host_id)
    members = (await get(session, other, "/v1/members"))["members"]
    assert sorted(m["host_id"] for m in members) == sorted([asker.host_id, other.host_id])
    async with session.put(f"{other.url}/v1/kv/after", data=b"still writable") as response:
        assert response.status == 200, await response.text()


async def test_stream_appends_wait_until_every_host_speaks_their_protocol(tmp_path: Path) -> None:
    config = lone_agent_config(tmp_path, "gate", "fleet", SigningKey.generate())
    async with Agent(config) as agent:
        await until("leader", lambda: agent.raft.status().is_leader)
        event = NewEvent(b"x", 1.0)
        await until(
            "registered",
            lambda: agent.raft.view.get(APPS_TABLE, hostinfo_key("h1")) is not None,
        )
        await agent.streams.produce("acme/app/events", [event])
        old = HostInfo("h-old", {}, 1000, 1 << 30, agent_version="0.0.9", protocol=1)
        await agent.raft.propose([Put(APPS_TABLE, hostinfo_key("h-old"), encode_hostinfo(old))])
        with pytest.raises(FeatureUnavailable, match="h-old still run an older release"):
            await agent.streams.produce("acme/app/events", [event])
        async with aiohttp.ClientSession(headers=HEADERS) as client:
            url = f"http://{config.api_address}/v1/streams/acme/app/events/events"
            async with client.post(url, json={"events": [{"payload": "x"}]}) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "upgrade_in_progress"
        assert agent.streams.status("acme/app/events").last_seq == 1  # nothing stored
        await agent.raft.propose([Delete(APPS_TABLE, hostinfo_key("h-old"))])
        assert await agent.streams.produce("acme/app/events", [event]) == (2, 2)
