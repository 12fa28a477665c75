"""Pure parts of the WireGuard reconciler: parsers, plan_changes, and the
adapter's command choices against a fake command runner."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from netmesh import (
    AddAddress,
    AddPeer,
    BackendUnavailableError,
    CreateInterface,
    InterfaceSpec,
    InterfaceState,
    PeerSpec,
    RemoveAddress,
    RemovePeer,
    SetListenPort,
    SetPrivateKey,
    SetUp,
    StateParseError,
    UpdatePeer,
    WireGuardError,
    WireGuardInterface,
    generate_keypair,
    interface_state,
    parse_ip_addr_json,
    parse_wg_dump,
    plan_changes,
)
from netmesh.wireguard import CommandResult

PRIV = "YMstgU826/OqvnRJ7pzpaGvppPrOifNncPngYeebwn8="
PUB = "RmcpwTncNqPK+Objxdwxbn6DUvDwsM4LUOjtjGcJgVk="
PEER1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PEER2 = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="
PSK = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="

SAMPLE_DUMP = (
    f"{PRIV}\t{PUB}\t51820\toff\n"
    f"{PEER1}\t(none)\t192.168.77.2:51821\t10.99.0.3/32\t1732770000\t1184\t1500\toff\n"
    f"{PEER2}\t{PSK}\t(none)\t10.99.0.4/32,10.50.0.0/24\t0\t0\t0\t25\n"
)

SAMPLE_IP = json.dumps(
    [
        {
            "ifindex": 5,
            "ifname": "wg0",
            "flags": ["POINTOPOINT", "MULTICAST", "NOARP", "UP", "LOWER_UP"],
            "mtu": 1420,
            "addr_info": [
                {"family": "inet", "local": "10.99.0.2", "prefixlen": 16, "scope": "global"},
                {"family": "inet6", "local": "fe80::2eb4:3c72:96f:362a", "prefixlen": 64},
            ],
        }
    ]
)


def spec(peers: tuple[PeerSpec, ...] = (), **kw: object) -> InterfaceSpec:
    base = InterfaceSpec(
        name="wg0",
        private_key_b64=PRIV,
        listen_port=51820,
        address_cidr="10.99.0.2/16",
        peers=peers,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


P1 = PeerSpec(PEER1, "192.168.77.2:51821", ("10.99.0.3/32",))
P2 = PeerSpec(PEER2, None, ("10.50.0.0/24", "10.99.0.4/32"), 25)


def current() -> InterfaceState:
    return interface_state("wg0", SAMPLE_DUMP, SAMPLE_IP)


# ------------------------------------------------------------------ parsers


def test_parse_wg_dump() -> None:
    dump = parse_wg_dump(SAMPLE_DUMP)
    assert dump.private_key_b64 == PRIV
    assert dump.public_key_b64 == PUB
    assert dump.listen_port == 51820
    assert dump.fwmark is None
    assert PRIV not in repr(dump)
    p1, p2 = dump.peers
    assert p1.public_key == PEER1
    assert p1.endpoint == "192.168.77.2:51821"
    assert p1.allowed_ips == ("10.99.0.3/32",)
    assert p1.latest_handshake_s == 1732770000
    assert (p1.rx_bytes, p1.tx_bytes) == (1184, 1500)
    assert p1.persistent_keepalive_s is None
    assert not p1.has_preshared_key
    assert p2.endpoint is None
    assert p2.allowed_ips == ("10.50.0.0/24", "10.99.0.4/32")
    assert p2.persistent_keepalive_s == 25
    assert p2.has_preshared_key


def test_parse_wg_dump_fresh_interface() -> None:
    dump = parse_wg_dump("(none)\t(none)\t0\t0x2a\n")
    assert dump.private_key_b64 is None and dump.public_key_b64 is None
    assert dump.fwmark == 42
    assert dump.peers == ()


def test_parse_wg_dump_ipv6_endpoint_and_no_allowed_ips() -> None:
    dump = parse_wg_dump(
        f"{PRIV}\t{PUB}\t1\toff\n{PEER1}\t(none)\t[fd00::1]:9\t(none)\t0\t0\t0\toff\n"
    )
    assert dump.peers[0].endpoint == "[fd00::1]:9"
    assert dump.peers[0].allowed_ips == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a\tb\tc\n",
        f"{PRIV}\t{PUB}\tport\toff\n",
        f"{PRIV}\t{PUB}\t1\toff\n{PEER1}\t(none)\n",
        f"{PRIV}\t{PUB}\t1\toff\n{PEER1}\t(none)\tnope\t(none)\t0\t0\t0\toff\n",
        f"{PRIV}\t{PUB}\t1\toff\n{PEER1}\t(none)\t(none)\t(none)\tx\t0\t0\toff\n",
    ],
)
def test_parse_wg_dump_rejects_garbage(text: str) -> None:
    with pytest.raises(StateParseError):
        parse_wg_dump(text)


def test_parse_ip_addr_json() -> None:
    info = parse_ip_addr_json(SAMPLE_IP)
    assert info.addresses == ("10.99.0.2/16",)  # link-local fe80:: ignored
    assert info.is_up
    down = json.loads(SAMPLE_IP)
    down[0]["flags"] = ["POINTOPOINT", "NOARP"]
    down[0]["addr_info"] = []
    info = parse_ip_addr_json(json.dumps(down))
    assert info.addresses == () and not info.is_up


@pytest.mark.parametrize("text", ["", "{}", "[]", '[{"addr_info": [{"local": "x"}]}]'])
def test_parse_ip_addr_json_rejects_garbage(text: str) -> None:
    with pytest.raises(StateParseError):
        parse_ip_addr_json(text)


# ------------------------------------------------------------------ specs


def test_peer_spec_normalizes() -> None:
    a = PeerSpec(PEER1, "192.168.77.2:51821", ("10.99.0.3/32", "10.1.2.3/24"))
    b = PeerSpec(PEER1, "192.168.77.2:051821", ("10.1.2.0/24", "10.99.0.3/32"))
    assert a == b
    assert a.allowed_ips == ("10.1.2.0/24", "10.99.0.3/32")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"public_key": "nope"},
        {"endpoint": "host.example:51820"},
        {"endpoint": "10.0.0.1"},
        {"endpoint": "10.0.0.1:0"},
        {"allowed_ips": ("10.0.0.0/33",)},
        {"persistent_keepalive_s": 0},
    ],
)
def test_peer_spec_rejects(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"public_key": PEER1, **kwargs}
    with pytest.raises(WireGuardError):
        PeerSpec(**args)  # type: ignore[arg-type]


def test_interface_spec_rejects() -> None:
    with pytest.raises(WireGuardError):
        spec(name="a-name-that-is-too-long")
    with pytest.raises(WireGuardError):
        spec(peers=(P1, P1))
    with pytest.raises(WireGuardError):
        spec(peers=(PeerSpec(PUB),))  # itself
    with pytest.raises(WireGuardError):
        spec(address_cidr="10.99.0.300/16")
    with pytest.raises(WireGuardError):
        spec(private_key_b64="short")
    assert PRIV not in repr(spec())


# ------------------------------------------------------------------ plan_changes


def test_plan_from_nothing() -> None:
    plan = plan_changes(None, spec(peers=(P1, P2)))
    assert plan == [
        CreateInterface("wg0"),
        SetPrivateKey("wg0", PRIV),
        SetListenPort("wg0", 51820),
        AddPeer("wg0", P1),
        AddPeer("wg0", P2),
        AddAddress("wg0", "10.99.0.2/16"),
        SetUp("wg0"),
    ]
    assert PRIV not in repr(plan)


def test_plan_is_empty_when_equal() -> None:
    assert plan_changes(current(), spec(peers=(P1, P2))) == []
    assert plan_changes(current(), spec(peers=(P2, P1))) == []  # order is irrelevant


def test_plan_adds_peer() -> None:
    state = replace(current(), peers=current().peers[:1])
    assert plan_changes(state, spec(peers=(P1, P2))) == [AddPeer("wg0", P2)]


def test_plan_removes_peer() -> None:
    assert plan_changes(current(), spec(peers=(P2,))) == [RemovePeer("wg0", PEER1)]
    # Removals come in key order so the plan is deterministic.
    expected = [RemovePeer("wg0", k) for k in sorted((PEER1, PEER2))]
    assert plan_changes(current(), spec()) == expected


@pytest.mark.parametrize(
    "changed",
    [
        replace(P1, allowed_ips=("10.99.0.3/32", "10.60.0.0/16")),
        replace(P1, endpoint="192.168.77.9:51821"),
        replace(P1, persistent_keepalive_s=15),
    ],
)
def test_plan_updates_changed_peer(changed: PeerSpec) -> None:
    assert plan_changes(current(), spec(peers=(changed, P2))) == [UpdatePeer("wg0", changed)]


def test_plan_ignores_learnt_endpoint_when_none_desired() -> None:
    assert plan_changes(current(), spec(peers=(replace(P1, endpoint=None), P2))) == []


def test_plan_keepalive_removed_is_an_update() -> None:
    p2 = replace(P2, persistent_keepalive_s=None)
    assert plan_changes(current(), spec(peers=(P1, p2))) == [UpdatePeer("wg0", p2)]


def test_plan_changes_address_key_port_and_up() -> None:
    other = generate_keypair().private_key_b64
    state = replace(current(), is_up=False)
    plan = plan_changes(
        state,
        spec(peers=(P1, P2), private_key_b64=other, listen_port=5000, address_cidr="10.99.0.9/16"),
    )
    assert plan == [
        SetPrivateKey("wg0", other),
        SetListenPort("wg0", 5000),
        RemoveAddress("wg0", "10.99.0.2/16"),
        AddAddress("wg0", "10.99.0.9/16"),
        SetUp("wg0"),
    ]


def test_plan_listen_port_zero_is_not_compared() -> None:
    assert plan_changes(current(), spec(peers=(P1, P2), listen_port=0)) == []


# ------------------------------------------------------------------ adapter, fake runner


class FakeRunner:
    """Records argv; answers from a small table of outcomes."""

    def __init__(self, *, kernel: bool, userspace: bool) -> None:
        self.kernel = kernel
        self.userspace = userspace
        self.link = False
        self.calls: list[tuple[list[str], bytes | None, Mapping[str, str] | None]] = []

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        input_bytes: bytes | None,
        env: Mapping[str, str] | None,
        timeout_s: float,
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append((argv, input_bytes, env))
        cmd = argv[4:] if argv[:3] == ["ip", "netns", "exec"] else argv
        if cmd[:3] == ["ip", "-j", "addr"] or cmd[:3] == ["ip", "link", "show"]:
            if not self.link:
                return CommandResult(1, "", 'Device "wgt" does not exist.\n')
            return CommandResult(0, SAMPLE_IP.replace('"UP", ', ""), "")
        if cmd[:3] == ["ip", "link", "add"]:
            if self.kernel:
                self.link = True
                return CommandResult(0, "", "")
            return CommandResult(2, "", "Error: Unknown device type.\n")
        if cmd[-1] == "wgt" and cmd[0].endswith("wireguard-go"):
            if self.userspace:
                self.link = True
                return CommandResult(0, "", "banner\n")
            return CommandResult(1, "", "banner\nERROR: Failed to create TUN device\n")
        return CommandResult(0, "", "")


async def test_adapter_falls_back_to_wireguard_go_and_hides_key() -> None:
    runner = FakeRunner(kernel=False, userspace=True)
    iface = WireGuardInterface(
        "wgt", netns="mtns", wireguard_go="/usr/bin/wireguard-go", runner=runner
    )
    desired = InterfaceSpec("wgt", PRIV, 51820, "10.99.0.2/16", (P1,))
    applied = await iface.reconcile(desired)
    assert applied[0] == CreateInterface("wgt")
    assert iface.backend == "userspace"
    for argv, _input, _env in runner.calls:
        assert argv[:4] == ["ip", "netns", "exec", "mtns"]
        assert PRIV not in " ".join(argv)
    key_calls = [c for c in runner.calls if "private-key" in c[0]]
    assert len(key_calls) == 1
    assert key_calls[0][0][-1] == "/dev/stdin"
    assert key_calls[0][1] == (PRIV + "\n").encode()
    go_calls = [c for c in runner.calls if c[0][4] == "/usr/bin/wireguard-go"]
    assert go_calls and go_calls[0][2] is not None and "LOG_LEVEL" not in go_calls[0][2]
    peer_calls = [c[0][4:] for c in runner.calls if "peer" in c[0]]
    assert peer_calls == [
        [
            "wg",
            "set",
            "wgt",
            "peer",
            PEER1,
            "endpoint",
            "192.168.77.2:51821",
            "allowed-ips",
            "10.99.0.3/32",
            "persistent-keepalive",
            "off",
        ]
    ]


async def test_adapter_prefers_kernel() -> None:
    runner = FakeRunner(kernel=True, userspace=True)
    iface = WireGuardInterface("wgt", wireguard_go="/usr/bin/wireguard-go", runner=runner)
    await iface.apply([CreateInterface("wgt")])
    assert iface.backend == "kernel"
    assert not any(c[0][0].endswith("wireguard-go") for c in runner.calls)


async def test_adapter_reports_no_backend() -> None:
    runner = FakeRunner(kernel=False, userspace=False)
    iface = WireGuardInterface("wgt", wireguard_go="/usr/bin/wireguard-go", runner=runner)
    with pytest.raises(BackendUnavailableError) as info:
        await iface.apply([CreateInterface("wgt")])
    assert "Unknown device type" in str(info.value)
    assert "Failed to create TUN device" in str(info.value)


async def test_adapter_rejects_spec_for_other_interface() -> None:
    iface = WireGuardInterface("wgt", runner=FakeRunner(kernel=True, userspace=False))
    with pytest.raises(WireGuardError):
        await iface.reconcile(spec())


async def test_adapter_state_none_when_link_missing() -> None:
    iface = WireGuardInterface("wgt", runner=FakeRunner(kernel=True, userspace=False))
    assert await iface.state() is None
