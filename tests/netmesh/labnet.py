"""Throw-away network namespaces for lab tests, cleaned up even on failure.

Everything lives in namespaces named ``mt<hex>...``: the root namespace gets
no links, addresses or bridges, so tests cannot disturb the machine's network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_CMD_TIMEOUT_S = 60


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=check, timeout=_CMD_TIMEOUT_S
    )


class LabNet:
    """Creates namespaces, veth pairs and bridges; ``cleanup`` removes them all."""

    def __init__(self) -> None:
        # Short, so prefix + suffix stays within the 15-char interface name limit.
        self.prefix = "mt" + secrets.token_hex(3)
        self.namespaces: list[str] = []

    def name(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        assert len(name) <= 15, name
        return name

    def netns(self, suffix: str) -> str:
        ns = self.name(suffix)
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def veth(self, ns_a: str, cidr_a: str, ns_b: str, cidr_b: str, suffix: str) -> None:
        """A veth pair straight between two namespaces, addressed and up."""
        a, b = self.name(f"{suffix}a"), self.name(f"{suffix}b")
        run(
            [
                "ip",
                "link",
                "add",
                a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                ns_b,
            ]
        )
        for ns, dev, cidr in ((ns_a, a, cidr_a), (ns_b, b, cidr_b)):
            run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])

    def bridge(self, ns: str, suffix: str) -> str:
        """A bridge inside namespace ``ns`` (the 'switch'), with snooping off."""
        br = self.name(suffix)
        run(["ip", "-n", ns, "link", "add", br, "type", "bridge", "mcast_snooping", "0"])
        run(["ip", "-n", ns, "link", "set", br, "up"])
        return br

    def attach(self, host_ns: str, cidr: str, switch_ns: str, bridge: str, suffix: str) -> str:
        """Join ``host_ns`` to ``bridge``; return the host-side interface name."""
        dev, port = self.name(f"{suffix}h"), self.name(f"{suffix}s")
        run(
            [
                "ip",
                "link",
                "add",
                dev,
                "netns",
                host_ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                switch_ns,
            ]
        )
        run(["ip", "-n", switch_ns, "link", "set", port, "master", bridge])
        run(["ip", "-n", switch_ns, "link", "set", port, "up"])
        run(["ip", "-n", host_ns, "addr", "add", cidr, "dev", dev])
        run(["ip", "-n", host_ns, "link", "set", dev, "up"])
        return dev

    def pids(self, ns: str) -> list[int]:
        out = run(["ip", "netns", "pids", ns], check=False).stdout
        return [int(p) for p in out.split()]

    def cleanup(self) -> None:
        """Kill what runs in our namespaces (by pid), then delete them."""
        for ns in reversed(self.namespaces):
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            result = run(["ip", "netns", "del", ns], check=False)
            if result.returncode != 0:
                logger.warning("could not delete netns %s: %s", ns, result.stderr)
        # wireguard-go leaves its socket behind when killed.
        sockdir = Path("/var/run/wireguard")
        if sockdir.is_dir():
            for sock in sockdir.glob(f"{self.prefix}*.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        self.namespaces.clear()


def ping_argv(ns: str, address: str, timeout_s: int = 2) -> list[str]:
    """One ICMP echo from inside ``ns``: `ping` when installed, else our helper."""
    prefix = ["ip", "netns", "exec", ns]
    if shutil.which("ping"):
        return [*prefix, "ping", "-c1", f"-W{timeout_s}", address]
    helper = str(Path(__file__).with_name("icmp_ping.py"))
    return [*prefix, sys.executable, helper, address, str(timeout_s)]
