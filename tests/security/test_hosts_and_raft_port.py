"""A revoked host and garbage on the Raft port, against a real 3-host site on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite
from meshorch.state.peer_auth import PeerSigner, load_or_create_key
from tests.security.conftest import running_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    yield from running_site(tmp_path_factory, hosts=3, name="hosts")


async def test_a_huge_length_header_on_the_raft_port_stalls_nothing(
    site: LocalSite, admin: aiohttp.ClientSession
) -> None:
    """Before any password check, a 2 GiB length header and junk: the agent drops the
    connection instead of buffering, and keeps acknowledging writes at once."""
    host = site.members[0]
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", host.raft_port), timeout=5) as attacker:
        attacker.sendall(struct.pack("!i", 0x7FFFFFFF) + b"\xa5" * 65536)
        closed = False
        try:
            for _ in range(64):  # keep pushing junk until the agent hangs up
                attacker.sendall(b"\xa5" * 65536)
        except OSError:
            closed = True
        if not closed:
            attacker.settimeout(5)
            closed = attacker.recv(1) == b""
    assert closed and time.monotonic() - started < 5
    write_started = time.monotonic()
    async with admin.put(f"{host.url}/v1/kv/after-junk", data=b"ok") as response:
        assert response.status == 200, await response.text()
    assert time.monotonic() - write_started < 2


async def test_a_revoked_hosts_peer_key_opens_nothing(
    site: LocalSite, admin: aiohttp.ClientSession
) -> None:
    h1, h3 = site.members[0], site.members[2]
    path = "/v1/releases/" + "0" * 64
    h3_key = PeerSigner("h3", load_or_create_key(h3.data_dir))
    async with aiohttp.ClientSession() as peer:
        async with peer.get(h1.url + path, headers=h3_key.headers("GET", path)) as response:
            assert response.status == 404  # a member: through the gate, no such release
        async with admin.delete(f"{h1.url}/v1/members/h3") as response:
            assert response.status == 200, await response.text()
        site.stop_host(h3)
        deadline = time.monotonic() + 20
        while True:
            async with peer.get(h1.url + path, headers=h3_key.headers("GET", path)) as response:
                body = await response.json(content_type=None)
                if response.status == 401:
                    break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)
        assert body["error"]["code"] == "peer_only"
