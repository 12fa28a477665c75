"""Acknowledged means on disk: traced with strace, every write a real agent acknowledges is
preceded by an fdatasync of its Raft journal (``--durability power``, the default), and
with ``--durability process`` there is none (so the check can fail)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from tests.labutil import require_lab

WRITES = 30
ACK = re.compile(r'^\d+\s+(?:write|writev|sendto|sendmsg)\(\d+<(?:TCP|TCPv6):.*"HTTP/1\.1 200')
SYNC = re.compile(r"^\d+\s+fdatasync\(\d+<[^>]*raft\.journal>")


@pytest.fixture
def trace_tool() -> Iterator[str]:
    require_lab("strace")
    found = shutil.which("strace")
    assert found is not None
    yield found


def traced(strace: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """strace every thread of ``pid`` (syncs and what it sends), until terminated."""
    threads = [f"-p{task.name}" for task in Path(f"/proc/{pid}/task").iterdir()]
    return subprocess.Popen(
        [strace, "-f", "-yy", "-s", "32", "-o", str(out),
         "-e", "trace=fdatasync,write,writev,sendto,sendmsg", *threads],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def syncs_before_each_ack(trace: str) -> list[int]:
    """For every HTTP 200 the agent sent, how many journal fdatasyncs came since the last."""
    counts, syncs = [], 0
    for line in trace.splitlines():
        if SYNC.match(line):
            syncs += 1
        elif ACK.match(line):
            counts.append(syncs)
            syncs = 0
    return counts


async def acknowledged_writes(site: LocalSite, leader: LocalHost) -> None:
    async with site.session(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for i in range(WRITES):  # one at a time: each is acknowledged before the next
            async with session.put(f"{leader.url}/v1/kv/w{i}", data=b"v") as response:
                assert response.status == 200, await response.text()


async def trace_writes(tmp_path: Path, strace: str, durability: str, hosts: int) -> list[int]:
    site = LocalSite(
        hosts=hosts, site="shop", root=tmp_path / "site", extra_args=["--durability", durability]
    )
    site.start()
    try:
        async with site.session(timeout=aiohttp.ClientTimeout(total=30)) as session:
            statuses = await wait_ready(session, site.members)
        leader = next(h for h in site.members if statuses[h.host_id]["is_leader"])
        assert leader.pid is not None
        out = tmp_path / "trace.txt"
        tracer = traced(strace, leader.pid, out)
        try:
            await asyncio.sleep(1.0)  # attached to every thread
            await acknowledged_writes(site, leader)
        finally:
            tracer.terminate()
            tracer.wait(timeout=10)
        return syncs_before_each_ack(out.read_text(errors="replace"))
    finally:
        site.stop()


@pytest.mark.parametrize("hosts", [1, 3])
async def test_every_acknowledged_write_follows_a_journal_fdatasync(
    tmp_path: Path, trace_tool: str, hosts: int
) -> None:
    counts = await trace_writes(tmp_path, trace_tool, "power", hosts)
    assert len(counts) >= WRITES, counts  # every acknowledgement seen
    assert all(n >= 1 for n in counts[-WRITES:]), counts


async def test_process_durability_acknowledges_without_fdatasync(
    tmp_path: Path, trace_tool: str
) -> None:
    counts = await trace_writes(tmp_path, trace_tool, "process", 3)
    assert len(counts) >= WRITES, counts
    assert sum(counts) == 0, counts
