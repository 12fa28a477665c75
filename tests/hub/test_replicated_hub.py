"""A replicated hub: three real replica processes, kill -9 of the leader during a rollout.

Sites are light sites (``bench/fanout_site.py``: real signed link requests, real delta
verification) given every replica's URL; the operator uses one replica's URL, then another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.hubcluster import Cluster, cluster, until
from tests.hub.helpers import spec_text

REPO = Path(__file__).resolve().parents[2]
SITES = 100


@dataclass
class Sites:
    process: asyncio.subprocess.Process
    keys: dict[str, str] = field(default_factory=dict)
    applied: dict[str, str] = field(default_factory=dict)  # site -> last version applied
    rejected: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        while line := (await self.process.stdout.readline()).decode():
            kind, *rest = line.split()
            if kind == "KEY":
                self.keys[rest[0]] = rest[1]
            elif kind == "READY":
                self.ready.set()
            elif kind == "APPLIED":
                self.applied[rest[0]] = rest[2]
            elif kind == "REJECTED":
                self.rejected.append(line.strip())


@contextlib.asynccontextmanager
async def light_sites(
    running: Cluster, names: list[str], urls: str | None = None
) -> AsyncIterator[Sites]:
    """``names`` registered at the hub and linked (each reported once), given every
    replica's URL (bench/fanout_site.py), or ``urls``."""
    fleet = running.fleet
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "bench" / "fanout_site.py"), "--hub", urls or running.urls,
        "--hub-fingerprint", running.fingerprint, "--fleet", fleet["fleet"],
        "--root-key", fleet["root_key"], "--sites", ",".join(names),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    sites = Sites(process)
    reader = asyncio.create_task(sites.read())
    try:
        await until(_async(lambda: len(sites.keys) == len(names)), 30, "the sites' keys")
        for name in names:
            body = {"id": name, "labels": {"tier": "shop"}, "public_key": sites.keys[name]}
            status, answer = await running.call(running.replicas[0].url, "POST", "/v1/sites", body)
            assert status == 201, answer
        assert process.stdin is not None
        process.stdin.write(b"GO\n")
        await process.stdin.drain()
        async with asyncio.timeout(60):
            await sites.ready.wait()
        yield sites
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_kill_9_of_the_leader_during_a_rollout_to_100_sites(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        first = running.replicas[0].url
        fleet = await running.ready(first)
        names = [f"shop-{n:03d}" for n in range(SITES)]
        async with light_sites(running, names) as sites:
            body = {"spec": spec_text("pos", "2.0"), "placement": {"max_parallel": 20}}
            status, answer = await running.call(first, "POST", "/v1/apps", body)
            assert status == 202, answer
            deployment = answer["id"]
            await until(_async(lambda: len(sites.applied) >= 10), 60, "the first wave")

            # Operator writes keep coming while the leader dies: every acknowledged one
            # must survive.
            acknowledged: list[str] = []
            leader = await running.leader()
            others = [r for r in running.replicas if r is not leader]

            stop_writing = asyncio.Event()
            attempts = 0

            async def writes() -> None:
                nonlocal attempts
                while not stop_writing.is_set():
                    name = f"t{attempts}"
                    url = others[attempts % 2].url
                    attempts += 1
                    status, _ = await running.call(url, "POST", "/v1/tenants", {"id": name})
                    if status == 201:
                        acknowledged.append(name)
                    await asyncio.sleep(0.1)

            writer = asyncio.create_task(writes())
            await asyncio.sleep(0.8)
            before_kill = len(acknowledged)
            await leader.kill()
            killed_at = time.monotonic()
            # The writes go on once another replica leads.
            await until(
                _async(lambda: len(acknowledged) >= before_kill + 10), 60, "writes after the kill"
            )
            stop_writing.set()
            await writer

            async def succeeded() -> bool:
                status, state = await running.call(
                    others[0].url, "GET", f"/v1/deployments/{deployment}"
                )
                assert status in (0, 200, 503), state
                return status == 200 and state["state"] == "succeeded"

            await until(succeeded, 120, f"deployment {deployment} to succeed after the kill")
            failover_s = time.monotonic() - killed_at
            assert sites.rejected == [], sites.rejected  # no site saw a chain break
            assert sorted(sites.applied) == names
            assert set(sites.applied.values()) == {"2.0"}
            for name in acknowledged:
                status, answer = await running.call(others[1].url, "GET", f"/v1/tenants/{name}")
                assert status == 200, (name, answer)
            # The command line, given every replica with the dead one first, fails over.
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshorch", "tenants", "--hub",
                ",".join([leader.url, *(r.url for r in others)]), "--token", running.token,
                "--output", "json", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "MESHORCH_HUB_FINGERPRINT": running.fingerprint,
                     "MESHORCH_KNOWN_HUBS": str(tmp_path / "known_hubs")},
            )  # fmt: skip
            out, err = await cli.communicate()
            assert cli.returncode == 0, err.decode()
            assert {t["id"] for t in orjson.loads(out)} >= set(acknowledged)
            # The killed replica comes back as a follower and serves the same state.
            await leader.start()
            back = await running.ready(leader.url)
            assert back["root_key"] == fleet["root_key"]
            status, answer = await running.call(
                leader.url, "GET", f"/v1/tenants/{acknowledged[-1]}"
            )
            assert status == 200, answer
            print(
                f"rollout completed {failover_s:.1f} s after the leader's kill; "
                f"{len(acknowledged)} of {attempts} operator writes acknowledged, all kept"
            )


async def test_a_root_key_rotation_outlives_the_leader_that_made_it(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The new root key is replicated sealed with the rotation delta: the next leader signs
    with it, and sites that followed the rotation accept what it signs. Before it, junk on
    the replicas' Raft ports."""
    async with cluster(tmp_path, session) as running:
        fleet = await running.ready(running.replicas[0].url)
        # A stranger's garbage on every replica's Raft port changes nothing.
        for replica in running.replicas:
            host, port = replica.argv[replica.argv.index("--raft") + 1].rsplit(":", 1)
            for junk in (os.urandom(4096), b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n"):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(host, int(port))
                    writer.write(junk)
                    await writer.drain()
                    writer.close()
        async with light_sites(running, ["shop-a", "shop-b", "shop-c"]) as sites:
            leader = await running.leader()
            status, rotation = await running.call(leader.url, "POST", "/v1/fleet/rotate")
            assert status == 200, rotation
            assert rotation["previous_key"] == fleet["root_key"]
            await leader.kill()
            other = next(r for r in running.replicas if r is not leader)
            after = await running.ready(other.url)
            assert after["root_key"] == rotation["root_key"] != fleet["root_key"]
            body = {"spec": spec_text("pos", "3.0"), "placement": {"max_parallel": 3}}
            status, answer = await running.call(other.url, "POST", "/v1/apps", body)
            assert status == 202, answer
            await until(
                _async(lambda: set(sites.applied.values()) == {"3.0"} and len(sites.applied) == 3),
                60,
                "the sites to apply a delta signed by the new leader with the new key",
            )
            assert sites.rejected == [], sites.rejected


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()

    return run
