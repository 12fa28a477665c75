"""State file, parsers, probe packets and status text: pure, no root."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from meshorch.lab import LabState, LabStateError, ProcessRecord, format_status
from meshorch.lab.parse import (
    parse_link_names,
    parse_net_dev,
    parse_netns_list,
    parse_pids,
    parse_proc_stat,
)
from meshorch.lab.probe import checksum, echo_request, parse_echo_reply
from meshorch.lab.state import StateStore, decode_state, encode_state
from meshorch.lab.status import LabStatus, NodeStatus, ProcessStatus


def _state() -> LabState:
    return LabState(
        prefix="mo",
        site_hosts=[2, 3],
        phase="up",
        agent_cmd="agent --id {host}",
        hub_cmd=None,
        processes={
            "s1-h1": ProcessRecord(
                node="s1-h1",
                netns="mo-s1-h1",
                argv=("agent", "--id", "s1-h1"),
                log="/run/meshorch-lab/mo/logs/s1-h1.log",
                pid=1234,
                start_ticks=5678,
                started_at=1.5,
            )
        },
        partitions=[("s1-h1", "s1-h2")],
    )


def test_state_roundtrip() -> None:
    state = _state()
    assert decode_state(encode_state(state)) == state


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"version": 99}', b'{"version": 1, "prefix": "mo"}'],
)
def test_bad_state_is_a_state_error(data: bytes) -> None:
    with pytest.raises(LabStateError):
        decode_state(data)


def test_store_save_load_remove(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "labs", "mo")
    with pytest.raises(LabStateError, match="no lab 'mo'"):
        store.load()
    with store.locked():
        store.save(_state())
    assert store.load() == _state()
    assert not list((tmp_path / "labs").glob("*.tmp"))
    assert store.log_path("s1-h1") == tmp_path / "labs" / "mo" / "logs" / "s1-h1.log"
    store.remove()
    assert not store.exists()
    other = StateStore(tmp_path / "labs", "mx")
    other.path.write_bytes(encode_state(_state()))
    with pytest.raises(LabStateError, match="holds lab 'mo'"):
        other.load()


def test_parsers() -> None:
    assert parse_netns_list("mo-s1-h1 (id: 3)\nmo-wan\n\n") == ["mo-s1-h1", "mo-wan"]
    assert parse_pids("12\n345\n") == [12, 345]
    links = (
        "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue\\    link/loopback\n"
        "5: mos1h1@if4: <BROADCAST,MULTICAST,UP> mtu 1500\\    link/ether\n"
        "6: mowan: <BROADCAST> mtu 1500\n"
    )
    assert parse_link_names(links) == ["lo", "mos1h1", "mowan"]
    fields = " ".join(["S", *[str(n) for n in range(4, 22)], "99887766", "0"])
    stat = parse_proc_stat(f"4242 (my (odd) prog) {fields}")
    assert (stat.state, stat.start_ticks) == ("S", 99887766)
    net_dev = (
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n"
        "    lo:     120       2    0    0    0     0          0         0      120       2"
        "    0    0    0     0       0          0\n"
        "  wan0: 209715200 145000 0 0 0 0 0 0 5242880 70000 0 0 0 0 0 0\n"
    )
    assert parse_net_dev(net_dev) == {"lo": (120, 120), "wan0": (209715200, 5242880)}


def test_icmp_packets() -> None:
    packet = echo_request(0x1234, 7, b"abc")
    assert checksum(packet) == 0
    ip_header = bytes([0x45]) + bytes(11) + socket.inet_aton("10.1.0.12") + bytes(4)
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 7) + b"abc"
    assert parse_echo_reply(ip_header + reply) == ("10.1.0.12", 0x1234, 7)
    assert parse_echo_reply(ip_header + packet) is None  # our own request, not a reply
    assert parse_echo_reply(b"short") is None


def test_format_status() -> None:
    status = LabStatus(
        prefix="mo",
        phase="up",
        state_path="/run/meshorch-lab/mo.json",
        wan_subnet="172.30.0.0/24",
        nodes=(
            NodeStatus("hub", "hub", "mo-hub", "172.30.0.2", None, True),
            NodeStatus("s1-h1", "host", "mo-s1-h1", "10.1.0.11", 1, True),
            NodeStatus("s1-h2", "host", "mo-s1-h2", "10.1.0.12", 1, False),
        ),
        processes=(ProcessStatus("s1-h1", 42, False, ("sleep", "1000"), "/x.log"),),
        partitions=(("s1-h1", "s1-h2"),),
        stray_namespaces=("mo-s1-h9",),
    )
    text = format_status(status)
    assert "pid 42 DEAD: sleep 1000" in text
    assert "s1-h1 <-/-> s1-h2" in text
    assert "[namespace MISSING]" in text
    assert "mo-s1-h9" in text
    assert status.to_json()["processes"][0]["alive"] is False
