"""Upgrading the agents of a lab site (root, network namespaces, wireguard-go, mesh mode)
through the hub on the WAN: host by host, Raft keeps a leader and the application keeps a
ready instance; a release that cannot start is rolled back on its first host and the
rollout stops there."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshorch.lab.agents import HUB_NODE, FleetFlags, LabAgents, LabHub
from meshorch.lab.lab import Lab
from meshorch.releases.wheels import build_test_release
from tests.fleet.test_agent_upgrade import APP, ROOT
from tests.lab.hub_fleet import log_tails
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

HOSTS = ("s1-h1", "s1-h2", "s1-h3")
UPLOAD = """
import sys, urllib.request
wheel, url, token_file = sys.argv[1:4]
token = open(token_file).read().strip()
request = urllib.request.Request(url, data=open(wheel, "rb").read(), method="POST",
                                 headers={"Authorization": "Bearer " + token})
print(urllib.request.urlopen(request, timeout=60).read().decode())
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabAgents, LabHub, Path]]:
    require_lab("wg", "wireguard-go", "iptables")
    work = tmp_path_factory.mktemp("upgrade")
    lab = Lab(f"u{secrets.token_hex(2)}", work / "lab")
    agents = LabAgents(lab, runtime="process")
    try:
        lab.up(1, 3)
        hub = agents.start_hub("upfleet")
        created = agents.hub_request(hub, "POST", "/v1/sites", {"id": "s1"})
        agents.fleet = FleetFlags(hub.url, "upfleet", hub.root_key, {"s1": created["enroll_token"]})
        agents.start_all()
        yield agents, hub, work
    finally:
        if lab.exists():
            print(log_tails(lab, HOSTS))
            LabAgents(lab).teardown()
        lab.down()


def upload_and_roll_out(agents: LabAgents, hub: LabHub, wheel: Path, version: str) -> None:
    result = agents.lab.run(
        HUB_NODE,
        [sys.executable, "-c", UPLOAD, str(wheel), f"{hub.url}/v1/releases",
         str(hub.admin_token_file)],
        timeout_s=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = agents.hub_request(hub, "POST", f"/v1/releases/{version}/rollout", {"sites": ["s1"]})
    assert "delta" in answer, answer


def first_answer(agents: LabAgents, path: str) -> Any:
    for host in HOSTS:
        answer = agents.request(host, "GET", path)
        if isinstance(answer, dict) and "error" not in answer:
            return answer
    return None


def test_agents_upgrade_host_by_host_then_a_broken_release_rolls_back(
    fleet: tuple[LabAgents, LabHub, Path],
) -> None:
    agents, hub, work = fleet
    answer = agents.request("s1-h1", "POST", "/v1/apps", APP.encode())
    assert isinstance(answer, dict) and "error" not in answer, answer

    def app_ready() -> int:
        view = first_answer(agents, "/v1/apps/shop?consistency=local")
        return 0 if view is None else sum(bool(i["ready"]) for i in view["instances"])

    deadline = time.monotonic() + 60
    while app_ready() < 2:
        assert time.monotonic() < deadline, "app not ready"
        time.sleep(0.5)

    good = build_test_release(ROOT, work / "good", "0.1.0+lab1")
    started = time.monotonic()
    upload_and_roll_out(agents, hub, good, "0.1.0+lab1")
    no_leader = no_app = 0.0
    lost_leader = lost_app = None
    deadline = started + 300
    while True:
        now = time.monotonic()
        assert now < deadline, first_answer(agents, "/v1/hosts")
        status = first_answer(agents, "/v1/status")
        lost_leader = None if status and status.get("leader") else (lost_leader or now)
        no_leader = max(no_leader, 0.0 if lost_leader is None else now - lost_leader)
        lost_app = None if app_ready() else (lost_app or now)
        no_app = max(no_app, 0.0 if lost_app is None else now - lost_app)
        hosts = first_answer(agents, "/v1/hosts")
        if hosts and all(
            h["agent_version"] == "0.1.0+lab1" and not h["drained"] and h["alive"]
            for h in hosts["hosts"]
        ):
            break
        time.sleep(0.3)
    took = time.monotonic() - started
    print(f"lab upgrade of 3 hosts in {took:.1f} s; longest without a leader {no_leader:.1f} s, "
          f"without a ready instance {no_app:.1f} s")  # fmt: skip
    assert no_leader < 5.0 and no_app < 5.0

    broken = build_test_release(ROOT, work / "broken", "0.1.0+lab2", broken=True)
    upload_and_roll_out(agents, hub, broken, "0.1.0+lab2")
    deadline = time.monotonic() + 240
    while True:
        site = agents.hub_request(hub, "GET", "/v1/sites/s1")
        upgrade = site.get("agent_upgrade") if isinstance(site, dict) else None
        if upgrade and upgrade["version"] == "0.1.0+lab2" and upgrade["state"] == "failed":
            break
        assert time.monotonic() < deadline, orjson.dumps(site).decode()
        time.sleep(1.0)
    assert "broken test release" in upgrade["failed"]["reason"]
    hosts = first_answer(agents, "/v1/hosts")["hosts"]
    assert {h["agent_version"] for h in hosts} == {"0.1.0+lab1"}
    assert all(h["alive"] for h in hosts)
