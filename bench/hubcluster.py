"""A replicated hub on loopback: 3 (or 5) ``meshorch hub --raft`` processes sharing a KEK
and a certificate, for tests and benchmarks (``tests/hub/test_replicated_hub.py``,
``bench/hub_scale.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from central_hub.front import SERVED_BY_HEADER
from central_hub.replica import HUB_DIR
from central_hub.tls import load as load_tls
from meshorch.demo.localsite import free_port


@dataclass
class Replica:
    data_dir: Path
    argv: list[str]
    url: str
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=log
            )

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
        """One operator request; status 0 when the replica cannot be reached."""
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

    def initialiser(self) -> Replica:
        """The replica that initialised the fleet (its hub wrote the admin token)."""
        for replica in self.replicas:
            if (replica.data_dir / HUB_DIR / "admin.token").exists():
                return replica
        raise AssertionError("no replica initialised the fleet")

    async def leader(self) -> Replica:
        """The replica whose hub answers now (``X-Meshorch-Served-By``)."""
        for replica in self.replicas:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(
                    replica.url + "/v1/fleet",
                    headers={"Authorization": f"Bearer {self.token}"},
                    ssl=aiohttp.Fingerprint(bytes.fromhex(self.fingerprint)),
                ) as resp:
                    served_by = resp.headers.get(SERVED_BY_HEADER)
                if served_by is not None:
                    raft = {r.argv[r.argv.index("--raft") + 1]: r for r in self.replicas}
                    return raft[served_by]
        raise AssertionError("no replica leads")

    async def ready(self, url: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for ``url`` to answer ``GET /v1/fleet``; reads the admin token first."""

        async def fleet() -> Any:
            if not self.token:
                with contextlib.suppress(AssertionError):
                    path = self.initialiser().data_dir / HUB_DIR / "admin.token"
                    self.token = path.read_text().strip()
            if not self.token:
                return None
            status, answer = await self.call(url, "GET", "/v1/fleet")
            return answer if status == 200 else None

        answer: dict[str, Any] = await until(fleet, timeout_s, f"the hub to answer at {url}")
        self.fleet = answer
        return answer


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def cluster(
    root: Path, session: aiohttp.ClientSession, replicas: int = 3, *flags: str
) -> AsyncIterator[Cluster]:
    """Start ``replicas`` replica processes under ``root`` (logs: ``root/rN.log``)."""
    root.mkdir(parents=True, exist_ok=True)
    kek = root / "kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    tls = load_tls(root, None, None, "127.0.0.1")  # one certificate for every replica
    ports = [(free_port(), free_port()) for _ in range(replicas)]
    peers = [f"--peer=127.0.0.1:{raft}=https://127.0.0.1:{api}" for api, raft in ports]
    started = []
    for number, (api, raft) in enumerate(ports, 1):
        data_dir = root / f"r{number}"
        argv = [
            sys.executable, "-m", "central_hub", "--data-dir", str(data_dir),
            "--listen", f"127.0.0.1:{api}", "--gossip", f"127.0.0.1:{free_port()}",
            "--kek-file", str(kek), "--tls-cert", str(tls.cert_path),
            "--tls-key", str(root / "tls.key"), "--raft", f"127.0.0.1:{raft}",
            "--log-level", "warning", *peers, *flags,
        ]  # fmt: skip
        started.append(Replica(data_dir, argv, f"https://127.0.0.1:{api}"))
    running = Cluster(started, tls.fingerprint, session)
    try:
        for replica in started:
            await replica.start()
        yield running
    finally:
        for replica in started:
            await replica.stop()
