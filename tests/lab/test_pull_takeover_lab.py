"""A registry pull that survives the host doing it (lab: root, wireguard-go, podman, tc,
docker-registry): a site behind NAT pulls an image with a 48 MiB layer for an app, its
uplink throttled; the puller (the Raft leader) is killed with SIGKILL in the middle of the
layer; the next leader takes the pull over from the bytes the other hosts had copied from
the puller, and asks the registry for the rest only. The bytes that cross the site's
router from outside are counted on its WAN interface: one copy of the image and the
part the dead host had that no survivor had copied yet, not two copies."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.lab.agents import LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.plan import ROUTER_LAN_IFNAME, ROUTER_WAN_IFNAME
from meshorch.lab.registry import LabRegistry
from tests.images.registry_fixtures import PushedImages, registry_with_images, run
from tests.lab.podman_app import apply_app
from tests.labutil import require_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

LAYER_BYTES = 48 << 20
RATE = "40mbit"  # about 10 s for the layer: time to kill the puller in the middle
APP = """
api_version: meshorch/v1
name: big
version: "1"
services:
  - name: main
    replicas: 1
    containers:
      - name: main
        image: {image}
        command: ["sleep", "1000"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
"""


@pytest.fixture(scope="module")
def lab_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabAgents, PushedImages]]:
    require_lab("wg", "wireguard-go", "iptables", "tc", "podman", "runc", "docker-registry")
    work = tmp_path_factory.mktemp("takeover-lab")
    lab = Lab(f"t{secrets.token_hex(2)}", work / "lab")
    agents = LabAgents(lab, runtime="process")
    try:
        lab.up(1, 3)
        registry = LabRegistry.on_wan(lab.plan, work / "registry", {})  # anonymous: public
        agents.extra_args = ("--plain-http-registry", registry.host)
        agents.start_all()
        with registry_with_images(work, registry) as pushed:
            context = work / "ctx-big"
            context.mkdir()
            (context / "big.bin").write_bytes(os.urandom(LAYER_BYTES))  # gzip keeps it whole
            (context / "Containerfile").write_text("FROM localhost/base:1\nCOPY big.bin /\n")
            run([*pushed.podman, "build", "-q", "--pull=never", "-t", "localhost/big:1",
                 str(context)])  # fmt: skip
            pushed.push("big:1", "lab/big:1")
            yield agents, pushed
    finally:
        if lab.exists():
            agents.teardown()
            lab.down()


def wan_rx_bytes(lab: Lab) -> int:
    """Bytes the site's router received from the WAN (its NAT side)."""
    return lab.interface_bytes(lab.plan.sites[0].router_name, ROUTER_WAN_IFNAME)[0]


def largest_partial(data_dir: Path) -> tuple[str, int]:
    partial = data_dir / "images" / "partial"
    sizes = []
    for path in partial.iterdir() if partial.exists() else []:
        try:
            sizes.append((path.name, path.stat().st_size))
        except FileNotFoundError:  # a download finished (or restarted) between the two calls
            continue
    return max(sizes, key=lambda item: item[1], default=("", 0))


def test_a_puller_killed_mid_layer_is_taken_over_and_the_uplink_carries_one_copy(
    lab_site: tuple[LabAgents, PushedImages], tmp_path: Path
) -> None:
    agents, images = lab_site
    lab = agents.lab
    hosts = [h.name for h in lab.plan.hosts]
    for host in hosts:
        agents.wait_ready(host)
    router = lab.plan.sites[0].router_netns
    # Downloads into the site slowed at the router's LAN side (netem is not available).
    run(["ip", "netns", "exec", router, "tc", "qdisc", "add", "dev", ROUTER_LAN_IFNAME,
         "root", "tbf", "rate", RATE, "burst", "64kb", "latency", "500ms"])  # fmt: skip
    ref = f"{images.host}/lab/big:1"
    before = wan_rx_bytes(lab)
    apply_app(agents, tmp_path, APP.format(image=ref))

    leader = agents.status(hosts[0])["leader"]  # the leader pulls the apps' images
    data = {h: lab.store.data_dir(h) for h in hosts}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        name, size = largest_partial(data[leader])
        if size >= LAYER_BYTES * 0.4:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{leader} did not get far into the layer: {name} {size}")
    assert lab.kill(leader)
    dead_had = (data[leader] / "images" / "partial" / name).stat().st_size
    survivors = [h for h in hosts if h != leader]
    copied = {h: largest_partial(data[h]) for h in survivors}
    assert all(n == name for n, _ in copied.values()), (name, copied)
    best_copy = max(size for _, size in copied.values())
    assert best_copy > 0, copied  # the others followed the pull while it ran

    deadline = time.monotonic() + 240
    image = None
    while time.monotonic() < deadline:
        listed = agents.request(survivors[0], "GET", "/v1/images")
        image = next((i for i in (listed or {}).get("images", []) if i["ref"] == ref), None)
        if image and set(survivors) <= set(image["holders"]):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the pull was not finished by a survivor: {image}")
    size = image["size"]
    layer = f"sha256:{name}"
    assert dict((d, n) for d, n in image["blobs"])[layer] >= LAYER_BYTES
    for host in survivors:
        blob = data[host] / "images" / "blobs" / "sha256" / name
        assert blob.stat().st_size == dict((d, n) for d, n in image["blobs"])[layer], host
    taker = image["added_by"]
    assert taker in survivors
    outside = wan_rx_bytes(lab) - before
    refetched = dead_had - best_copy
    print(
        f"image {size} B; outside {outside} B ({outside / size:.3f} of the image); "
        f"the dead puller had {dead_had} B of the layer, the survivors {best_copy} B; "
        f"re-fetched at most {refetched} B"
    )
    assert outside >= size  # the counter sees the pull
    # One copy and what only the dead host had, plus TCP/IP and HTTP overhead (under 5 %).
    assert outside <= (size + refetched) * 1.05 + (256 << 10), (outside, size, refetched)
    assert outside < size + LAYER_BYTES * 0.4  # far from a second copy of the layer
    counters = {h: agents.request(h, "GET", "/v1/images")["local"] for h in survivors}
    assert counters[taker]["pulled_bytes"] <= size - best_copy + (1 << 20), counters
