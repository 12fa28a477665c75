"""``meshorch demo --lab``: the showcase on real network namespaces, WireGuard and podman.

The lab (``meshorch.lab``) gives each site a LAN behind a NAT router and puts the hub on a
WAN of its own. Each site's hosts find each other by mDNS, build their WireGuard mesh and
Raft cluster; the busybox image is added at one host of each site and replicated by the
site; the hub deploys an application of busybox containers (podman, runc) to the three
sites. The hub lives in its namespace: this process forwards a local port to it, so the
dashboard and the CLI work from the machine. Needs root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from meshorch.demo.loopback import (
    SITES,
    deploy_and_show,
    register_sites,
    say,
    show_try_it,
    wait_for_stop,
)
from meshorch.lab.agents import HUB_PORT, FleetFlags, LabAgents, wg_interface_name
from meshorch.lab.errors import LabError
from meshorch.lab.forward import NetnsForward
from meshorch.lab.lab import Lab
from meshorch.lab.prerequisites import missing_prerequisites
from meshorch.runtime import BUSYBOX_IMAGE_REF, RuntimeUnavailable, build_busybox_rootfs

FLEET = "demo"
DEFAULT_DASHBOARD = "127.0.0.1:7980"

LAB_APP = f"""
api_version: meshorch/v1
name: hello
version: "1"
services:
  - name: web
    replicas: 2
    anti_affinity: true
    containers:
      - name: httpd
        image: {BUSYBOX_IMAGE_REF}
        command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
        files: [{{path: /www/index.html, content: "hello from the edge"}}]
        ports: [{{container_port: 8080}}]
        resources: {{memory_limit: 32Mi, cpu_limit: 0.5, cpu_request: 0.1}}
        probes:
          readiness: {{http: {{port: 8080, path: /}}, period_s: 1, timeout_s: 0.5}}
  - name: worker
    containers:
      - name: main
        image: {BUSYBOX_IMAGE_REF}
        command: ["sh", "-c", "while true; do echo \\"tick $(date)\\"; sleep 5; done"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
"""


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--dashboard {text!r}: expected HOST:PORT, e.g. {DEFAULT_DASHBOARD}")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True, slots=True)
class ForwardedHub:
    """The lab's hub as reached through the local forward."""

    url: str
    admin_token: str


async def _show(
    lab: Lab, agents: LabAgents, hosts: int, dashboard: tuple[str, int], exit_after_s: float | None
) -> None:
    started = time.monotonic()
    say(f"[1/8] building the lab {lab.prefix}: {len(SITES)} sites of {hosts} hosts, each "
        "site a LAN behind a NAT router, the hub on a WAN (network namespaces)")  # fmt: skip
    say(f"      state and logs under {lab.store.lab_dir}")
    plan = await asyncio.to_thread(lab.up, len(SITES), hosts)
    say(f"      built in {time.monotonic() - started:.1f}s")

    say(f"[2/8] starting the hub in {plan.hub_netns} on {plan.hub_ip}:{HUB_PORT}")
    lab_hub = await asyncio.to_thread(agents.start_hub, FLEET)
    say(f"      fleet root key {lab_hub.root_key}")
    async with NetnsForward(dashboard[0], dashboard[1], plan.hub_netns, plan.hub_ip, HUB_PORT) as (
        forward
    ), aiohttp.ClientSession() as session:  # fmt: skip
        say(f"      reachable from this machine at {forward.url} (forwarded into the namespace)")
        hub = ForwardedHub(forward.url, lab_hub.admin_token_file.read_text().strip())

        say(f"[3/8] registering {len(SITES)} sites at the hub")
        tokens = await register_sites(session, hub)
        agents.fleet = FleetFlags(lab_hub.url, FLEET, lab_hub.root_key, tokens)

        say("[4/8] starting the agents: the first host of each site bootstraps it, the others "
            "find it by mDNS and join over WireGuard (podman runtime)")  # fmt: skip
        began = time.monotonic()
        await asyncio.to_thread(agents.start_all)
        say(f"      {len(plan.hosts)} agents up in {time.monotonic() - began:.1f}s")
        for site in plan.sites:
            first = next(h for h in plan.hosts if h.site == site.index)
            status = await asyncio.to_thread(agents.status, first.name)
            peers = await asyncio.to_thread(_wireguard_peers, lab, first.name,
                                            wg_interface_name(plan, first))  # fmt: skip
            leader = status["leader"] if status else "?"
            say(f"      {agents.site_ids[site.index]:8} Raft leader {leader}; "
                f"{first.name} has {peers} WireGuard peer(s) with a handshake")  # fmt: skip

        say(f"[5/8] adding the busybox image ({BUSYBOX_IMAGE_REF}) at one host per site; "
            "each site's Raft cluster replicates it to its other hosts")  # fmt: skip
        rootfs = await asyncio.to_thread(
            build_busybox_rootfs, lab.store.lab_dir / "busybox-rootfs.tar"
        )
        for site in plan.sites:
            first = next(h for h in plan.hosts if h.site == site.index)
            await asyncio.to_thread(agents.add_image, first.name, rootfs, BUSYBOX_IMAGE_REF)
            say(f"      {agents.site_ids[site.index]:8} added through {first.name}")

        await deploy_and_show(session, hub, LAB_APP, ("[6/8]", "[7/8]", "[8/8]"))
        show_try_it(forward.url, lab_hub.admin_token_file)
        say(f"Inside:    ip netns list | grep {lab.prefix};  "
            f"ip netns exec {plan.hosts[0].netns} wg show")  # fmt: skip
        await wait_for_stop(exit_after_s)


def _wireguard_peers(lab: Lab, host: str, interface: str) -> int:
    """Peers of ``interface`` on ``host`` that completed a handshake."""
    result = lab.run(host, ["wg", "show", interface, "latest-handshakes"], timeout_s=10)
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.split()[-1:] != ["0"])


def run_lab_demo(
    hosts: int = 2, exit_after_s: float | None = None, dashboard: str = DEFAULT_DASHBOARD
) -> int:
    if hosts < 1:
        print("meshorch demo --lab: --hosts must be at least 1", file=sys.stderr)
        return 2
    problems = missing_prerequisites(os.geteuid(), shutil.which)
    if problems:
        print("meshorch demo --lab: " + "; ".join(problems) + ". As root, `scripts/setup.sh "
              "--lab` installs the packages; `meshorch demo` runs without any.",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        listen = parse_listen(dashboard)
    except ValueError as exc:
        print(f"meshorch demo --lab: {exc}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="meshorch-demo-lab-"))
    lab = Lab(f"dm{os.urandom(2).hex()}", root / "lab", progress=lambda m: say(f"      {m}"))
    agents = LabAgents(lab, runtime="podman",
                       site_ids={i: site for i, site in enumerate(SITES, start=1)})  # fmt: skip
    code = 0
    try:
        asyncio.run(_show(lab, agents, hosts, listen, exit_after_s))
    except (TimeoutError, RuntimeError, LabError, RuntimeUnavailable, OSError) as exc:
        print(f"meshorch demo --lab: {exc}\nlogs: {lab.store.lab_dir}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        say("tearing the lab down: agents, containers, namespaces, interfaces")
        if lab.exists():
            try:
                LabAgents(lab).teardown()
            except LabError as exc:
                print(f"meshorch demo --lab: stopping the agents: {exc}", file=sys.stderr)
            lab.down(keep_logs=code == 1)
        if code != 1:
            shutil.rmtree(root, ignore_errors=True)
    return code
