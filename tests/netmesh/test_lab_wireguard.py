"""Lab: two namespaces build a real WireGuard tunnel with WireGuardInterface."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from netmesh import (
    CreateInterface,
    InterfaceSpec,
    PeerSpec,
    RemovePeer,
    WireGuardInterface,
    generate_keypair,
)
from tests.labutil import require_lab
from tests.netmesh.labnet import LabNet, ping_argv, run

pytestmark = pytest.mark.lab


async def ping(ns: str, address: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *ping_argv(ns, address, 2),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30) == 0


async def ping_until(ns: str, address: str, timeout_s: float) -> None:
    # The first packets trigger the handshake; give a slow, shared machine time.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await ping(ns, address):
            return
    raise AssertionError(f"no ping reply from {address} in {ns} within {timeout_s} s")


async def test_two_hosts_handshake_ping_and_converge(labnet: LabNet) -> None:
    require_lab("wg", "wireguard-go")
    ns_a, ns_b = labnet.netns("a"), labnet.netns("b")
    labnet.veth(ns_a, "192.168.77.1/24", ns_b, "192.168.77.2/24", "v")
    key_a, key_b = generate_keypair(), generate_keypair()
    if_a, if_b = labnet.name("wa"), labnet.name("wb")
    spec_a = InterfaceSpec(
        if_a,
        key_a.private_key_b64,
        51820,
        "10.99.0.2/16",
        (PeerSpec(key_b.public_key_b64, "192.168.77.2:51821", ("10.99.0.3/32",)),),
    )
    # B has no endpoint for A: it learns it from A's handshake (roaming).
    spec_b = InterfaceSpec(
        if_b,
        key_b.private_key_b64,
        51821,
        "10.99.0.3/16",
        (PeerSpec(key_a.public_key_b64, None, ("10.99.0.2/32",), 25),),
    )
    wg_a = WireGuardInterface(if_a, netns=ns_a)
    wg_b = WireGuardInterface(if_b, netns=ns_b)
    try:
        applied = await wg_a.reconcile(spec_a)
        assert applied[0] == CreateInterface(if_a)
        await wg_b.reconcile(spec_b)
        assert wg_a.backend in ("kernel", "userspace")

        await ping_until(ns_a, "10.99.0.3", timeout_s=60)
        assert await ping(ns_b, "10.99.0.2")

        status_a = await wg_a.peers_status()
        peer_b = status_a[key_b.public_key_b64]
        assert peer_b.latest_handshake_s is not None
        assert peer_b.endpoint == "192.168.77.2:51821"
        status_b = await wg_b.peers_status()
        assert status_b[key_a.public_key_b64].endpoint == "192.168.77.1:51820"

        # Converged: same spec again, nothing to do.
        assert await wg_a.reconcile(spec_a) == []
        assert await wg_b.plan(spec_b) == []

        # Dropping the peer from the spec removes it from the interface.
        applied = await wg_a.reconcile(replace(spec_a, peers=()))
        assert applied == [RemovePeer(if_a, key_b.public_key_b64)]
        shown = run(["ip", "netns", "exec", ns_a, "wg", "show", if_a, "peers"]).stdout
        assert shown.strip() == ""
        assert await wg_a.peers_status() == {}
        assert not await ping(ns_a, "10.99.0.3")
    finally:
        await wg_a.delete()
        await wg_b.delete()

    assert await wg_a.state() is None
    assert await wg_b.state() is None
    await wg_a.delete()  # idempotent
    # Deleting the link ends a wireguard-go daemon: nothing is left running.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while labnet.pids(ns_a) or labnet.pids(ns_b):
        assert loop.time() < deadline, "wireguard-go still running after delete()"
        await asyncio.sleep(0.2)
