"""An image to every host of a site: time, bytes from outside, ratio to plain cp (root: lab).

A 3-host site runs agents in mesh mode. A 100 MB archive is added at the first
host (`meshorch image add`, the only bytes entering the site); the others copy
it from site peers over the WireGuard overlay, verified by sha256. The anchor
copies the same file to each host's data dir one by one with `cp`, in the same
run.

    python bench/image_spread.py [--size-mb 100]

Last line: ``RESULT spread_s=... outside_bytes_ratio=... ratio_vs_cp=...``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.lab.agents import API_PORT, LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.prerequisites import LAB_TOOLS, prerequisites_message
from meshorch.site.access import TOKEN_ENV, harness_token


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--limit", type=float, default=300.0, help="give up after (s)")
    args = parser.parse_args()
    problem = prerequisites_message("bench/image_spread.py", os.geteuid(), shutil.which, LAB_TOOLS)
    if problem:
        log(problem)
        return 2
    # The agents' admin token: LabAgents gives it to the agents, and what runs in the
    # hosts' namespaces (commands, probes) inherits it from the environment.
    os.environ[TOKEN_ENV] = harness_token()
    with tempfile.TemporaryDirectory(prefix="meshorch-spread-") as tmp:
        archive = Path(tmp) / "image.tar"
        with open(archive, "wb") as handle:
            for _ in range(args.size_mb):
                handle.write(os.urandom(1 << 20))
        size = archive.stat().st_size
        lab = Lab(f"i{secrets.token_hex(2)}", Path(tmp) / "lab")
        try:
            log(f"building a site of {args.hosts} hosts with agents")
            lab.up(1, args.hosts)
            agents = LabAgents(lab)
            agents.start_all()
            hosts = [h.name for h in lab.plan.hosts]
            first = lab.plan.hosts[0]

            started = time.monotonic()
            added = lab.run(
                first.name,
                [sys.executable, "-m", "meshorch", "image", "add", str(archive),
                 "--ref", "bench/big:1", "--api", f"{first.lan_ip}:{API_PORT}"],
                timeout_s=args.limit,
            )  # fmt: skip
            if added.returncode != 0:
                log(added.stderr)
                return 1
            while time.monotonic() - started < args.limit:
                catalog = agents.request(first.name, "GET", "/v1/images")
                images = catalog["images"] if isinstance(catalog, dict) else []
                if images and len(images[0]["holders"]) == len(hosts):
                    break
                time.sleep(0.1)
            else:
                log("the image did not reach every host in time")
                for h in hosts:
                    log(h + ": " + lab.store.log_path(h).read_text()[-1500:])
                return 1
            spread_s = time.monotonic() - started
            uploaded = sum(agents.request(h, "GET", "/v1/images")["local"]["uploaded_bytes"]
                           for h in hosts)  # fmt: skip
            log(f"spread to {len(hosts)} hosts in {spread_s:.2f}s")

            started = time.monotonic()
            for host in hosts:
                target = lab.store.data_dir(host) / "cp-anchor.tar"
                subprocess.run(["cp", str(archive), str(target)], check=True)
                subprocess.run(["sync", str(target)], check=True)
            cp_s = time.monotonic() - started
            log(f"cp to {len(hosts)} hosts one by one in {cp_s:.2f}s")
        finally:
            if lab.exists():
                LabAgents(lab).teardown()
            lab.down()
    print(f"image {size} bytes, {len(hosts)} hosts: spread {spread_s:.2f}s, cp {cp_s:.2f}s")
    print(
        f"RESULT spread_s={spread_s:.2f} outside_bytes_ratio={uploaded / size:.2f} "
        f"ratio_vs_cp={spread_s / cp_s:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
