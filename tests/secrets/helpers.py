"""A site of real agents (process runtime, loopback) that receives secrets in deltas
signed here and relayed to its agent API, as a hub's would be."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey

from meshorch.demo.localsite import LocalHost, LocalSite, free_port, wait_ready
from meshorch.fleet.delta import Target, key_id
from meshorch.secrets.keyring import seal
from meshorch.secrets.service import delivery_root
from tests.agents_util import peer_headers
from tests.fleet.hubstub import StubHub
from tests.waiting import until

ROOT = SigningKey(b"r" * 32)
SITE = "shop-1"
FLEET = "acme"


def new_site(root: Path, hosts: int = 3) -> LocalSite:
    # The hub address leads nowhere: deltas come by relay (POST /v1/fleet/deltas).
    extra = ["--hub", f"http://127.0.0.1:{free_port()}", "--fleet", FLEET,
             "--fleet-key", key_id(ROOT)]  # fmt: skip
    return LocalSite(hosts=hosts, site=SITE, root=root, extra_args=extra)


class Driver:
    """Talks to the site: its agents' API, and deltas signed by the fleet root key."""

    def __init__(self, site: LocalSite, session: aiohttp.ClientSession) -> None:
        self.site = site
        self.session = session
        self.signer = StubHub(FLEET, ROOT)  # never started: it only signs

    @property
    def hosts(self) -> list[LocalHost]:
        return self.site.members

    async def call(
        self, method: str, host: LocalHost, path: str, body: object = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else None if body is None else orjson.dumps(body)
        async with self.session.request(method, f"{host.url}{path}", data=data) as response:
            return response.status, dict(await response.json(content_type=None))

    async def peer_call(
        self, method: str, host: LocalHost, path: str, body: object, *, by: LocalHost
    ) -> tuple[int, dict[str, Any]]:
        """A request to a peer route of ``host``, signed by member ``by`` as its agent signs."""
        headers = peer_headers(by.data_dir, by.host_id, method, path)
        url, data = f"{host.url}{path}", orjson.dumps(body)
        async with (
            aiohttp.ClientSession(timeout=self.session.timeout) as peer,
            peer.request(method, url, data=data, headers=headers) as response,
        ):
            return response.status, dict(await response.json(content_type=None))

    async def ok(self, method: str, host: LocalHost, path: str, body: object = None) -> Any:
        status, answer = await self.call(method, host, path, body)
        assert status == 200, (path, status, answer)
        return answer

    async def status(self, host: LocalHost) -> dict[str, Any]:
        return dict(await self.ok("GET", host, "/v1/secrets/status?consistency=local"))

    async def wait_ready(self) -> None:
        """Raft ready everywhere, and the fleet link (from the flags) in the site state."""
        await wait_ready(self.session, self.hosts, timeout_s=30)

        async def configured() -> bool:
            status, fleet = await self.call("GET", self.hosts[0], "/v1/fleet")
            return status == 200 and fleet["trust"] is not None

        await until("the fleet link is configured", configured)

    async def wait_unsealed(self, hosts: list[LocalHost] | None = None) -> None:
        for host in hosts or self.hosts:
            await until(f"{host.host_id} unsealed", self._unsealed(host))

    def _unsealed(self, host: LocalHost) -> Callable[[], Any]:
        async def check() -> bool:
            return not (await self.status(host))["sealed"]

        return check

    async def public_key(self) -> bytes:
        status = await self.status(self.hosts[0])
        return bytes.fromhex(status["public_key"])

    async def deliver(self, ops: list[Mapping[str, Any]]) -> tuple[float, dict[str, Any]]:
        """Sign a delta for this site and relay it; (monotonic time it was committed, answer)."""
        self.signer.publish(ops, target=Target(sites=frozenset({SITE})))
        envelope = self.signer.envelopes[-1]
        status, answer = await self.call("POST", self.hosts[0], "/v1/fleet/deltas", raw=envelope)
        committed = time.monotonic()
        assert status == 200, answer
        return committed, answer

    async def put_secret(self, name: str, value: bytes, version: int) -> float:
        public = await self.public_key()
        blob = base64.b64encode(seal(public, value)).decode()
        op = {"op": "secret.put", "tenant": "default", "name": name, "version": version,
              "sealed": {SITE: blob}}  # fmt: skip
        committed, answer = await self.deliver([op])
        assert answer["op_errors"] == [], answer
        return committed

    async def escrow_kek(self) -> bytes:
        """The site's unseal key, through the escrow route (as the hub will hold it)."""
        mine = PrivateKey.generate()
        answer = await self.ok(
            "POST", self.hosts[0], "/v1/secrets/escrow",
            {"public_key": bytes(mine.public_key).hex()},
        )  # fmt: skip
        return bytes(SealedBox(mine).decrypt(base64.b64decode(answer["sealed_key"])))

    async def apply_app(self, spec: Mapping[str, Any]) -> None:
        await self.ok("POST", self.hosts[0], "/v1/apps", spec)

    async def instance(self, app: str) -> dict[str, Any]:
        view = await self.ok("GET", self.hosts[0], f"/v1/apps/{app}?consistency=local")
        (instance,) = view["instances"]
        return dict(instance)

    def host(self, host_id: str) -> LocalHost:
        return self.site.host(host_id)

    def secret_file(self, instance: Mapping[str, Any], container: str, file: str) -> Path:
        host = self.host(instance["host"])
        runtime_id = f"{instance['instance_id']}.{container}"
        return delivery_root(host.data_dir) / runtime_id / file

    def instance_pid(self, instance: Mapping[str, Any], container: str) -> int:
        host = self.host(instance["host"])
        state = host.data_dir / "instances" / f"meshorch-{instance['instance_id']}.{container}"
        return int(orjson.loads((state / "state.json").read_bytes())["pid"])

    def environ(self, pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)

    async def restart_all(self) -> None:
        for host in self.hosts:
            self.site.stop_host(host)
        for host in self.hosts:
            self.site.start_host(host)
        await self.wait_ready()


def app_spec(name: str, secrets: list[dict[str, Any]], version: str = "1") -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "process",
        "command": ["sleep", "1000"],
        "resources": {"memory_limit": "32Mi", "cpu_request": 0.1},
    }
    if secrets:
        container["secrets"] = secrets
    return {"api_version": "meshorch/v1", "name": name, "version": version,
            "services": [{"name": "web", "replicas": 1, "containers": [container]}]}  # fmt: skip


def forms(value: bytes) -> list[bytes]:
    """How a value could appear in a file: raw, base64 (both alphabets), hex."""
    return [
        value,
        base64.b64encode(value),
        base64.urlsafe_b64encode(value),
        value.hex().encode(),
        value.hex().upper().encode(),
    ]


def scan_for(roots: list[Path], values: list[bytes]) -> list[str]:
    """Every (file, value) where a form of a value appears in a file under the roots."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for value in values:
                if any(form in data for form in forms(value)):
                    found.append(f"{path}: {value[:4]!r}...")
    return found
