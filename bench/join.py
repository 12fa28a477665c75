"""Time for a plugged-in host to join its site (root: runs on the lab).

From ``lab add-host`` to the new host being a Raft member (ready, in the
member list) with a WireGuard handshake to every peer: the namespace, the
agent's start, mDNS discovery, the join exchange, the WireGuard setup and the
Raft catch-up are all inside. A probe inside the new host watches its own API
and ``wg show`` every 50 ms, on the same clock as the start time.

    python bench/join.py [--runs 5] [--hosts 3]

Last line: ``RESULT join_median_s=...``. Target <= 5 s, stretch 2 s.
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

from meshorch.lab.agents import API_PORT, LabAgents, wg_interface_name
from meshorch.lab.lab import Lab
from meshorch.lab.prerequisites import MESH_TOOLS, prerequisites_message
from meshorch.site.access import TOKEN_ENV, harness_token

_PROBE = """
import json, os, subprocess, sys, time, urllib.request
start, api, iface, peers_wanted, me, limit = (float(sys.argv[1]), sys.argv[2], sys.argv[3],
                                              int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
headers = {"Authorization": "Bearer " + os.environ["MESHORCH_AGENT_TOKEN"]}
while time.time() - start < limit:
    try:
        request = urllib.request.Request(f"http://{api}/v1/status", headers=headers)
        status = json.load(urllib.request.urlopen(request, timeout=1))
        member = status["ready"] and any(m["host_id"] == me for m in status["members"])
        members = len(status["members"])
    except Exception:
        member, members = False, 0
    dump = subprocess.run(["wg", "show", iface, "dump"], capture_output=True, text=True).stdout
    shakes = [int(line.split("\\t")[4]) for line in dump.splitlines()[1:]]
    if member and members == peers_wanted + 1 and len(shakes) == peers_wanted and all(shakes):
        print(f"{time.time() - start:.3f}")
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="hosts to add, one at a time")
    parser.add_argument("--hosts", type=int, default=3, help="hosts of the site at the start")
    parser.add_argument("--limit", type=float, default=60.0, help="give up on a run after (s)")
    args = parser.parse_args()
    problem = prerequisites_message("bench/join.py", os.geteuid(), shutil.which, MESH_TOOLS)
    if problem:
        log(problem)
        return 2
    # The agents' admin token: LabAgents gives it to the agents, and what runs in the
    # hosts' namespaces (commands, probes) inherits it from the environment.
    os.environ[TOKEN_ENV] = harness_token()
    with tempfile.TemporaryDirectory(prefix="meshorch-join-") as state:
        lab = Lab(f"b{secrets.token_hex(2)}", Path(state))
        try:
            log(f"building a site of {args.hosts} hosts with agents")
            lab.up(1, args.hosts)
            agents = LabAgents(lab)
            agents.start_all()
            times = []
            for run in range(args.runs):
                peers_wanted = args.hosts + run
                start = time.time()
                host = lab.add_host("s1")
                agents.join(host.name)
                iface = wg_interface_name(lab.plan, host)
                probe = lab.run(
                    host.name,
                    [sys.executable, "-c", _PROBE, str(start), f"{host.lan_ip}:{API_PORT}",
                     iface, str(peers_wanted), host.name, str(args.limit)],
                    timeout_s=args.limit + 10,
                )  # fmt: skip
                if probe.returncode != 0:
                    log(f"run {run + 1}: {host.name} did not join within {args.limit:g}s")
                    log(lab.store.log_path(host.name).read_text()[-2000:])
                    return 1
                elapsed = float(probe.stdout.strip())
                times.append(elapsed)
                log(f"run {run + 1}: {host.name} joined {peers_wanted} peers in {elapsed:.2f}s")
        finally:
            if lab.exists():
                LabAgents(lab).teardown()
            lab.down()
    median = statistics.median(times)
    print(f"join times (s): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"RESULT join_median_s={median:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
