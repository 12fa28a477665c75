"""A test site speaking the real link protocol, and an operator client, against a real hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey

from meshorch.fleet.delta import BatchResult, TrustState, verify_batch
from meshorch.fleet.link_auth import sign_request, url_host

SPEC_YAML = """\
api_version: meshorch/v1
name: {name}
version: "{version}"
services:
  - name: web
    replicas: 1
    containers:
      - name: web
        image: busybox:latest
        command: ["httpd", "-f", "-p", "{port}"]
        resources:
          cpu_request: 100m
          memory_limit: 64Mi
"""


def spec_text(name: str = "web", version: str = "1.0", port: int = 8080) -> str:
    return SPEC_YAML.format(name=name, version=version, port=port)


class Operator:
    """JSON calls with a bearer token."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url
        self.token = token

    async def call(
        self, method: str, path: str, body: object = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(
            method, self.url + path, data=data, headers=headers
        ) as resp:
            return resp.status, orjson.loads(await resp.read())

    async def ok(self, method: str, path: str, body: object = None, status: int = 200) -> Any:
        got, answer = await self.call(method, path, body)
        assert got == status, answer
        return answer


class Site:
    """A site: its identity key, its trust state, the real signed requests."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, site_id: str, fleet: str, root_key: str
    ) -> None:
        self.session = session
        self.url = url
        self.id = site_id
        self.key = SigningKey.generate()
        self.trust = TrustState(fleet=fleet, trusted_keys=frozenset({root_key}))
        self.clock: Callable[[], float] = time.time

    @property
    def public_key(self) -> str:
        return bytes(self.key.verify_key).hex()

    async def request(self, method: str, path_qs: str, body: bytes = b"") -> tuple[int, Any]:
        headers = sign_request(
            self.key, self.id, method, path_qs, body, self.clock(), host=url_host(self.url)
        )
        async with self.session.request(
            method, self.url + path_qs, data=body or None, headers=headers
        ) as resp:
            return resp.status, orjson.loads(await resp.read())

    async def fetch(self, after: int | None = None, wait: float = 0) -> tuple[int, list[bytes]]:
        """GET /v1/link/deltas; returns the head and the envelopes re-encoded."""
        after = self.trust.version if after is None else after
        status, answer = await self.request("GET", f"/v1/link/deltas?after={after}&wait={wait}")
        assert status == 200, answer
        return answer["head"], [orjson.dumps(e) for e in answer["deltas"]]

    async def sync(self) -> BatchResult:
        """Fetch and verify everything new; apply it to the trust state."""
        _, envelopes = await self.fetch()
        result = verify_batch(envelopes, self.trust, time.time(), self.id)
        assert result.rejected is None, result.rejected
        assert result.state is not None
        self.trust = result.state
        return result

    async def report(self, apps: dict[str, Any], **extra: Any) -> tuple[int, Any]:
        report = {
            "v": 1,
            "site": self.id,
            "time": self.clock(),
            "applied_version": self.trust.version,
            "applied_head": self.trust.head,
            "rejections": [],
            "hosts": [{"host_id": "h1", "alive": True, "instances": []}],
            "apps": apps,
            **extra,
        }
        return await self.request("POST", "/v1/link/report", orjson.dumps(report))


def probe_hosts(protocol: int) -> list[dict[str, Any]]:
    """A report's one host, speaking site ``protocol`` (what the hub reads to choose the
    delta format)."""
    host = {"host_id": "h1", "alive": True, "instances": [], "agent_version": "t"}
    return [{**host, "protocol": protocol}]


def healthy(version: str) -> dict[str, Any]:
    return {"version": version, "desired": 1, "ready": 1, "state": "healthy", "message": ""}


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll a condition of the real system (the timeout only bounds a broken test)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


async def wait_for(
    admin: Operator, dep_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Poll a deployment until ``done`` holds for it."""
    async with asyncio.timeout(timeout_s):
        while True:
            dep: dict[str, Any] = await admin.ok("GET", f"/v1/deployments/{dep_id}")
            if done(dep):
                return dep
            await asyncio.sleep(0.01)
