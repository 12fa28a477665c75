"""meshorch agents on the lab's hosts, in mesh mode: no address typed anywhere.

The first host of each site bootstraps it; every other host gets a join token
from a running host (``meshorch token create`` inside that host's namespace)
and joins by mDNS discovery. Each host keeps its data under the lab's state
dir, so ``lab restart`` resumes it.

``start_hub`` runs the central hub in the hub's namespace, on its WAN address; agents
given ``FleetFlags`` link their site to it through the site's NAT router. The hub gossips
(UDP, same address) only when asked (``gossip=True``): without gossip a cut-off site hears
of nothing but through its own link, which is what the link's own tests need.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from meshorch.lab.errors import LabError
from meshorch.lab.lab import Lab
from meshorch.lab.plan import HostPlan, LabPlan
from meshorch.site.access import harness_token
from meshorch.site.config import SOCKET_FILE

log = logging.getLogger(__name__)

API_PORT = 7700
HUB_PORT = 7900
HUB_NODE = "hub"
AGENTS_MARKER = "agents"
READY_TIMEOUT_S = 60.0

# Runs inside a node's namespace: the site LANs are not reachable from outside.
# Arguments: METHOD URL [BODY [TOKEN_FILE]] (an empty BODY sends none).
_HTTP_SCRIPT = """
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 and sys.argv[3] else None
headers = {"Content-Type": "application/json"}
if len(sys.argv) > 4:
    with open(sys.argv[4]) as f:
        headers["Authorization"] = "Bearer " + f.read().strip()
req = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode()); sys.exit(2)
except OSError as e:
    sys.stderr.write(str(e)); sys.exit(3)
"""


@dataclass(frozen=True, slots=True)
class FleetFlags:
    """How the agents link their site to a hub: ``--hub --fleet --fleet-key`` and, per
    site (``s1``), its ``--enroll-token``."""

    hub: str
    fleet: str
    root_key: str
    enroll_tokens: Mapping[str, str] = field(default_factory=dict)

    def argv(self, site: str) -> list[str]:
        argv = ["--hub", self.hub, "--fleet", self.fleet, "--fleet-key", self.root_key]
        token = self.enroll_tokens.get(site)
        if token is not None:
            argv += ["--enroll-token", token]
        return argv


@dataclass(frozen=True, slots=True)
class LabHub:
    """The hub started by ``LabAgents.start_hub``."""

    url: str
    fleet: str
    root_key: str
    admin_token_file: Path


def wg_interface_name(plan: LabPlan, host: HostPlan) -> str:
    # wireguard-go's control socket path is shared by all namespaces: names must differ.
    return f"w{plan.prefix}s{host.site}h{host.index}"


class LabAgents:
    """Start, join and query the agents of a lab built by ``Lab``.

    ``runtime`` (``process``, ``podman``) is passed as the agents' ``--runtime``, and
    ``fleet`` as their fleet link flags; both default to the agent's own defaults.
    ``site_ids`` names the sites (by their index in the plan) for the agents' ``--site``;
    the default is the plan's ``s1``, ``s2``...
    """

    def __init__(
        self,
        lab: Lab,
        *,
        runtime: str | None = None,
        fleet: FleetFlags | None = None,
        extra_args: Sequence[str] = (),
        site_ids: Mapping[int, str] | None = None,
    ) -> None:
        self.lab = lab
        self.site_ids = dict(site_ids or {})
        self.runtime = runtime
        self.fleet = fleet
        self.extra_args = tuple(extra_args)  # more agent flags, the same for every host

    @property
    def token_file(self) -> Path:
        """The admin token every lab agent accepts (``--operator-token-file``), made once."""
        path = self.lab.store.lab_dir / "operator.token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(harness_token() + "\n")
            path.chmod(0o600)
        return path

    def socket(self, name: str) -> Path:
        """The agent's operator socket: the lab's commands on the machine use it."""
        return self.lab.store.data_dir(name) / SOCKET_FILE

    @property
    def enabled(self) -> bool:
        return (self.lab.store.lab_dir / AGENTS_MARKER).exists()

    def _host(self, name: str) -> HostPlan:
        plan = self.lab.plan
        host = next((h for h in plan.hosts if h.name == name), None)
        if host is None:
            raise LabError(f"no host {name!r} in lab {self.lab.prefix}")
        return host

    def site_id(self, host: HostPlan) -> str:
        return self.site_ids.get(host.site, f"s{host.site}")

    def agent_argv(self, host: HostPlan, *, bootstrap: bool, token: str | None) -> list[str]:
        plan = self.lab.plan
        argv = [
            sys.executable, "-m", "meshorch", "agent",
            "--site", self.site_id(host), "--host-id", host.name,
            "--data-dir", str(self.lab.store.data_dir(host.name)),
            "--api", f"{host.lan_ip}:{API_PORT}", "--lan-ip", host.lan_ip,
            "--wg-interface", wg_interface_name(plan, host),
            "--operator-token-file", str(self.token_file),
        ]  # fmt: skip
        if bootstrap:
            argv.append("--bootstrap")
        if token is not None:
            argv += ["--join-token", token]
        if self.runtime is not None:
            argv += ["--runtime", self.runtime]
        if self.fleet is not None:
            argv += self.fleet.argv(self.site_id(host))
        return argv + list(self.extra_args)

    def start_all(self) -> None:
        """Bootstrap every site with its first host, then join the others."""
        self.lab.store.lab_dir.mkdir(parents=True, exist_ok=True)
        (self.lab.store.lab_dir / AGENTS_MARKER).write_text("mesh\n")
        plan = self.lab.plan
        for site in plan.sites:
            hosts = [h for h in plan.hosts if h.site == site.index]
            first, rest = hosts[0], hosts[1:]
            self.lab.start(first.name, self.agent_argv(first, bootstrap=True, token=None))
            self.wait_ready(first.name)
            token = self.create_token(first.name, single_use=False, ttl="1h") if rest else None
            for host in rest:
                self.lab.start(host.name, self.agent_argv(host, bootstrap=False, token=token))
            for host in rest:
                self.wait_ready(host.name)

    def join(self, name: str, token: str | None = None) -> None:
        """Start the agent of a new host with a fresh single-use token from its site."""
        host = self._host(name)
        if token is None:
            sponsor = self.running_peer(host)
            token = self.create_token(sponsor.name, single_use=True, ttl="10m")
        self.lab.start(name, self.agent_argv(host, bootstrap=False, token=token))

    def running_peer(self, host: HostPlan) -> HostPlan:
        for other in self.lab.plan.hosts:
            if other.site == host.site and other.name != host.name and self.status(other.name):
                return other
        raise LabError(f"no running agent in site s{host.site} to sponsor {host.name}")

    def request(self, name: str, method: str, path: str, body: bytes | None = None) -> Any:
        """Call ``name``'s agent API from inside its namespace: the decoded JSON answer
        (also of an error status), or None when the agent does not answer."""
        host = self._host(name)
        url = f"http://{host.lan_ip}:{API_PORT}{path}"
        return self._http(name, method, url, body, self.token_file)

    def _http(
        self, node: str, method: str, url: str, body: bytes | None, token_file: Path | None = None
    ) -> Any:
        argv = [sys.executable, "-c", _HTTP_SCRIPT, method, url]
        if body is not None or token_file is not None:
            argv.append("" if body is None else body.decode())
        if token_file is not None:
            argv.append(str(token_file))
        result = self.lab.run(node, argv, timeout_s=30)
        if result.returncode == 3:
            return None
        try:
            return orjson.loads(result.stdout)
        except orjson.JSONDecodeError:
            return None

    # -- the hub -------------------------------------------------------------------------

    def start_hub(
        self,
        fleet: str = "lab",
        *,
        gossip: bool = False,
        extra_args: tuple[str, ...] = (),
        timeout_s: float = 30.0,
    ) -> LabHub:
        """Run ``meshorch hub`` in the hub's namespace on its WAN address and wait until
        it answers; its data and admin token live under the lab's state dir. With
        ``gossip`` the hub is a gossip member on UDP ``HUB_PORT`` of its WAN address."""
        plan = self.lab.plan
        data_dir = self.lab.store.data_dir(HUB_NODE)
        url = f"http://{plan.hub_ip}:{HUB_PORT}"
        argv = [
            sys.executable, "-m", "meshorch", "hub", "--data-dir", str(data_dir),
            "--listen", f"{plan.hub_ip}:{HUB_PORT}", "--fleet", fleet,
            "--insecure-http",  # the lab's WAN is a namespace on this machine
            *(() if gossip else ("--no-gossip",)), *extra_args,
        ]  # fmt: skip
        self.lab.start(HUB_NODE, argv)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answer = self._http(HUB_NODE, "GET", f"{url}/v1/fleet", None)
            if isinstance(answer, dict) and isinstance(answer.get("root_key"), str):
                return LabHub(url, str(answer["fleet"]), answer["root_key"],
                              data_dir / "admin.token")  # fmt: skip
            time.sleep(0.2)
        log_path = self.lab.store.log_path(HUB_NODE)
        tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
        raise LabError(
            f"the hub did not answer within {timeout_s:g}s; the end of {log_path}:\n"
            + "\n".join(tail)
        )

    def hub_request(self, hub: LabHub, method: str, path: str, body: object = None) -> Any:
        """Call the hub's API as its admin, from inside the hub's namespace."""
        raw = None if body is None else orjson.dumps(body)
        return self._http(HUB_NODE, method, hub.url + path, raw, hub.admin_token_file)

    def status(self, name: str) -> dict[str, Any] | None:
        status = self.request(name, "GET", "/v1/status")
        return status if isinstance(status, dict) and "site" in status else None

    def wait_ready(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(name)
            if status and status["ready"] and any(m["host_id"] == name for m in status["members"]):
                return status
            time.sleep(0.2)
        log_path = self.lab.store.log_path(name)
        tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
        raise LabError(
            f"agent {name} not ready within {timeout_s:g}s; the end of {log_path}:\n"
            + "\n".join(tail)
        )

    def create_token(self, name: str, *, single_use: bool, ttl: str) -> str:
        host = self._host(name)
        argv = [
            sys.executable, "-m", "meshorch", "token", "create", "--site", self.site_id(host),
            "--ttl", ttl, "--agent", str(self.socket(name)),
        ]  # fmt: skip
        if single_use:
            argv.append("--single-use")
        result = self.lab.run(name, argv, timeout_s=30)
        if result.returncode != 0:
            raise LabError(f"token create on {name} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def add_image(self, name: str, rootfs: Path, ref: str, timeout_s: float = 120.0) -> None:
        """``meshorch image add`` through ``name``'s agent: the site's Raft cluster then
        replicates the image to its other hosts."""
        self._host(name)  # a name the lab knows
        argv = [
            sys.executable, "-m", "meshorch", "image", "add", str(rootfs), "--ref", ref,
            "--agent", str(self.socket(name)),
        ]  # fmt: skip
        result = self.lab.run(name, argv, timeout_s=timeout_s)
        if result.returncode != 0:
            raise LabError(f"adding image {ref} on {name} failed: {result.stderr.strip()}")

    def teardown(self) -> None:
        """Before ``down``: stop every agent, then remove containers and podman storage
        (a running agent would recreate its podman directories)."""
        state, plan = self.lab.load()
        for node in list(state.processes):
            self.lab.kill(node)
        self.purge_runtimes()
        # A killed wireguard-go leaves its control socket behind.
        for host in plan.hosts:
            Path(f"/var/run/wireguard/{wg_interface_name(plan, host)}.sock").unlink(missing_ok=True)

    def purge_runtimes(self) -> None:
        """Remove the containers and podman storage of every host."""
        import asyncio

        from meshorch.apps.settings import podman_dirs
        from meshorch.lab.commands import nsenter_net
        from meshorch.runtime import PodmanRuntime, RuntimeBackendError

        async def purge_all() -> None:
            for host in self.lab.plan.hosts:
                data_dir = self.lab.store.data_dir(host.name)
                if not (data_dir / "podman").exists():
                    continue
                inside = Path("/run/netns", host.netns).exists()
                prefix = nsenter_net(host.netns) if inside else []
                try:
                    await PodmanRuntime(*podman_dirs(data_dir), command_prefix=prefix).purge()
                except RuntimeBackendError as exc:
                    log.warning("purging %s's containers: %s", host.name, exc)

        asyncio.run(purge_all())
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """A safety net: lazily unmount anything still mounted under the lab's directory."""
        import subprocess

        root = str(self.lab.store.lab_dir.resolve()) + "/"
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        for point in sorted((p for p in points if p.startswith(root)), reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
