"""A two-service application on busybox containers, shared by lab tests and benchmarks."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from meshorch.lab.agents import API_PORT, LabAgents
from meshorch.runtime import BUSYBOX_IMAGE_REF, build_busybox_rootfs

APP_YAML = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: web
    replicas: 2
    anti_affinity: true
    containers:
      - name: httpd
        image: localhost/meshorch-busybox:1
        command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
        files: [{path: /www/index.html, content: "hello from the edge"}]
        ports: [{container_port: 8080}]
        resources: {memory_limit: 32Mi, cpu_limit: 0.5, cpu_request: 0.1}
        probes:
          readiness: {http: {port: 8080, path: /}, period_s: 0.2, timeout_s: 0.2,
                      failure_threshold: 1}
  - name: worker
    replicas: 1
    containers:
      - name: main
        image: localhost/meshorch-busybox:1
        command: ["sleep", "100000"]
        resources: {memory_limit: 16Mi, cpu_request: 0.1}
"""


def add_busybox_image(agents: LabAgents, work: Path) -> int:
    """Build the busybox rootfs and add it at the first host; returns its size."""
    rootfs = build_busybox_rootfs(work / "busybox-rootfs.tar")
    agents.add_image(agents.lab.plan.hosts[0].name, rootfs, BUSYBOX_IMAGE_REF)
    return rootfs.stat().st_size


def apply_app(agents: LabAgents, work: Path, text: str = APP_YAML) -> None:
    spec = work / "app.yaml"
    spec.write_text(text)
    first = agents.lab.plan.hosts[0]
    result = agents.lab.run(
        first.name,
        [sys.executable, "-m", "meshorch", "app", "apply", "-f", str(spec),
         "--agent", f"{first.lan_ip}:{API_PORT}"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout


def app_view(agents: LabAgents, host: str) -> dict[str, Any] | None:
    view = agents.request(host, "GET", "/v1/apps/shop?consistency=local")
    return view if isinstance(view, dict) and "instances" in view else None


def wait_all_ready(agents: LabAgents, host: str, count: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        view = app_view(agents, host)
        if view and len(view["instances"]) == count and all(i["ready"] for i in view["instances"]):
            return view
        time.sleep(0.3)
    raise AssertionError(f"app not ready within {timeout_s}s: {view}")
