"""Applications in real containers on a lab site (root, podman, runc, wireguard-go)."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.apps.settings import podman_dirs
from meshorch.lab.agents import LabAgents
from meshorch.lab.lab import Lab
from tests.lab.podman_app import add_busybox_image, app_view, apply_app, wait_all_ready
from tests.labutil import require_lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabAgents, Path, int]]:
    require_lab("wg", "wireguard-go", "iptables", "podman", "runc")
    if not Path("/bin/busybox").exists():
        pytest.fail("busybox-static is not installed (/bin/busybox)")
    work = tmp_path_factory.mktemp("apps")
    lab = Lab(f"a{secrets.token_hex(2)}", work / "lab")
    agents = LabAgents(lab)
    try:
        lab.up(1, 3)
        agents.start_all()
        size = add_busybox_image(agents, work)
        yield agents, work, size
    finally:
        for host in lab.plan.hosts if lab.exists() else []:
            log = lab.store.log_path(host.name)
            if log.exists():
                print(f"--- {host.name} ---\n" + "\n".join(log.read_text().splitlines()[-20:]))
        if lab.exists():
            agents.teardown()
            lab.down()


def test_the_image_enters_once_and_spreads_from_site_peers(
    site: tuple[LabAgents, Path, int],
) -> None:
    agents, _, size = site
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        catalog = agents.request("s1-h1", "GET", "/v1/images")
        if catalog["images"] and len(catalog["images"][0]["holders"]) == 3:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"image not on every host: {catalog}")
    counters = [
        agents.request(h, "GET", "/v1/images")["local"] for h in ("s1-h1", "s1-h2", "s1-h3")
    ]
    assert sum(c["uploaded_bytes"] for c in counters) == size  # one copy from outside
    assert sum(c["fetched_bytes"] for c in counters) == 2 * size  # the rest from peers


def test_a_two_service_app_runs_in_containers_and_survives_a_host(
    site: tuple[LabAgents, Path, int],
) -> None:
    agents, work, _ = site
    apply_app(agents, work)
    view = wait_all_ready(agents, "s1-h1", 3, 120)
    web = [i for i in view["instances"] if i["service"] == "web"]
    assert len({i["host"] for i in web}) == 2  # anti-affinity
    for instance in web:  # the container serves its config file on its host
        probe = agents.lab.run(instance["host"], [sys.executable, "-c", (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8080/').read().decode())")])  # fmt: skip
        assert "hello from the edge" in probe.stdout

    leader = agents.status("s1-h1")["leader"]  # type: ignore[index]
    victim = next(i["host"] for i in web if i["host"] != leader)
    survivor = next(h for h in ("s1-h1", "s1-h2", "s1-h3") if h != victim)
    agents.lab.kill(victim)
    started = time.monotonic()
    deadline = started + 60
    while time.monotonic() < deadline:
        view = app_view(agents, survivor)  # type: ignore[assignment]
        if view and all(i["ready"] and i["host"] != victim for i in view["instances"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"instances did not move off {victim}: {view}")
    print(f"failover in {time.monotonic() - started:.1f}s (bench/failover.py measures it)")
    agents.lab.restart(victim)
    agents.wait_ready(victim)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the returning host stops its stale containers
        root, runroot = podman_dirs(agents.lab.store.data_dir(victim))
        listed = agents.lab.run(
            victim, ["podman", "--root", str(root), "--runroot", str(runroot), "ps", "-q"]
        )
        if listed.stdout.strip() == "":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{victim} still runs containers placed elsewhere")
