"""``report_stream.tcp_stalled`` on a real cut: a TCP connection inside a throw-away
namespace, its packets dropped by an iptables rule (as ``Lab.partition`` cuts a site's
uplink) and then let through again. The kernel's word is what a site's report stream
uses to tell a cut path (drop it at once) from a busy replica (keep it)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from meshorch.fleet.report_stream import STALLED_S, tcp_stalled
from meshorch.net.netns import in_netns
from tests.labutil import require_lab
from tests.netmesh.labnet import LabNet, run

pytestmark = pytest.mark.lab


@pytest.fixture
def netns() -> Iterator[str]:
    require_lab("iptables")
    net = LabNet()
    try:
        yield net.netns("stall")
    finally:
        net.cleanup()  # the rule goes with the namespace


def connected_pair(netns: str) -> tuple[socket.socket, socket.socket, int]:
    def make() -> tuple[socket.socket, socket.socket, int]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        server, _ = listener.accept()
        listener.close()
        return client, server, port

    return in_netns(netns, make)


def wait_for(predicate: object, timeout_s: float) -> float:
    assert callable(predicate)
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_cut_path_is_stalled_and_a_healed_one_is_not(netns: str) -> None:
    client, server, port = connected_pair(netns)
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    try:
        client.sendall(b"report 1")
        sent = time.monotonic()
        assert server.recv(100) == b"report 1"
        time.sleep(STALLED_S + 0.2)
        assert tcp_stalled(client, time.monotonic() - sent) is False  # acknowledged: sound
        run(["ip", "netns", "exec", netns, "iptables", "-I", *rule])
        client.sendall(b"report 2")
        sent = time.monotonic()
        time.sleep(0.5)  # past the first retransmission (200 ms on loopback)
        assert tcp_stalled(client, time.monotonic() - sent) is False  # not for long yet
        waited = wait_for(lambda: tcp_stalled(client, time.monotonic() - sent), STALLED_S + 1)
        assert waited >= STALLED_S - 0.5 - 0.1
        run(["ip", "netns", "exec", netns, "iptables", "-D", *rule])
        # The next retransmission gets through (exponential backoff: within seconds).
        wait_for(lambda: tcp_stalled(client, time.monotonic() - sent) is False, 15.0)
        server.settimeout(5)
        assert server.recv(100) == b"report 2"
    finally:
        client.close()
        server.close()


def test_one_lost_packet_is_not_a_cut(netns: str) -> None:
    """A packet dropped once (as a loaded host's loopback drops some) is retransmitted and
    acknowledged: by the time the next report looks, nothing is owed."""
    client, server, port = connected_pair(netns)
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    try:
        run(["ip", "netns", "exec", netns, "iptables", "-I", *rule])
        client.sendall(b"report 1")
        sent = time.monotonic()
        time.sleep(0.1)
        run(["ip", "netns", "exec", netns, "iptables", "-D", *rule])
        server.settimeout(5)
        assert server.recv(100) == b"report 1"  # the retransmission got through
        time.sleep(max(0.0, STALLED_S - (time.monotonic() - sent)) + 0.1)
        assert tcp_stalled(client, time.monotonic() - sent) is False
    finally:
        client.close()
        server.close()


def test_no_socket_says_nothing() -> None:
    assert tcp_stalled(None, 10.0) is None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert tcp_stalled(udp, 10.0) is None  # not TCP: the kernel refuses TCP_INFO
    finally:
        udp.close()
