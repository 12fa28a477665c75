"""``NetnsForward``: a port here relayed to a server inside a namespace (root)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Iterator

import pytest

from meshorch.lab.forward import NetnsForward
from meshorch.net.netns import in_netns
from tests.labutil import require_lab
from tests.netmesh.labnet import LabNet

pytestmark = pytest.mark.lab


@pytest.fixture
def netns() -> Iterator[str]:
    require_lab()
    net = LabNet()
    try:
        yield net.netns("fw")
    finally:
        net.cleanup()


def listener_in(netns: str) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock

    sock = in_netns(netns, make)
    sock.setblocking(False)
    return sock


async def test_bytes_go_both_ways_with_half_close(netns: str) -> None:
    listener = listener_in(netns)
    port = listener.getsockname()[1]

    async def digest_back(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads to the client's EOF (its half-close must come through), answers the digest.
        data = await reader.read()
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(digest_back, sock=listener)
    payload = os.urandom(5 * 1024 * 1024)
    async with server, NetnsForward("127.0.0.1", 0, netns, "127.0.0.1", port) as forward:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", forward.listen_port)
            writer.write(payload)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert answer.decode() == hashlib.sha256(payload).hexdigest()


async def test_the_target_is_inside_the_namespace_only(netns: str) -> None:
    # The same address and port here has no listener (the namespace's loopback is its own).
    listener = listener_in(netns)
    port = listener.getsockname()[1]
    server = await asyncio.start_server(lambda r, w: w.close(), sock=listener)
    async with server:
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_a_refusing_target_closes_the_client_and_the_forward_goes_on(netns: str) -> None:
    async with NetnsForward("127.0.0.1", 0, netns, "127.0.0.1", 9) as forward:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", forward.listen_port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()


async def test_a_taken_port_is_named_in_the_error(netns: str) -> None:
    async with NetnsForward("127.0.0.1", 0, netns, "127.0.0.1", 9) as first:
        clash = NetnsForward("127.0.0.1", first.listen_port, netns, "127.0.0.1", 9)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.listen_port}"):
            await clash.start()
