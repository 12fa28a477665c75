"""A real registry on the lab's WAN, beside the hub (root, podman, runc, wireguard-go,
docker-registry, htpasswd): a site behind NAT pulls through its uplink, once, and every
host runs the pinned image in a container."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from meshorch.apps.settings import podman_dirs
from meshorch.lab.agents import LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.registry import LabRegistry
from tests.images.registry_fixtures import PASSWORD, USER, PushedImages, registry_with_images
from tests.lab.podman_app import apply_app, wait_all_ready
from tests.labutil import require_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: web
    replicas: 3
    anti_affinity: true
    containers:
      - name: httpd
        image: {image}
        command: ["httpd", "-f", "-p", "8080", "-h", "/"]
        ports: [{{container_port: 8080}}]
        resources: {{memory_limit: 32Mi, cpu_limit: 0.5, cpu_request: 0.1}}
        probes:
          readiness: {{http: {{port: 8080, path: /hello.txt}}, period_s: 0.2, timeout_s: 0.2,
                      failure_threshold: 1}}
"""


@pytest.fixture(scope="module")
def lab_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabAgents, PushedImages]]:
    require_lab("wg", "wireguard-go", "iptables", "podman", "runc", "docker-registry", "htpasswd")
    work = tmp_path_factory.mktemp("registry-lab")
    lab = Lab(f"r{secrets.token_hex(2)}", work / "lab")
    agents = LabAgents(lab, runtime="podman")
    try:
        lab.up(1, 3)
        agents.start_all()
        registry = LabRegistry.on_wan(lab.plan, work / "registry", {USER: PASSWORD})
        with registry_with_images(work, registry) as pushed:
            yield agents, pushed
    finally:
        if lab.exists():
            agents.teardown()
            lab.down()


def test_a_site_behind_nat_pulls_once_and_every_host_runs_the_digest(
    lab_site: tuple[LabAgents, PushedImages], tmp_path: Path
) -> None:
    agents, images = lab_site
    hosts = [h.name for h in agents.lab.plan.hosts]
    for host in hosts:
        agents.wait_ready(host)
    ref = f"{images.host}/lab/app:1"
    body = {"ref": ref, "username": USER, "password": PASSWORD, "plain_http": True}
    answer = agents.request(hosts[0], "POST", "/v1/images/pull", orjson.dumps(body))
    assert answer and "image" in answer, answer
    assert answer["image"]["digest"] == images.digests["app"]

    apply_app(agents, tmp_path, APP.format(image=ref))
    view = wait_all_ready(agents, hosts[0], 3, 240)
    assert {i["host"] for i in view["instances"]} == set(hosts)
    for host in hosts:  # each host's container serves the file the registry's image holds
        probe = agents.lab.run(host, [sys.executable, "-c", (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8080/hello.txt').read().decode())")])  # fmt: skip
        assert "hello from the registry" in probe.stdout, (host, probe.stderr)

    digest_name = f"{images.host}/lab/app:{images.digests['app'].replace(':', '-')}"
    for host in hosts:  # podman knows the image by the digest the site pinned
        root, runroot = podman_dirs(agents.lab.store.data_dir(host))
        exists = agents.lab.run(host, ["podman", "--root", str(root), "--runroot", str(runroot),
                                       "image", "exists", digest_name])  # fmt: skip
        assert exists.returncode == 0, (host, exists.stderr)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counters = [agents.request(h, "GET", "/v1/images")["local"] for h in hosts]
        if sum(c["fetched_bytes"] for c in counters) == 2 * answer["image"]["size"]:
            break
        time.sleep(0.3)
    # Through the uplink once: only the first host pulled from the registry.
    assert [c["pulled_bytes"] > 0 for c in counters] == [True, False, False], counters
    assert sum(c["fetched_bytes"] for c in counters) == 2 * answer["image"]["size"], counters


def test_a_tag_pulled_again_moves_every_host_to_the_new_digest(
    lab_site: tuple[LabAgents, PushedImages], tmp_path: Path
) -> None:
    agents, images = lab_site
    hosts = [h.name for h in agents.lab.plan.hosts]
    moved = images.push("app:2", "lab/app:1")  # the tag now names another build
    body = {"ref": f"{images.host}/lab/app:1", "username": USER, "password": PASSWORD,
            "plain_http": True}  # fmt: skip
    answer = agents.request(hosts[1], "POST", "/v1/images/pull", orjson.dumps(body))
    assert answer and answer["image"]["digest"] == moved, answer
    assert answer["pull"]["reused_bytes"] > 0  # the base layer was here already

    def serves(host: str) -> str:
        probe = agents.lab.run(host, [sys.executable, "-c", (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8080/hello.txt').read().decode())")])  # fmt: skip
        return probe.stdout

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        answers = {h: serves(h) for h in hosts}
        if all("second build" in text for text in answers.values()):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not every host runs the new digest: {answers}")


def test_lab_registry_command_serves_on_the_wan_until_stopped(
    lab_site: tuple[LabAgents, PushedImages],
) -> None:
    agents, _ = lab_site
    lab = agents.lab
    plan = lab.plan
    where = ["--prefix", plan.prefix, "--state-dir", str(lab.store.state_dir)]
    command = [sys.executable, "-m", "meshorch", "lab", "registry", *where,
               "--user", "ops", "--port", "5001"]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("s3cret\n")
        process.stdin.close()
        line = process.stdout.readline()
        assert f"registry {plan.hub_ip}:5001 (user ops" in line, line
        probe = (
            "import base64, sys, urllib.request, urllib.error\n"
            f"url = 'http://{plan.hub_ip}:5001/v2/'\n"
            "try:\n    urllib.request.urlopen(url, timeout=5)\n"
            "except urllib.error.HTTPError as exc:\n    print(exc.code)\n"
            "auth = 'Basic ' + base64.b64encode(b'ops:s3cret').decode()\n"
            "print(urllib.request.urlopen(urllib.request.Request(url, headers="
            "{'Authorization': auth}), timeout=5).status)\n"
        )
        site_host = plan.hosts[0].name  # behind the site's NAT router
        answered = lab.run(site_host, [sys.executable, "-c", probe])
        assert answered.stdout.split() == ["401", "200"], answered.stderr
    finally:
        process.terminate()
        process.wait(30)
    after = lab.run(plan.hosts[0].name, [sys.executable, "-c", probe])
    assert "Connection refused" in after.stderr or "timed out" in after.stderr, after.stderr
