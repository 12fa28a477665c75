"""Failover: kill the host running an instance, time until it is healthy elsewhere (root: lab).

A 3-host site runs agents in mesh mode with podman; the two-service busybox
app of the lab tests is deployed. Each run kills (SIGKILL) the agent of a host
that runs a web instance and is not the Raft leader, and a probe inside a
surviving host watches the site API every 50 ms until every instance is ready
on a live host. The killed host is then restarted for the next run.

    python bench/failover.py [--runs 5]

Last line: ``RESULT failover_median_s=...``. Target <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.lab.agents import API_PORT, LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.prerequisites import MESH_TOOLS, prerequisites_message
from meshorch.site.access import TOKEN_ENV, harness_token
from tests.lab.podman_app import add_busybox_image, apply_app, wait_all_ready

_PROBE = """
import json, os, sys, time, urllib.request
start, api, victim, limit = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
headers = {"Authorization": "Bearer " + os.environ["MESHORCH_AGENT_TOKEN"]}
while time.time() - start < limit:
    try:
        view = json.load(urllib.request.urlopen(urllib.request.Request(
            f"http://{api}/v1/apps/shop?consistency=local", headers=headers), timeout=1))
        instances = view["instances"]
        if len(instances) == 3 and all(i["ready"] and i["host"] != victim for i in instances):
            print(f"{time.time() - start:.3f}")
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit(1)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--limit", type=float, default=60.0, help="give up on a run after (s)")
    args = parser.parse_args()
    problem = prerequisites_message("bench/failover.py", os.geteuid(), shutil.which, MESH_TOOLS)
    if problem:
        log(problem)
        return 2
    # The agents' admin token: LabAgents gives it to the agents, and what runs in the
    # hosts' namespaces (commands, probes) inherits it from the environment.
    os.environ[TOKEN_ENV] = harness_token()
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="meshorch-failover-") as tmp:
        work = Path(tmp)
        lab = Lab(f"f{secrets.token_hex(2)}", work / "lab")
        agents = LabAgents(lab)
        try:
            log("building a site of 3 hosts with agents, podman and the busybox image")
            lab.up(1, 3)
            agents.start_all()
            add_busybox_image(agents, work)
            apply_app(agents, work)
            wait_all_ready(agents, "s1-h1", 3, 180)
            for run in range(args.runs):
                hosts = [h.name for h in lab.plan.hosts]
                view = wait_all_ready(agents, hosts[0], 3, 120)
                leader = (agents.status(hosts[0]) or {}).get("leader")
                web_hosts = [i["host"] for i in view["instances"] if i["service"] == "web"]
                victim = next(h for h in web_hosts if h != leader)
                watcher = next(h for h in lab.plan.hosts if h.name != victim)
                start = time.time()
                lab.kill(victim)
                probe = lab.run(
                    watcher.name,
                    [sys.executable, "-c", _PROBE, str(start),
                     f"{watcher.lan_ip}:{API_PORT}", victim, str(args.limit)],
                    timeout_s=args.limit + 10,
                )  # fmt: skip
                if probe.returncode != 0:
                    log(f"run {run + 1}: instances did not move off {victim} in time")
                    return 1
                elapsed = float(probe.stdout.strip())
                times.append(elapsed)
                log(f"run {run + 1}: killed {victim}, healthy elsewhere after {elapsed:.2f}s")
                lab.restart(victim)
                agents.wait_ready(victim)
        finally:
            if lab.exists():
                agents.teardown()
            lab.down()
    print(f"failover times (s): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"RESULT failover_median_s={statistics.median(times):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
