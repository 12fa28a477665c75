"""The cluster password changes while real pysyncobj nodes run: the rolling steps keep every
write flowing, and afterwards a peer that only knows the old password is dropped unheard."""

import asyncio
import os
import pickle
import socket
import struct
import zlib
from pathlib import Path

from pysyncobj.encryptor import getEncryptor

from raft import Put, RaftNode

from .test_limits import started
from .test_node import PASSWORD, make_nodes, wait_for

NEW_PASSWORD = "the-next-password-9876543210"


async def write_everywhere(nodes: list[RaftNode], key: bytes) -> None:
    """A write through each node, seen by every node: the cluster is whole."""
    for i, node in enumerate(nodes):
        (result,) = await node.propose([Put("kv", key + b"/%d" % i, b"1")])
        assert result.ok
    await wait_for(
        lambda: all(n.view.get("kv", key + b"/%d" % i) for n in nodes for i in range(len(nodes))),
        timeout_s=10,
    )


def greeting_answered(address: str, password: str) -> bool:
    """Open a Raft connection as a peer would (its random key, encrypted with ``password``);
    True when the node answers with its own key, False when it hangs up unheard."""
    host, _, port = address.rpartition(":")
    data = getEncryptor(password).encrypt(zlib.compress(pickle.dumps(os.urandom(32)), 3))
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack("i", len(data)) + data)
        try:
            return len(sock.recv(4)) == 4
        except ConnectionResetError:
            return False


async def test_a_rolling_password_change_keeps_writes_flowing_and_shuts_out_the_old_one(
    tmp_path: Path,
) -> None:
    nodes = await started(make_nodes(tmp_path, 3))
    try:
        await wait_for(lambda: all(len(n.reachable()) == 3 for n in nodes))
        target = nodes[1].config.self_address
        assert await asyncio.to_thread(greeting_answered, target, PASSWORD)
        assert not await asyncio.to_thread(greeting_answered, target, NEW_PASSWORD)

        steps = [(PASSWORD, [NEW_PASSWORD]), (NEW_PASSWORD, [PASSWORD]), (NEW_PASSWORD, [])]
        for step, (send, also) in enumerate(steps):
            # One node at a time: between two nodes' changes the cluster is mixed.
            for node in nodes:
                await node.use_passwords(send, also)
                await write_everywhere(nodes, f"step{step}/{node.config.data_dir.name}".encode())
            assert all(n.passwords() == (send, (send, *also)) for n in nodes)

        assert await asyncio.to_thread(greeting_answered, target, NEW_PASSWORD)
        assert not await asyncio.to_thread(greeting_answered, target, PASSWORD)
        await write_everywhere(nodes, b"after")
    finally:
        for node in nodes:
            await node.stop()


async def test_a_node_that_skips_the_steps_is_cut_off_until_it_takes_them(
    tmp_path: Path,
) -> None:
    nodes = await started(make_nodes(tmp_path, 3))
    try:
        await wait_for(lambda: all(len(n.reachable()) == 3 for n in nodes))
        follower = next(n for n in nodes if not n.status().is_leader)
        others = [n for n in nodes if n is not follower]
        await follower.use_passwords(NEW_PASSWORD)  # the new one only, nobody else has it
        await wait_for(lambda: len(follower.reachable()) == 1, timeout_s=10)
        (result,) = await others[0].propose([Put("kv", b"while-cut", b"1")])
        assert result.ok
        await asyncio.sleep(0.5)
        assert follower.view.get("kv", b"while-cut") is None

        await follower.use_passwords(NEW_PASSWORD, [PASSWORD])  # heard again, sends new
        await asyncio.sleep(1.0)
        assert follower.view.get("kv", b"while-cut") is None  # the others accept only old
        await follower.use_passwords(PASSWORD, [NEW_PASSWORD])  # the first step
        await wait_for(lambda: follower.view.get("kv", b"while-cut") is not None, timeout_s=10)
        await write_everywhere(nodes, b"whole")
    finally:
        for node in nodes:
            await node.stop()
