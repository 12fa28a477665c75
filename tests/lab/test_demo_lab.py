"""``meshorch demo --lab``: the showcase on namespaces, WireGuard and podman, run as a user
would, then used from this machine through its forwarded hub port, then stopped by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshorch.lab.agents import LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.prerequisites import LAB_TOOLS
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

UP_TIMEOUT_S = 300.0  # under the test's own timeout, so a slow start says where it stopped


class Demo:
    """``meshorch demo --lab`` in a subprocess; its output lines as they come (a thread
    reads them: select() on the pipe would miss lines already in the file's buffer)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshorch", "demo", "--lab", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._incoming: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._incoming.put(line.rstrip("\n"))
        self._incoming.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._incoming.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def interrupt(self, timeout_s: float = 120.0) -> int:
        """Ctrl-C; the exit code once it has torn its lab down."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout_s)
        while (line := self._incoming.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    def stop(self) -> None:
        """After a failure: Ctrl-C (the demo tears its lab down), then kill, then take
        the lab down from its state dir if the demo could not."""
        if self.process.poll() is None:
            try:
                self.interrupt()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        found = [re.search(r"state and logs under (\S+)/(\w+)$", line) for line in self.lines]
        for match in filter(None, found):
            lab = Lab(match.group(2), Path(match.group(1)))
            if lab.exists():
                LabAgents(lab).teardown()
                lab.down(keep_logs=True)


@pytest.fixture
def lab_ready() -> None:
    require_lab(*LAB_TOOLS)
    if not Path("/bin/busybox").exists():
        pytest.fail("busybox-static is not installed (/bin/busybox)")


def lab_namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines()
            if line.startswith(f"{prefix}-")]  # fmt: skip


def hub_get(url: str, token: str, path: str) -> Any:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        body = answer.read()
        return json.loads(body) if path.startswith("/v1/") else body.decode()


@pytest.fixture
def demo(lab_ready: None) -> Iterator[Demo]:
    running = Demo("--dashboard", "127.0.0.1:0", "--exit-after", "900")
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.timeout(600)
def test_lab_demo_runs_the_fleet_for_real_and_tears_it_down(demo: Demo) -> None:
    prefix = demo.wait_for_line(r"building the lab (\w+):", 60).group(1)
    dashboard = demo.wait_for_line(r"^Dashboard: (http://\S+)/  \(log in with the token in (\S+)\)",
                                   UP_TIMEOUT_S)  # fmt: skip
    url, token = dashboard.group(1), Path(dashboard.group(2)).read_text().strip()
    output = "\n".join(demo.lines)
    assert "deployment succeeded" in output
    # Each site's hosts found each other and built their WireGuard mesh.
    assert len(re.findall(r"has 1 WireGuard peer\(s\) with a handshake", output)) == 3, output
    assert len(lab_namespaces(prefix)) == 1 + 1 + 3 * (2 + 2)  # wan, hub, per site lan+router+2
    assert len(re.findall(r"healthy .* hosts up 2/2, instances ready 3/3", output)) == 3, output

    # The hub in its namespace answers here, through the demo's forward.
    sites = {site["id"]: site for site in hub_get(url, token, "/v1/sites")["sites"]}
    assert sorted(sites) == ["shop-ap", "shop-eu", "shop-us"]
    assert {site["health"] for site in sites.values()} == {"healthy"}, sites
    detail = hub_get(url, token, "/v1/sites/shop-eu")
    placed = {(h["host_id"], i["instance_id"]) for h in detail["hosts"] for i in h["instances"]
              if i["ready"]}  # fmt: skip
    # web's two replicas are on different hosts: the image reached the second host by Raft.
    assert {host for host, instance in placed if instance.startswith("hello.web.")} == {
        "s1-h1", "s1-h2"
    }, detail  # fmt: skip
    assert "<html" in hub_get(url, token, "/").lower()

    # The worker container's stdout travels site -> hub and is searchable there.
    deadline, found = time.monotonic() + 90, list[dict[str, Any]]()
    while time.monotonic() < deadline and not found:
        found = hub_get(url, token, "/v1/logs?site=shop-us&app=hello&grep=tick")["logs"]
        time.sleep(2)
    assert found and found[0]["text"].startswith("tick "), found

    assert demo.interrupt() == 0, "\n".join(demo.lines)
    assert "lab " + prefix + " is down" in "\n".join(demo.lines)
    assert lab_namespaces(prefix) == []
    assert not [p for p in Path("/var/run/wireguard").glob(f"w{prefix}*")]


@pytest.mark.timeout(600)
def test_lab_demo_interrupted_while_building_leaves_nothing(demo: Demo) -> None:
    prefix = demo.wait_for_line(r"building the lab (\w+):", 60).group(1)
    demo.wait_for_line(r"^\[4/8\] starting the agents", UP_TIMEOUT_S)
    code = demo.interrupt(timeout_s=240)
    assert code == 130, "\n".join(demo.lines)
    assert lab_namespaces(prefix) == []
    assert not [p for p in Path("/var/run/wireguard").glob(f"w{prefix}*")]


def test_lab_demo_refuses_a_bad_dashboard_address_before_building(lab_ready: None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshorch", "demo", "--lab", "--dashboard", "nowhere"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 2
    assert "expected HOST:PORT" in done.stderr
    assert "building the lab" not in done.stdout
