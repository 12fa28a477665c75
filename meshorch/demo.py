"""``meshorch demo``: a site of real agents on loopback, shown working."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import aiohttp

from meshorch.localsite import LocalSite, wait_ready


def say(message: str) -> None:
    print(message, flush=True)


async def _show(site: LocalSite, exit_after_s: float | None) -> None:
    async with aiohttp.ClientSession() as session:
        say(f"[1/5] starting {site.hosts} agents on 127.0.0.1 (data under {site.root})")
        started = time.monotonic()
        statuses = await wait_ready(session, site.members, timeout_s=60)
        leader = next(iter(statuses.values()))["leader"]
        say(f"[2/5] Raft cluster formed in {time.monotonic() - started:.1f}s, leader {leader}")

        first, last = site.members[0], site.members[-1]
        value = f"hello from {first.host_id} at {time.strftime('%H:%M:%S')}"
        async with session.put(f"{first.url}/v1/kv/demo/greeting", data=value.encode()) as r:
            body = await r.json()
            say(f"[3/5] PUT demo/greeting on {first.host_id}: committed at index {body['index']}")
        async with session.get(f"{last.url}/v1/kv/demo/greeting?consistency=linearizable") as r:
            say(f"      GET on {last.host_id} (linearizable): {(await r.text())!r}")

        say("[4/5] deploying an application (2 replicas on distinct hosts + 1 worker)")
        async with session.post(f"{first.url}/v1/apps", data=DEMO_APP.encode()) as r:
            if r.status != 200:
                raise TimeoutError(f"the demo app was refused: {await r.text()}")
        view = await _wait_app_ready(session, last.url, timeout_s=60)
        for instance in view["instances"]:
            say(
                f"      {instance['instance_id']:22} on {instance['host']:4} "
                f"{instance['state']:8} ready={instance['ready']}"
            )
        say("[5/5] status of every host:")
        say(f"      {'host':6} {'api':17} {'leader':7} {'term':>5} {'commit':>7} ready")
        for host in site.members:
            async with session.get(f"{host.url}/v1/status") as r:
                s = await r.json()
            say(
                f"      {s['host_id']:6} {host.api:17} {s['leader']!s:7} {s['term']:>5} "
                f"{s['commit_index']:>7} {s['ready']}"
            )
        say("")
        say("Try it:  curl -X PUT --data-binary hi " + first.url + "/v1/kv/greeting")
        say("         curl " + last.url + "/v1/kv/greeting")
        say("         curl " + first.url + "/v1/status")
        say(f"         meshorch app show hello --agent {first.api}")
        if exit_after_s is None:
            say("The site stays up until Ctrl-C.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if exit_after_s is not None:
            loop.call_later(exit_after_s, stop.set)
        await stop.wait()


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
        command: ["sh", "-c", "while true; do date > now; sleep 1; done"]
        resources: {memory_limit: 32Mi, cpu_request: 0.05}
        probes:
          readiness: {exec: {command: ["test", "-s", "now"]}, period_s: 0.5, timeout_s: 0.4}
  - name: worker
    containers:
      - name: main
        image: process
        command: ["sleep", "1000000"]
        resources: {memory_limit: 16Mi, cpu_request: 0.05}
"""


async def _wait_app_ready(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with session.get(f"{url}/v1/apps/hello?consistency=local") as r:
            view = dict(await r.json()) if r.status == 200 else {}
        instances = view.get("instances", [])
        if len(instances) == 3 and all(i["ready"] for i in instances):
            return view
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the demo app was not ready within {timeout_s:g}s")


def run_demo(hosts: int = 3, exit_after_s: float | None = None) -> int:
    if hosts < 1:
        print("meshorch demo: --hosts must be at least 1", file=sys.stderr)
        return 2
    site = LocalSite(hosts=hosts, site="demo")
    try:
        site.start()
        asyncio.run(_show(site, exit_after_s))
    except TimeoutError as exc:
        print(f"meshorch demo: {exc}\n{site.logs()}", file=sys.stderr)
        return 1
    finally:
        say("stopping the agents and removing their data")
        site.cleanup()
    return 0
