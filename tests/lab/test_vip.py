"""A VIP moving between two hosts on one LAN (root: network namespaces and a bridge).

Hosts A and B and a client share a bridge. A holds the VIP and the client talks
to a server on it, so the client's ARP cache maps the VIP to A's MAC. A releases,
B claims: without the gratuitous ARP the client would keep sending to A's MAC
until its entry went stale (tens of seconds); with it, new connections reach B
at once (within 3 s here).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from meshorch.net.vip import Vip, VipError
from tests.labutil import require_lab
from tests.netmesh.labnet import LabNet, run

pytestmark = pytest.mark.lab

VIP = "10.77.0.100"
PORT = 8080

# Answers every connection with its name; binds the wildcard so it serves the VIP when held.
_SERVER = textwrap.dedent(
    """
    import socket, sys
    name = sys.argv[1].encode() + b"\\n"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(name)
        c.close()
    """
)

# Connects to the VIP again and again until the named server answers; prints the delay.
_PROBE = textwrap.dedent(
    """
    import socket, sys, time
    host, port, want, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    start = time.monotonic()
    seen = []
    while time.monotonic() - start < limit:
        try:
            with socket.create_connection((host, port), timeout=0.25) as c:
                c.settimeout(0.5)
                got = c.recv(64).decode().strip()
        except OSError as exc:
            got = type(exc).__name__
        seen.append(got)
        if got == want:
            print(f"{time.monotonic() - start:.3f}")
            sys.exit(0)
        time.sleep(0.05)
    print("never; saw " + ",".join(seen[-20:]))
    sys.exit(1)
    """
)


@pytest.fixture
def lan() -> Iterator[tuple[LabNet, dict[str, tuple[str, str]]]]:
    """Namespaces a, b, client on one bridge; yields {host: (netns, device)}."""
    require_lab()
    net = LabNet()
    try:
        switch = net.netns("sw")
        bridge = net.bridge(switch, "br")
        hosts: dict[str, tuple[str, str]] = {}
        for host, address in (("a", "10.77.0.1/24"), ("b", "10.77.0.2/24"), ("c", "10.77.0.9/24")):
            ns = net.netns(host)
            hosts[host] = (ns, net.attach(ns, address, switch, bridge, host))
            # Plain hosts, not routers: new namespaces may inherit forwarding on, and A
            # would then relay the client's packets to B itself (hiding a stale ARP entry).
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
        yield net, hosts
    finally:
        net.cleanup()


def start_server(ns: str, name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER, name, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def probe(ns: str, want: str, limit_s: float) -> tuple[bool, str]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, VIP, str(PORT), want]
    done = subprocess.run(
        [*argv, str(limit_s)], capture_output=True, text=True, timeout=limit_s + 30
    )
    return done.returncode == 0, done.stdout.strip() + done.stderr.strip()


def mac_of(ns: str, dev: str) -> str:
    return run(["ip", "-n", ns, "-br", "link", "show", dev]).stdout.split()[2]


def neighbour_mac(ns: str) -> str | None:
    fields = run(["ip", "-n", ns, "neigh", "show", VIP]).stdout.split()
    return fields[fields.index("lladdr") + 1] if "lladdr" in fields else None


async def test_vip_moves_to_b_and_new_connections_follow(
    lan: tuple[LabNet, dict[str, tuple[str, str]]],
) -> None:
    _, hosts = lan
    (ns_a, dev_a), (ns_b, dev_b), (ns_c, _) = hosts["a"], hosts["b"], hosts["c"]
    servers = [start_server(ns_a, "A"), start_server(ns_b, "B")]
    try:
        vip_a = Vip(f"{VIP}/32", dev_a, netns=ns_a)
        vip_b = Vip(f"{VIP}/32", dev_b, netns=ns_b)
        assert not await vip_a.held()

        await vip_a.claim()
        await vip_a.claim()  # idempotent
        assert await vip_a.held()
        assert not await vip_b.held()
        ok, out = await asyncio.to_thread(probe, ns_c, "A", 5)
        assert ok, out
        assert neighbour_mac(ns_c) == mac_of(ns_a, dev_a)

        await vip_a.release()
        await vip_a.release()  # idempotent
        assert not await vip_a.held()
        await vip_b.claim()
        assert await vip_b.held()
        # The announcement has already rewritten the client's ARP entry ...
        assert neighbour_mac(ns_c) == mac_of(ns_b, dev_b)
        # ... so its new connections reach B well within 3 s.
        ok, out = await asyncio.to_thread(probe, ns_c, "B", 3)
        assert ok, out
        assert float(out) < 3.0

        # And back again.
        await vip_b.release()
        await vip_a.claim()
        ok, out = await asyncio.to_thread(probe, ns_c, "A", 3)
        assert ok, out
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


async def test_claim_on_a_missing_device_is_a_clear_error(
    lan: tuple[LabNet, dict[str, tuple[str, str]]],
) -> None:
    _, hosts = lan
    ns_a, _ = hosts["a"]
    vip = Vip(f"{VIP}/32", "nosuchdev0", netns=ns_a)
    with pytest.raises(VipError, match="nosuchdev0"):
        await vip.claim()
