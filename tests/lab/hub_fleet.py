"""A lab fleet for the hub tests: a hub on the WAN and one-host sites (process runtime)
behind NAT, each linked to the hub by its enrollment token."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshorch.lab.agents import HUB_NODE, FleetFlags, LabAgents, LabHub
from meshorch.lab.lab import Lab
from tests.labutil import require_lab


@contextmanager
def hub_fleet(
    prefix: str,
    state_dir: Path,
    fleet: str,
    sites: Mapping[str, Mapping[str, str]],
    **hub_options: Any,
) -> Iterator[tuple[LabAgents, LabHub]]:
    """Build the lab, start the hub (``hub_options`` go to ``start_hub``), create the
    sites (with their labels, if any) and start their agents; tear it all down after."""
    require_lab("wg", "wireguard-go", "iptables")
    lab = Lab(f"{prefix}{secrets.token_hex(2)}", state_dir)
    try:
        lab.up(len(sites), 1)
        agents = LabAgents(lab, runtime="process")
        hub = agents.start_hub(fleet, **hub_options)
        tokens = {}
        for site, labels in sites.items():
            body: dict[str, Any] = {"id": site, "labels": dict(labels)} if labels else {"id": site}
            created = agents.hub_request(hub, "POST", "/v1/sites", body)
            assert isinstance(created, dict) and "enroll_token" in created, created
            tokens[site] = created["enroll_token"]
        agents.fleet = FleetFlags(hub.url, fleet, hub.root_key, tokens)
        agents.start_all()
        yield agents, hub
    finally:
        if lab.exists():
            LabAgents(lab).teardown()
        lab.down()


def log_tails(lab: Lab, hosts: Iterable[str]) -> str:
    """The last 25 lines of the hub's log and of each of ``hosts``' logs."""
    parts = []
    for node in (HUB_NODE, *hosts):
        path = lab.store.log_path(node)
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"--- {node} ---\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    logs: Callable[[], str],
    start: float | None = None,
) -> float:
    """Seconds from ``start`` (default: now) until ``predicate`` holds; on timeout an
    AssertionError naming ``what``, with ``logs()``."""
    start = time.monotonic() if start is None else start
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:g}s: {what}\n{logs()}")
