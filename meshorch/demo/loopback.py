"""``meshorch demo``: a hub and three sites of real agents on loopback, shown working.

Nothing is simulated: the hub signs deltas, each site's Raft leader fetches them over its
own outbound link, verifies them against the fleet root key, and runs the application.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from meshorch.demo.localsite import LocalHub, LocalSite, wait_ready


def say(message: str) -> None:
    print(message, flush=True)


SITES = {
    "shop-eu": {"region": "eu", "tier": "store"},
    "shop-us": {"region": "us", "tier": "store"},
    "shop-ap": {"region": "ap", "tier": "store"},
}
PLACEMENT = {"match": {"tier": "store"}, "max_parallel": 1}


class HubAccess(Protocol):
    """Where the hub answers and the admin token to call it with."""

    @property
    def url(self) -> str: ...

    @property
    def admin_token(self) -> str: ...


async def hub_call(
    session: aiohttp.ClientSession, hub: HubAccess, method: str, path: str, body: object = None
) -> Any:
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    ssl = getattr(hub, "ssl", True)  # a LocalHub over TLS: its pinned fingerprint
    async with session.request(method, hub.url + path, json=body, headers=headers, ssl=ssl) as r:
        answer = await r.json(content_type=None)
        if r.status >= 300:
            raise TimeoutError(f"the hub refused {method} {path}: {answer}")
        return answer


async def _show(root: Path, hosts: int, exit_after_s: float | None, parts: _Parts) -> None:
    async with aiohttp.ClientSession() as session:
        hub = parts.hub = LocalHub(root / "hub", fleet="demo", tls=True)
        say(f"[1/6] starting the hub on {hub.url} (fleet 'demo', data under {root})")
        hub.start()
        root_key = await hub.wait_ready(session)
        say(f"      fleet root key {root_key}")
        say(f"      TLS: self-signed certificate, SHA-256 fingerprint {hub.fingerprint}")
        say("      (sites pin it with --hub-fingerprint; the CLI pins it on first use)")

        say(f"[2/6] registering {len(SITES)} sites at the hub")
        tokens = await register_sites(session, hub)

        say(f"[3/6] starting {len(SITES)} sites of {hosts} agents on 127.0.0.1, each linked "
            "to the hub by its own outbound connection")  # fmt: skip
        started = time.monotonic()
        for site_id in SITES:
            local = LocalSite(hosts=hosts, site=site_id, root=root / site_id)
            local.extra_args = ["--hub", hub.url, "--fleet", "demo", "--fleet-key", root_key,
                                "--hub-fingerprint", str(hub.fingerprint),
                                "--enroll-token", tokens[site_id]]  # fmt: skip
            parts.sites.append(local)
            local.start()
        for local in parts.sites:
            async with local.session() as agents:
                statuses = await wait_ready(agents, local.members, timeout_s=60)
            leader = next(iter(statuses.values()))["leader"]
            say(f"      {local.site}: Raft cluster of {hosts} formed, leader {leader} "
                f"({time.monotonic() - started:.1f}s)")  # fmt: skip

        await deploy_and_show(session, hub, DEMO_APP, ("[4/6]", "[5/6]", "[6/6]"))
        await show_app_logs(session, hub, "hello", timeout_s=30)
        show_try_it(hub.url, hub.data_dir / "admin.token")
        await wait_for_stop(exit_after_s)


async def register_sites(session: aiohttp.ClientSession, hub: HubAccess) -> dict[str, str]:
    """Create ``SITES`` at the hub; their enrollment tokens by site."""
    tokens = {}
    for site_id, labels in SITES.items():
        site = await hub_call(session, hub, "POST", "/v1/sites", {"id": site_id, "labels": labels})
        tokens[site_id] = site["enroll_token"]
        say(f"      {site_id:8} " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    return tokens


async def deploy_and_show(
    session: aiohttp.ClientSession, hub: HubAccess, app_yaml: str, steps: tuple[str, str, str]
) -> None:
    """Deploy ``app_yaml`` to ``PLACEMENT`` through the hub, follow it, show where it runs
    and the fleet view (``steps`` number the three parts)."""
    say(f"{steps[0]} deploying the app to placement {orjson.dumps(PLACEMENT).decode()}")
    deployment = await hub_call(session, hub, "POST", "/v1/apps",
                                {"spec": app_yaml, "placement": PLACEMENT})  # fmt: skip
    say(f"      deployment {deployment['id']}, waves {deployment['waves']}")
    await _follow(session, hub, deployment["id"], timeout_s=180)

    say(f"{steps[1]} where it runs (GET /v1/sites/{{id}} on the hub):")
    for site_id in SITES:
        view = await _wait_site_instances(session, hub, site_id, timeout_s=60)
        for host in view["hosts"]:
            for instance in host["instances"]:
                state = "ready" if instance["ready"] else "not ready"
                say(f"      {site_id:8} {instance['instance_id']:22} on {host['host_id']:6} "
                    f"{instance['state']:8} {state}")  # fmt: skip
    say(f"{steps[2]} the fleet view (GET /v1/sites):")
    for site in (await hub_call(session, hub, "GET", "/v1/sites"))["sites"]:
        counts = site["counts"] or {}
        hosts, instances = counts.get("hosts") or {}, counts.get("instances") or {}
        say(
            f"      {site['id']:8} {site['health']:9} applied delta {site['applied_version']}, "
            f"hosts up {hosts.get('up', '-')}/{hosts.get('total', '-')}, "
            f"instances ready {instances.get('ready', '-')}/{instances.get('total', '-')}"
        )
    say("")


async def show_app_logs(
    session: aiohttp.ClientSession, hub: HubAccess, app: str, timeout_s: float
) -> None:
    """The app's newest lines once the sites have forwarded some (the dashboard's "Recent
    logs" shows the same); says so when none came within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = await hub_call(session, hub, "GET", f"/v1/logs?app={app}&limit=3")
        if page["logs"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    say(f"      the app's logs, forwarded to the hub (GET /v1/logs?app={app}):")
    for line in reversed(page["logs"]):
        say(f"      {line['site']:8} {line.get('host') or '-':4} {line['text']}")
    if not page["logs"]:
        say(f"      (none yet after {timeout_s:g} s)")
    say("")


def show_try_it(hub_url: str, token_file: Path) -> None:
    say(f"Try it:  export MESHORCH_HUB={hub_url} MESHORCH_TOKEN=$(cat {token_file})")
    say("         meshorch sites;  meshorch sites shop-eu;  meshorch apps hello")
    insecure = " -k" if hub_url.startswith("https:") else ""  # self-signed: see the fingerprint
    say(f"         curl{insecure} {hub_url}/v1/openapi.json;  curl{insecure} {hub_url}/metrics")
    say(f"Dashboard: {hub_url}/  (log in with the token in {token_file})")


async def wait_for_stop(exit_after_s: float | None) -> None:
    """Until Ctrl-C or SIGTERM, or ``exit_after_s`` seconds."""
    if exit_after_s is None:
        say("Everything stays up until Ctrl-C.")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_after_s is not None:
        loop.call_later(exit_after_s, stop.set)
    await stop.wait()


async def _follow(
    session: aiohttp.ClientSession, hub: HubAccess, deployment_id: str, timeout_s: float
) -> dict[str, Any]:
    shown: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment = await hub_call(session, hub, "GET", f"/v1/deployments/{deployment_id}")
        for site_id, progress in sorted(deployment["progress"].items()):
            if shown.get(site_id) != progress["state"]:
                shown[site_id] = progress["state"]
                say(f"      {site_id:8} {progress['state']}")
        if deployment["state"] == "succeeded":
            say(f"      deployment {deployment['state']}")
            return dict(deployment)
        if deployment["state"] != "running":
            raise TimeoutError(f"deployment {deployment['state']}: {deployment['reason']}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the deployment did not finish within {timeout_s:g}s")


async def _wait_site_instances(
    session: aiohttp.ClientSession, hub: HubAccess, site_id: str, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view = dict(await hub_call(session, hub, "GET", f"/v1/sites/{site_id}"))
        instances = [i for h in view["hosts"] for i in h["instances"]]
        if (len(instances) == 3 and all(i["ready"] for i in instances)) or (
            time.monotonic() > deadline
        ):
            return view
        await asyncio.sleep(0.2)


DEMO_APP = """
api_version: meshorch/v1
name: hello
version: "1"
services:
  - name: clock
    replicas: 2
    anti_affinity: true
    containers:
      - name: main
        image: process
        # A line every 5 s on stdout: the agents capture it, the hub's logs and the
        # dashboard's "Recent logs" show it.
        command:
          - sh
          - -c
          - |
            i=0
            while true; do
              date > now; i=$((i + 1))
              if [ $((i % 5)) = 1 ]; then echo "clock tick $i: $(cat now)"; fi
              sleep 1
            done
        resources: {memory_limit: 32Mi, cpu_request: 0.05}
        probes:
          readiness: {exec: {command: ["test", "-s", "now"]}, period_s: 0.5, timeout_s: 0.4}
  - name: worker
    containers:
      - name: main
        image: process
        command:
          - sh
          - -c
          - "echo worker started; while true; do sleep 30; echo worker: queue empty; done"
        resources: {memory_limit: 16Mi, cpu_request: 0.05}
"""


@dataclass
class _Parts:
    hub: LocalHub | None = None
    sites: list[LocalSite] = field(default_factory=list)

    def logs(self) -> str:
        hub = f"--- hub ---\n{self.hub.logs()}\n" if self.hub else ""
        return hub + "\n".join(site.logs() for site in self.sites)

    def cleanup(self) -> None:
        for site in self.sites:
            site.stop()
        if self.hub is not None:
            self.hub.stop()


def run_demo(hosts: int = 2, exit_after_s: float | None = None) -> int:
    if hosts < 1:
        print("meshorch demo: --hosts must be at least 1", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="meshorch-demo-"))
    parts = _Parts()
    try:
        asyncio.run(_show(root, hosts, exit_after_s, parts))
    except (TimeoutError, RuntimeError) as exc:
        print(f"meshorch demo: {exc}\n{parts.logs()}", file=sys.stderr)
        return 1
    finally:
        say("stopping the hub and the agents, removing their data")
        parts.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return 0
