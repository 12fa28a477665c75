"""A hub on the WAN and three sites behind NAT, for real (root).

The hub runs in the lab's hub namespace on its WAN address; each site is one host
running a mesh-mode agent (process runtime) behind its own NAT router, linked to the hub
by the fleet flags and its enrollment token. s1 and s2 are labelled ``region=eu``, s3
``region=us``. One lab serves the tests of this module, in order; it is torn down (agents,
hub, namespaces, wireguard-go sockets, data dirs) even when a test fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from meshorch.lab.agents import LabAgents, LabHub
from tests.lab.hub_fleet import hub_fleet, log_tails, wait_until

pytestmark = pytest.mark.lab

FLEET = "lab"
SITES = {"s1": {"region": "eu"}, "s2": {"region": "eu"}, "s3": {"region": "us"}}
EU = ("s1", "s2")
HOSTS = {site: f"{site}-h1" for site in SITES}
PLACEMENT = {"match": {"region": "eu"}, "max_parallel": 2}  # one wave: s1 and s2 together
HEAL_CONVERGE_S = 10.0
PARTITION_S = 15.0  # longer than a fleet link request's timeout (10 s)

APP = """
api_version: meshorch/v1
name: web
version: "{version}"
services:
  - name: main
    replicas: 1
    containers:
      - name: main
        image: process
        command: ["sh", "-c", "echo {version} > version; exec sleep 1000000"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
        probes:
          readiness: {{exec: {{command: ["test", "-s", "version"]}}, period_s: 0.5,
                       timeout_s: 0.4}}
"""


@dataclass
class Fleet:
    agents: LabAgents
    hub: LabHub

    def hub_call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        answer = self.agents.hub_request(self.hub, method, path, body)
        assert isinstance(answer, dict) and "error" not in answer, f"{method} {path}: {answer}"
        return answer

    def deploy(self, version: str) -> dict[str, Any]:
        return self.hub_call(
            "POST", "/v1/apps", {"spec": APP.format(version=version), "placement": PLACEMENT}
        )

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self.hub_call("GET", f"/v1/deployments/{deployment_id}")

    def head(self) -> int:
        return int(self.hub_call("GET", "/v1/fleet")["head"])

    def site_fleet(self, site: str) -> dict[str, Any] | None:
        answer = self.agents.request(HOSTS[site], "GET", "/v1/fleet")
        return answer if isinstance(answer, dict) and "trust" in answer else None

    def trust_version(self, site: str) -> int | None:
        fleet = self.site_fleet(site)
        if fleet is None or fleet["trust"] is None:
            return None
        return int(fleet["trust"]["version"])

    def apps(self, site: str) -> dict[str, dict[str, Any]] | None:
        answer = self.agents.request(HOSTS[site], "GET", "/v1/apps")
        if not isinstance(answer, dict) or "apps" not in answer:
            return None
        return {app["name"]: app for app in answer["apps"]}

    def runs(self, site: str, version: str) -> bool:
        """The site's own API shows ``web`` at ``version``, every instance of that version
        and ready, and no rollout in progress."""
        app = (self.apps(site) or {}).get("web")
        if app is None or app["version"] != version or not app["instances"]:
            return False
        rollout = app["rollout"]
        settled = rollout is None or rollout["phase"] == "done"
        return settled and all(i["ready"] and i["version"] == version for i in app["instances"])

    def logs(self) -> str:
        return log_tails(self.agents.lab, HOSTS.values())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with hub_fleet("f", tmp_path_factory.mktemp("lab"), FLEET, SITES) as (agents, hub):
        yield Fleet(agents, hub)


def test_a_deployment_reaches_exactly_the_matching_sites_behind_nat(fleet: Fleet) -> None:
    wait_until(
        lambda: all((fleet.site_fleet(s) or {}).get("connected") for s in SITES),
        60,
        "every site linked to the hub through its NAT router",
        fleet.logs,
    )
    before = {site: fleet.trust_version(site) for site in SITES}
    deployment = fleet.deploy("1")
    assert sorted(site for wave in deployment["waves"] for site in wave) == list(EU)

    wait_until(
        lambda: fleet.deployment(deployment["id"])["state"] != "running",
        90,
        "the deployment finishes",
        fleet.logs,
    )
    done = fleet.deployment(deployment["id"])
    assert done["state"] == "succeeded", done
    for site in EU:
        wait_until(partial(fleet.runs, site, "1"), 30, f"web 1 ready on {site}", fleet.logs)
    head = fleet.head()
    # s3 applies the same log (its version advances) but runs nothing of it.
    wait_until(lambda: fleet.trust_version("s3") == head, 30, "s3 at the hub's head", fleet.logs)
    s3_version = fleet.trust_version("s3")
    assert s3_version is not None and s3_version > (before["s3"] or 0)
    assert fleet.apps("s3") == {}
    for site in EU:
        assert fleet.trust_version(site) == head


def test_a_cut_off_site_keeps_running_and_converges_within_10s_of_the_heal(
    fleet: Fleet,
) -> None:
    """s1's uplink is cut (``Lab.partition("s1", "hub")``: DROP rules in s1's router and
    the hub) for PARTITION_S, longer than a link request's timeout, so the site's open
    long-poll and reports die with it. Version 2 is deployed meanwhile: s2 runs it, s1
    keeps running version 1.

    Converged means: s1's own API (GET /v1/apps and GET /v1/fleet in its namespace) shows
    ``web`` at version 2, every instance of that version and ready, no rollout in progress,
    and its trust version equal to the hub's head. Timed from just before the partition's
    rules are removed; it must take at most HEAL_CONVERGE_S."""
    lab = fleet.agents.lab
    assert fleet.runs("s1", "1")
    lab.partition("s1", "hub")
    cut = time.monotonic()
    try:
        deployment = fleet.deploy("2")
        wait_until(lambda: fleet.runs("s2", "2"), 60, "web 2 ready on s2", fleet.logs)
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut)))
        # The cut-off site keeps what it runs and has heard nothing of version 2.
        assert fleet.runs("s1", "1")
        head = fleet.head()
        assert (fleet.trust_version("s1") or 0) < head
        progress = fleet.deployment(deployment["id"])
        assert progress["state"] == "running", progress
        assert progress["progress"]["s1"]["state"] != "healthy", progress
        healed = time.monotonic()
    finally:
        lab.heal("s1", "hub")
    elapsed = wait_until(
        lambda: fleet.trust_version("s1") == head and fleet.runs("s1", "2"),
        30,  # fail with the logs after 30 s; the requirement is checked below
        "s1 converges after the heal",
        fleet.logs,
        start=healed,
    )
    print(f"s1 converged {elapsed:.1f}s after the heal (cut off for {healed - cut:.1f}s)")
    assert elapsed <= HEAL_CONVERGE_S, f"s1 converged {elapsed:.1f}s after the heal"
    wait_until(
        lambda: fleet.deployment(deployment["id"])["state"] != "running",
        30,
        "the deployment finishes",
        fleet.logs,
    )
    assert fleet.deployment(deployment["id"])["state"] == "succeeded"
    wait_until(lambda: fleet.trust_version("s3") == head, 30, "s3 at the hub's head", fleet.logs)
    assert fleet.apps("s3") == {}
