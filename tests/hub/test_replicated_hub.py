"""A replicated hub: three real replica processes, kill -9 of the leader during a rollout.

Sites are light sites (``bench/fanout_site.py``: real signed link requests, real delta
verification) given every replica's URL; the operator uses one replica's URL, then another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from central_hub.replica import HUB_DIR
from central_hub.tls import load as load_tls
from tests.hub.helpers import spec_text

REPO = Path(__file__).resolve().parents[2]
SITES = 100


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Replica:
    data_dir: Path
    argv: list[str]
    url: str
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=log
        )
        log.close()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                await self.kill()


@dataclass
class Cluster:
    replicas: list[Replica]
    fingerprint: str
    session: aiohttp.ClientSession
    token: str = ""
    fleet: dict[str, Any] = field(default_factory=dict)

    @property
    def urls(self) -> str:
        return ",".join(r.url for r in self.replicas)

    async def call(
        self, url: str, method: str, path: str, body: object = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None if body is None else orjson.dumps(body)
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(self.fingerprint))
        try:
            async with self.session.request(
                method, url + path, data=data, headers=headers, ssl=fingerprint
            ) as resp:
                raw = await resp.read()
                return resp.status, orjson.loads(raw) if raw else None
        except (aiohttp.ClientError, OSError) as exc:
            return 0, str(exc)

    async def leader_hub(self) -> Replica:
        """The replica whose hub runs (its data dir has the hub's lock held and it answers)."""
        for replica in self.replicas:
            if (replica.data_dir / HUB_DIR / "admin.token").exists():
                return replica
        raise AssertionError("no replica initialised the fleet")


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    kek = tmp_path / "kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    tls = load_tls(tmp_path, None, None, "127.0.0.1")  # one certificate for every replica
    ports = [(free_port(), free_port()) for _ in range(3)]
    peers = [f"--peer=127.0.0.1:{raft}=https://127.0.0.1:{api}" for api, raft in ports]
    replicas = []
    for number, (api, raft) in enumerate(ports, 1):
        data_dir = tmp_path / f"r{number}"
        argv = [
            sys.executable, "-m", "central_hub", "--data-dir", str(data_dir),
            "--listen", f"127.0.0.1:{api}", "--gossip", f"127.0.0.1:{free_port()}",
            "--kek-file", str(kek), "--tls-cert", str(tls.cert_path),
            "--tls-key", str(tmp_path / "tls.key"), "--raft", f"127.0.0.1:{raft}", *peers,
        ]  # fmt: skip
        replicas.append(Replica(data_dir, argv, f"https://127.0.0.1:{api}"))
    running = Cluster(replicas, tls.fingerprint, session)
    try:
        for replica in replicas:
            await replica.start()
        yield running
    finally:
        for replica in replicas:
            await replica.stop()


async def until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def ready(running: Cluster, url: str) -> dict[str, Any]:
    async def fleet() -> Any:
        with contextlib.suppress(AssertionError):
            running.token = (
                ((await running.leader_hub()).data_dir / HUB_DIR / "admin.token")
                .read_text()
                .strip()
            )
        if not running.token:
            return None
        status, answer = await running.call(url, "GET", "/v1/fleet")
        return answer if status == 200 else None

    answer: dict[str, Any] = await until(fleet, 60, f"the replicated hub to answer at {url}")
    return answer


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


async def test_kill_9_of_the_leader_during_a_rollout_to_100_sites(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        first = running.replicas[0].url
        fleet = await ready(running, first)
        names = [f"shop-{n:03d}" for n in range(SITES)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "bench" / "fanout_site.py"), "--hub", running.urls,
            "--hub-fingerprint", running.fingerprint, "--fleet", fleet["fleet"],
            "--root-key", fleet["root_key"], "--sites", ",".join(names),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        sites = Sites(process)
        reader = asyncio.create_task(sites.read())
        try:
            await until(_async(lambda: len(sites.keys) == SITES), 30, "the sites' keys")
            for name in names:
                body = {"id": name, "labels": {"tier": "shop"}, "public_key": sites.keys[name]}
                status, answer = await running.call(first, "POST", "/v1/sites", body)
                assert status == 201, answer
            assert process.stdin is not None
            process.stdin.write(b"GO\n")
            await process.stdin.drain()
            async with asyncio.timeout(60):
                await sites.ready.wait()

            body = {"spec": spec_text("pos", "2.0"), "placement": {"max_parallel": 20}}
            status, answer = await running.call(first, "POST", "/v1/apps", body)
            assert status == 202, answer
            deployment = answer["id"]
            await until(_async(lambda: len(sites.applied) >= 10), 60, "the first wave")

            # Operator writes keep coming while the leader dies: every acknowledged one
            # must survive.
            acknowledged: list[str] = []
            leader = await running.leader_hub()
            others = [r for r in running.replicas if r is not leader]

            async def writes() -> None:
                for n in range(40):
                    name = f"t{n}"
                    url = others[n % 2].url
                    status, _ = await running.call(url, "POST", "/v1/tenants", {"id": name})
                    if status == 201:
                        acknowledged.append(name)
                    await asyncio.sleep(0.1)

            writer = asyncio.create_task(writes())
            await asyncio.sleep(0.8)
            await leader.kill()
            killed_at = time.monotonic()
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
            assert len(acknowledged) >= 20, acknowledged  # the writes went on
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
            back = await ready(running, leader.url)
            assert back["root_key"] == fleet["root_key"]
            status, answer = await running.call(
                leader.url, "GET", f"/v1/tenants/{acknowledged[-1]}"
            )
            assert status == 200, answer
            print(
                f"rollout completed {failover_s:.1f} s after the leader's kill; "
                f"{len(acknowledged)} of 40 operator writes acknowledged, all kept"
            )
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


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()

    return run
