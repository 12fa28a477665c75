"""A registry image to every host of a site: time, bytes from outside, three anchors (root: lab).

For each host count N (``--hosts 3,8``) a site of N hosts behind its NAT router runs
agents in mesh mode, and a registry (Debian's docker-registry, anonymous) serves on the
lab's WAN, where sites reach it through their router as they would one on the internet.
Each run pushes a fresh image with podman (a busybox base and ``--layers`` layers of
random bytes, ``--size-mb`` in all: random, so compression cannot shrink them) and
applies an app that names it: the site's leader pulls it once and the other hosts copy
it from their peers over the WireGuard overlay. Measured in each run:

- ``spread_s``: from the apply to the site's catalogue listing every host as a holder
  (a host is listed once each blob it copied matched its sha256); afterwards every
  host's blobs are hashed again here;
- ``outside_bytes_ratio``: bytes the site's router received on its WAN side during the
  spread, over the image's size (1.0: the uplink carried one copy);
- anchor, one transfer: as many bytes sent once from the leader to another host over
  their WireGuard addresses (python's http.server to curl), the limit of one path:
  ``ratio_vs_one_transfer`` = spread_s / one_transfer_s;
- anchor, N-1 plain transfers at once: the same bytes from each host to the next (the
  leader first, then the others by id: each host sends one copy and receives one), the
  floor of any spread where the overlay is CPU bound: ``ratio_vs_parallel_transfers``;
- anchor, each pulls: every host pulling the image from the registry itself, all at
  once, with meshorch's registry client and no peers: ``ratio_vs_each_pulls`` =
  spread_s / each_pulls_s, and its outside bytes (``each_outside_ratio``, about N).

The lab's hosts share this machine's cores, and every byte a host copies from another
crosses two userspace WireGuard processes (``wireguard-go``) on them: one transfer
alone keeps the cores busy (``one_transfer_cpu``), so the N-1 copies of a spread take
at least N-1 times as long here. ``ratio_vs_serial_transfers`` (spread_s over N-1 one
transfers) says how close the spread comes to that; ``overlay_copies`` (bytes the hosts
received over WireGuard, over the size) that nothing is copied twice. With
``--host-mbit R`` each host sends at most R Mbit/s (tc on its link), as on a site whose
hosts each have a link of their own: below the machine's limit (about 250 Mbit/s in
all on 2 cores), the links are what bounds the spread, and ratio_vs_one_transfer shows
whether the site copies the image in one pass.

    python bench/image_spread.py [--size-mb 200] [--layers 4] [--hosts 3,8] [--runs 3]
    python bench/image_spread.py --size-mb 50 --host-mbit 25

Per host count a line ``N=... spread_s=... ...`` (medians of the runs); last line
``RESULT spread_s=... outside_bytes_ratio=... ratio_vs_one_transfer=...
ratio_vs_each_pulls=... ratio_vs_parallel_transfers=...`` for the largest N, then per N
the same keys and ``ratio_vs_serial_transfers``, ``one_transfer_s``,
``parallel_transfers_s`` (``spread_s_3=``...).
Targets: outside_bytes_ratio <= 1.05, ratio_vs_one_transfer <= 1.5.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.cli.agent_client import request_agent
from meshorch.lab.agents import LabAgents, wg_interface_name
from meshorch.lab.lab import Lab
from meshorch.lab.plan import HOST_IFNAME, ROUTER_WAN_IFNAME
from meshorch.lab.prerequisites import MESH_TOOLS, prerequisites_message
from meshorch.lab.pusher import Pusher
from meshorch.lab.registry import LabRegistry
from meshorch.runtime.images import build_busybox_rootfs
from meshorch.site.access import TOKEN_ENV, harness_token

ROOT = Path(__file__).resolve().parent.parent
TOOLS = (*MESH_TOOLS, "podman", "runc", "docker-registry", "htpasswd", "curl")
MIB = 1 << 20
ANCHOR_PORT = 7788
APP = """
api_version: meshorch/v1
name: {name}
version: "1"
services:
  - name: main
    replicas: 1
    containers:
      - name: main
        image: {image}
        command: ["sleep", "100000"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
"""
# Runs in a host's namespace: import first, pull when told (a line on stdin), so eight
# interpreters starting on two cores do not count as pull time. Prints the wall clock
# at the end and the bytes fetched.
PULL_SCRIPT = """
import asyncio, platform, sys, time
from pathlib import Path
import aiohttp
from meshorch.images.oci import platform_of_machine
from meshorch.images.pull import pull
from meshorch.images.reference import parse_reference
from meshorch.images.registry import RegistryClient
from meshorch.images.store import BlobStore

ref, store = parse_reference(sys.argv[1]), BlobStore(Path(sys.argv[2]))

async def main() -> None:
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, ref.api_host, None, plain_http=True)
        pulled = await pull(client, ref, store, platform_of_machine(platform.machine()))
    print(time.time(), pulled.fetched_bytes, flush=True)

print("ready", flush=True)
sys.stdin.readline()
asyncio.run(main())
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CpuMeter:
    """Cores of the whole machine busy since it was made (from /proc/stat)."""

    def __init__(self) -> None:
        self.start = self._ticks()

    @staticmethod
    def _ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # all but idle and iowait

    def busy(self) -> float:
        busy, total = self._ticks()
        return (os.cpu_count() or 1) * (busy - self.start[0]) / max(1, total - self.start[1])


@dataclass
class Spread:
    seconds: float
    size: int
    outside: int  # bytes in through the router's WAN side
    overlay: int  # bytes the hosts received over WireGuard
    cpu: float
    pulled_s: float  # when the catalogue listed the image: the pull was done
    first_peer_s: float  # when the first other host held it


@dataclass
class Run:
    spread: Spread
    one_transfer_s: float
    one_transfer_cpu: float
    parallel_transfers_s: float
    each_pulls_s: float
    each_outside: int


class Site:
    """A lab site of ``hosts`` hosts with agents and a registry on its WAN."""

    def __init__(self, work: Path, hosts: int, host_mbit: float) -> None:
        self.work = work
        self.host_mbit = host_mbit
        self.lab = Lab(f"i{secrets.token_hex(2)}", work / "lab")
        self.hosts = hosts
        self.registry: LabRegistry | None = None
        self.pusher: Pusher | None = None
        self.agents = LabAgents(self.lab, runtime="process")

    def up(self) -> None:
        log(f"building a site of {self.hosts} hosts, agents in mesh mode, a registry")
        plan = self.lab.up(1, self.hosts)
        if self.host_mbit:
            for host in self.names:  # all a host sends, WireGuard's datagrams included
                self.lab.run(host, ["tc", "qdisc", "add", "dev", HOST_IFNAME, "root", "tbf",
                                    "rate", f"{self.host_mbit}mbit", "burst", "64kb",
                                    "latency", "400ms"], check=True)  # fmt: skip
        self.registry = LabRegistry.on_wan(plan, self.work / "registry", {})
        self.registry.start()
        self.agents.extra_args = ("--plain-http-registry", self.registry.host)
        self.agents.start_all()
        self.pusher = Pusher(self.work / "pusher", self.registry.netns)
        self.pusher.import_rootfs(
            build_busybox_rootfs(self.work / "rootfs.tar"), "localhost/base:1"
        )

    def down(self) -> None:
        if self.pusher is not None:
            self.pusher.reset()
        if self.registry is not None:
            self.registry.stop()
        if self.lab.exists():
            self.agents.teardown()
            self.lab.down()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.lab.plan.hosts]

    def call(self, host: str, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        content_type = "application/yaml" if body is not None else "application/json"
        return request_agent(str(self.agents.socket(host)), method, path, body, content_type)

    def wan_rx(self) -> int:
        return self.lab.interface_bytes(self.lab.plan.sites[0].router_name, ROUTER_WAN_IFNAME)[0]

    def overlay_rx(self) -> int:
        plan = self.lab.plan
        return sum(
            self.lab.interface_bytes(h.name, wg_interface_name(plan, h))[0] for h in plan.hosts
        )

    def push_image(self, tag: str, size_mb: int, layers: int) -> str:
        """A fresh image of ``layers`` random layers pushed as ``bench/spread:<tag>``."""
        assert self.pusher is not None and self.registry is not None
        context = self.work / "context"
        context.mkdir(exist_ok=True)
        files = []
        for index in range(layers):
            name = f"layer{index}.bin"
            with open(context / name, "wb") as handle:
                for _ in range(size_mb // layers):
                    handle.write(os.urandom(MIB))
            files.append(name)
        local = f"localhost/spread:{tag}"
        self.pusher.build(local, "localhost/base:1", context, files)
        ref = f"{self.registry.host}/bench/spread:{tag}"
        self.pusher.push(local, ref)
        self.pusher.run("rmi", local)
        shutil.rmtree(context)
        return ref


def spread(site: Site, ref: str, name: str, limit_s: float) -> Spread:
    """Apply an app naming ``ref``; measure until the catalogue lists every host as
    holding it."""
    first = site.names[0]
    outside, overlay, cpu = site.wan_rx(), site.overlay_rx(), CpuMeter()
    started = time.monotonic()
    site.call(first, "POST", "/v1/apps", APP.format(name=name, image=ref).encode())
    image: dict[str, Any] | None = None
    held: dict[str, float] = {}
    while time.monotonic() - started < limit_s:
        listed = site.call(first, "GET", "/v1/images?consistency=local")
        image = next((i for i in listed["images"] if i["ref"] == ref), None)
        now = time.monotonic() - started
        for host in [] if image is None else image["holders"]:
            held.setdefault(host, now)
        if len(held) == len(site.names):
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"{ref} did not reach every host in {limit_s:g}s: {image}")
    seconds = time.monotonic() - started
    assert image is not None
    measured = Spread(
        seconds, int(image["size"]), site.wan_rx() - outside, site.overlay_rx() - overlay,
        cpu.busy(), held[image["added_by"]],
        min(t for h, t in held.items() if h != image["added_by"]),
    )  # fmt: skip
    check_blobs(site, image["blobs"])
    return measured


def check_blobs(site: Site, blobs: list[list[object]]) -> None:
    """Every host's copy of every blob hashes to its digest (not timed)."""
    for host in site.names:
        store = site.lab.store.data_dir(host) / "images" / "blobs" / "sha256"
        for digest, _ in blobs:
            hexdigest = str(digest).removeprefix("sha256:")
            with open(store / hexdigest, "rb") as handle:
                actual = hashlib.file_digest(handle, "sha256").hexdigest()
            if actual != hexdigest:
                raise SystemExit(f"{host}: blob {digest} hashes to {actual}")


def netns_exec(site: Site, host: str) -> list[str]:
    return ["ip", "netns", "exec", site.lab.plan.host(host).netns]


def overlay_ips(site: Site) -> dict[str, str]:
    status = site.call(site.names[0], "GET", "/v1/status")
    return {m["host_id"]: m["overlay_ip"] for m in status["members"] if m.get("host_id")}


def plain_transfers(site: Site, size: int, pairs: list[tuple[str, str]]) -> float:
    """Seconds to send ``size`` random bytes from each source to its target over the
    overlay, all pairs at once, with plain tools: python's http.server at the source,
    curl at the target, into the target's data dir."""
    ips = overlay_ips(site)
    servers: list[subprocess.Popen[bytes]] = []
    transfers: list[subprocess.Popen[bytes]] = []
    received = [site.lab.store.data_dir(target) / "anchor.blob" for _, target in pairs]
    try:
        for source, _ in pairs:
            served = site.lab.store.data_dir(source) / "anchor"
            served.mkdir(exist_ok=True)
            with open(served / "blob", "wb") as handle:
                for offset in range(0, size, MIB):
                    handle.write(os.urandom(min(MIB, size - offset)))
            servers.append(subprocess.Popen(
                [*netns_exec(site, source), sys.executable, "-m", "http.server",
                 str(ANCHOR_PORT), "--bind", ips[source], "--directory", str(served)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
        urls = [f"http://{ips[source]}:{ANCHOR_PORT}/blob" for source, _ in pairs]
        for (_, target), url in zip(pairs, urls, strict=True):
            head = ["curl", "-sSfI", "--retry", "50", "--retry-delay", "0",
                    "--retry-connrefused", url]  # fmt: skip
            site.lab.run(target, head, check=True)
        started = time.monotonic()
        transfers = [
            subprocess.Popen([*netns_exec(site, target), "curl", "-sSf", "-o", str(path), url])
            for (_, target), path, url in zip(pairs, received, urls, strict=True)
        ]
        if any(t.wait(900) != 0 for t in transfers):
            raise SystemExit("a plain transfer failed")
        elapsed = time.monotonic() - started
    finally:
        for process in transfers:
            if process.poll() is None:
                process.kill()
                process.wait()
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)
    for path in received:
        if path.stat().st_size != size:
            raise SystemExit(f"a plain transfer moved {path.stat().st_size} of {size} bytes")
        path.unlink()
    for source, _ in pairs:
        shutil.rmtree(site.lab.store.data_dir(source) / "anchor")
    return elapsed


def each_pulls(site: Site, ref: str) -> tuple[float, int]:
    """Every host pulls ``ref`` from the registry at once into a store of its own; (seconds
    until the last has it, bytes in from the WAN)."""
    stores = [site.lab.store.data_dir(h) / "anchor-pull" for h in site.names]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pullers = [
        subprocess.Popen(
            [*netns_exec(site, host), sys.executable, "-c", PULL_SCRIPT, ref, str(store)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for host, store in zip(site.names, stores, strict=True)
    ]
    try:
        for puller in pullers:
            assert puller.stdout is not None
            if puller.stdout.readline().strip() != "ready":
                raise SystemExit("a pulling host did not start")
        before = site.wan_rx()
        started = time.time()
        for puller in pullers:
            assert puller.stdin is not None
            puller.stdin.write("go\n")
            puller.stdin.close()
        ends = []
        for puller in pullers:
            assert puller.stdout is not None
            line = puller.stdout.readline().split()
            if puller.wait(600) != 0 or not line:
                raise SystemExit("a host's own pull failed")
            ends.append(float(line[0]))
        outside = site.wan_rx() - before
    finally:
        for puller in pullers:
            if puller.poll() is None:
                puller.kill()
                puller.wait()
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)
    return max(ends) - started, outside


def measure(site: Site, args: argparse.Namespace) -> list[Run]:
    runs = []
    for index in range(args.runs):
        log(f"N={site.hosts} run {index + 1}/{args.runs}: pushing a fresh {args.size_mb} MB image")
        ref = site.push_image(f"{site.hosts}-{index}", args.size_mb, args.layers)
        done = spread(site, ref, f"spread{index}", args.limit)
        size = done.size
        log(f"  spread {size / 1e6:.1f} MB to {site.hosts} hosts in {done.seconds:.2f}s (pulled "
            f"at {done.pulled_s:.1f}s, first peer done at {done.first_peer_s:.1f}s); "
            f"{done.outside / size:.3f} copies in from outside, {done.overlay / size:.2f} over "
            f"the overlay; {done.cpu:.2f} cores busy")  # fmt: skip
        leader = site.call(site.names[0], "GET", "/v1/status")["leader"]
        target = next(h for h in site.names if h != leader)
        cpu = CpuMeter()
        one_s = plain_transfers(site, size, [(leader, target)])
        one_cpu = cpu.busy()
        log(f"  one transfer {leader} -> {target} over the overlay: {one_s:.2f}s, "
            f"{one_cpu:.2f} cores busy")  # fmt: skip
        # N-1 at once, each host sending at most one and receiving at most one.
        order = [leader, *sorted(h for h in site.names if h != leader)]
        parallel_s = plain_transfers(site, size, list(itertools.pairwise(order)))
        log(f"  {site.hosts - 1} plain transfers at once along {'->'.join(order)}: "
            f"{parallel_s:.2f}s")  # fmt: skip
        each_s, each_outside = each_pulls(site, ref)
        log(f"  every host pulling by itself: {each_s:.2f}s, {each_outside / size:.2f} copies")
        site.call(site.names[0], "DELETE", f"/v1/apps/spread{index}")
        runs.append(Run(done, one_s, one_cpu, parallel_s, each_s, each_outside))
    return runs


def summary(hosts: int, runs: list[Run]) -> dict[str, float]:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "spread_s": median([r.spread.seconds for r in runs]),
        "outside_bytes_ratio": median([r.spread.outside / r.spread.size for r in runs]),
        "ratio_vs_one_transfer": median([r.spread.seconds / r.one_transfer_s for r in runs]),
        "ratio_vs_each_pulls": median([r.spread.seconds / r.each_pulls_s for r in runs]),
        # Against N-1 plain transfers one after the other: the floor when every copy
        # crosses the overlay on the same cores (one transfer keeps them busy).
        "ratio_vs_serial_transfers": median(
            [r.spread.seconds / ((hosts - 1) * r.one_transfer_s) for r in runs]
        ),
        # Against N-1 plain transfers at once, host to host (each sends and receives at
        # most one): the floor of any spread on the lab, whose overlay is CPU bound.
        "ratio_vs_parallel_transfers": median(
            [r.spread.seconds / r.parallel_transfers_s for r in runs]
        ),
        "one_transfer_s": median([r.one_transfer_s for r in runs]),
        "parallel_transfers_s": median([r.parallel_transfers_s for r in runs]),
        "each_pulls_s": median([r.each_pulls_s for r in runs]),
        "each_outside_ratio": median([r.each_outside / r.spread.size for r in runs]),
        "pulled_s": median([r.spread.pulled_s for r in runs]),
        "overlay_copies": median([r.spread.overlay / r.spread.size for r in runs]),
        "spread_cpu": median([r.spread.cpu for r in runs]),
        "one_transfer_cpu": median([r.one_transfer_cpu for r in runs]),
    }


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM runs the clean-up too, as Ctrl-C does."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    parser.add_argument("--size-mb", type=int, default=200, help="image size in MiB (200)")
    parser.add_argument("--layers", type=int, default=4, help="random layers (4)")
    parser.add_argument("--hosts", default="3,8", help="host counts, one site each (3,8)")
    parser.add_argument("--runs", type=int, default=3, help="runs per host count (3)")
    parser.add_argument(
        "--host-mbit", type=float, default=0.0,
        help="limit what each host sends to this many Mbit/s (tc tbf on its link), as on a "
        "site whose hosts each have a link and CPU of their own (default: no limit)",
    )  # fmt: skip
    parser.add_argument("--limit", type=float, default=900.0, help="give up a spread after (s)")
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    if min(counts) < 2 or args.runs < 1 or args.layers < 1 or args.size_mb < args.layers:
        parser.error("hosts >= 2, runs >= 1, layers >= 1, size-mb >= layers")
    tools = (*TOOLS, "tc") if args.host_mbit else TOOLS
    problem = prerequisites_message("bench/image_spread.py", os.geteuid(), shutil.which, tools)
    if problem:
        log(problem)
        return 2
    # The agents' admin token (LabAgents gives it to them); the agents and pullers started
    # in the hosts' namespaces run this checkout's meshorch.
    os.environ[TOKEN_ENV] = harness_token()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    results: dict[int, dict[str, float]] = {}
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="meshorch-spread-") as tmp:
        for hosts in counts:
            site = Site(Path(tmp) / f"n{hosts}", hosts, args.host_mbit)
            try:
                site.up()
                results[hosts] = summary(hosts, measure(site, args))
            finally:
                log(f"tearing the site of {hosts} hosts down")
                site.down()
            line = " ".join(f"{k}={v:.3f}" for k, v in results[hosts].items())
            print(f"N={hosts} {line}", flush=True)
    keys = (
        "spread_s", "outside_bytes_ratio", "ratio_vs_one_transfer", "ratio_vs_each_pulls",
        "ratio_vs_parallel_transfers",
    )  # fmt: skip
    more = ("ratio_vs_serial_transfers", "one_transfer_s", "parallel_transfers_s")
    largest = results[max(counts)]
    fields = [f"{k}={largest[k]:.3f}" for k in keys]
    fields += [f"{k}_{n}={results[n][k]:.3f}" for n in counts for k in (*keys, *more)]
    print("RESULT " + " ".join(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
