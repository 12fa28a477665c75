"""Lab: agents in namespaces on one bridge find the others of their own site."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import pytest

from tests.labutil import require_lab
from tests.netmesh.labnet import REPO_ROOT, LabNet

pytestmark = pytest.mark.lab

_REPLY_TIMEOUT_S = 120


class Agent:
    def __init__(self, proc: asyncio.subprocess.Process, host: str) -> None:
        self.proc = proc
        self.host = host
        self.pk = ""

    async def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), _REPLY_TIMEOUT_S)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            raise AssertionError(f"agent {self.host} exited: {err.decode(errors='replace')}")
        data: dict[str, Any] = json.loads(line)
        return data

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.reply()


async def start_agent(ns: str, site: str, host: str, ip: str, *extra: str) -> Agent:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        "tests.netmesh.discovery_agent",
        "--site",
        site,
        "--host",
        host,
        "--ip",
        ip,
        *extra,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Agent(proc, host)


async def test_agents_see_only_their_own_site(labnet: LabNet) -> None:
    require_lab()
    switch = labnet.netns("sw")
    bridge = labnet.bridge(switch, "br")
    members = [("h1", "alpha"), ("h2", "alpha"), ("h3", "alpha"), ("h4", "beta")]
    agents: list[Agent] = []
    ips: dict[str, str] = {}
    try:
        for i, (host, site) in enumerate(members, start=1):
            ns = labnet.netns(host)
            ip = f"192.168.88.{10 + i}"
            labnet.attach(ns, f"{ip}/24", switch, bridge, f"e{i}")
            ips[host] = ip
            # h4 (site beta) also advertises a malformed record claiming site alpha.
            extra = ("--bogus-site", "alpha") if site == "beta" else ()
            agents.append(await start_agent(ns, site, host, ip, *extra))
        for agent in agents:
            ready = await agent.reply()
            assert ready["ready"] is True
            agent.pk = ready["pk"]

        alpha = agents[:3]
        beta = agents[3]
        for agent in alpha:
            seen = await agent.ask("until peers 2 90")
            assert seen["ok"], seen
            others = {a.host for a in alpha} - {agent.host}
            assert set(seen["peers"]) == others
            for other in alpha:
                if other.host in others:
                    got = seen["peers"][other.host]
                    assert got["pk"] == other.pk
                    assert got["join"] == f"{ips[other.host]}:7100"
                    assert got["addresses"] == [ips[other.host]]

        malformed = await alpha[0].ask("until malformed 1 60")
        assert malformed["ok"], malformed
        assert "bogus" not in malformed["peers"]
        assert "h4" not in malformed["peers"]

        foreign = await beta.ask("until foreign 3 60")
        assert foreign["ok"], foreign
        assert foreign["peers"] == {}

        # An agent that stops sends goodbyes: the others forget it.
        leaving = alpha[2]
        assert leaving.proc.stdin is not None
        leaving.proc.stdin.write(b"quit\n")
        await leaving.proc.stdin.drain()
        assert await asyncio.wait_for(leaving.proc.wait(), 30) == 0
        after = await alpha[0].ask("atmost peers 1 60")
        assert after["ok"], after
        assert set(after["peers"]) == {alpha[1].host}
    finally:
        for agent in agents:
            if agent.proc.returncode is not None:
                continue
            with contextlib.suppress(Exception):
                assert agent.proc.stdin is not None
                agent.proc.stdin.write(b"quit\n")
                await agent.proc.stdin.drain()
        for agent in agents:
            try:
                await asyncio.wait_for(agent.proc.wait(), 20)
            except TimeoutError:
                agent.proc.kill()
                await agent.proc.wait()
