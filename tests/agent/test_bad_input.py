"""Malformed requests and garbage on the Raft port: clear errors, nothing changes."""

import asyncio
import contextlib
import os
import random
import socket
import struct
import zlib
from pathlib import Path

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.state.tables import MAX_VALUE_BYTES


async def all_keys(session: aiohttp.ClientSession, site: LocalSite) -> list[list[str]]:
    listings = []
    for host in site.members:
        async with session.get(f"{host.url}/v1/kv/?limit=10000") as response:
            assert response.status == 200
            listings.append((await response.json())["keys"])
    return listings


BAD_REQUESTS = [
    ("PUT", "/v1/kv/%00nul", b"x", 400, "bad_key"),
    ("PUT", "/v1/kv/" + "k" * 600, b"x", 400, "bad_key"),
    ("PUT", "/v1/kv//leading-slash", b"x", 400, "bad_key"),
    ("PUT", "/v1/kv/big", b"x" * (MAX_VALUE_BYTES + 1), 413, "value_too_large"),
    ("PUT", "/v1/kv/k?expect_index=-3", b"x", 400, "bad_expect_index"),
    ("GET", "/v1/kv/k?consistency=eventual", b"", 400, "bad_consistency"),
    ("GET", "/v1/kv/?limit=0", b"", 400, "bad_limit"),
    ("GET", "/v1/kv/?limit=abc", b"", 400, "bad_limit"),
    # A YAML spec with a control character: refused as the YAML reader is built (was 500).
    ("POST", "/v1/apps", b"name: a\x01b\n", 400, "bad_spec"),
    ("POST", "/v1/members", b"{not json", 400, "bad_json"),
    ("POST", "/v1/members", b"[1, 2]", 400, "bad_request"),
    ("POST", "/v1/members", b'{"host_id": "Bad_Id!", "raft": "nowhere"}', 400, "bad_request"),
    ("POST", "/v1/members", b'{"host_id": "h9", "raft": "1.2.3.4:5", "x": 1}', 400, "bad_request"),
    ("POST", "/v1/members", b'{"host_id": "h1", "raft": "127.0.0.1:1"}', 409, "host_id_taken"),
    ("DELETE", "/v1/members/nobody", b"", 404, "not_found"),
    ("DELETE", "/v1/members/NOT..valid", b"", 400, "bad_host_id"),
    ("GET", "/v1/nothing-here", b"", 404, "not_found"),
    ("PATCH", "/v1/kv/k", b"", 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method, path, body, status, code", BAD_REQUESTS)
async def test_bad_requests_get_a_json_error_and_change_nothing(
    ready_site: LocalSite,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes,
    status: int,
    code: str,
) -> None:
    host = ready_site.members[0]
    async with session.put(f"{host.url}/v1/kv/keep", data=b"me") as response:
        assert response.status == 200
    before = await all_keys(session, ready_site)
    async with session.request(method, f"{host.url}{path}", data=body) as response:
        assert response.status == status, await response.text()
        error = (await response.json())["error"]
    assert error["code"] == code and error["message"]
    assert await all_keys(session, ready_site) == before == [["keep"]] * 3


async def test_compare_and_set_conflict_is_409_and_keeps_the_value(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = f"{ready_site.members[1].url}/v1/kv/cas"
    async with session.put(url + "?expect_index=0", data=b"first") as response:
        index = (await response.json())["index"]
    async with session.put(url + "?expect_index=0", data=b"second") as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "conflict"
    async with session.put(f"{url}?expect_index={index}", data=b"third") as response:
        assert response.status == 200
    async with session.get(url) as response:
        assert await response.read() == b"third"


def pysyncobj_frame(message: bytes) -> bytes:
    """A frame as unencrypted pysyncobj reads it: length, then zlib of a pickle.
    Without the cluster password this pickle would run ``touch`` on the agent."""
    data = zlib.compress(message)
    return struct.pack("i", len(data)) + data


def garbage_payloads(marker: Path) -> list[bytes]:
    rng = random.Random(11)
    payloads = [
        b"",
        b"\x00" * 64,
        b"\xff\xff\xff\x7f" + b"A" * 100,  # claims a 2 GiB message
        b"\x10\x00\x00\x00" + os.urandom(16),  # a plausible frame of random bytes
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x80\x04\x95" + b"cos\nsystem\n(S'touch /tmp/pwned'\ntR." * 3,  # a pickle
    ]
    payloads += [
        bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096))) for _ in range(30)
    ]
    return payloads


def blast(address: str, payloads: list[bytes]) -> None:
    host, _, port = address.rpartition(":")
    for payload in payloads:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as sock:
                sock.sendall(payload)
                sock.settimeout(0.2)
                with contextlib.suppress(OSError):
                    sock.recv(1024)
        except OSError:
            pass


async def test_garbage_on_the_raft_port_changes_and_crashes_nothing(
    ready_site: LocalSite, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    site = ready_site
    async with session.put(f"{site.members[0].url}/v1/kv/before", data=b"1") as response:
        assert response.status == 200
    before = await all_keys(session, site)
    marker = tmp_path / "pwned"
    payloads = garbage_payloads(marker)
    await asyncio.gather(*(asyncio.to_thread(blast, h.raft, payloads) for h in site.members))
    for host in site.members:
        assert host.process is not None and host.process.poll() is None, "agent died"
    assert not marker.exists()
    await wait_ready(session, site.members)
    assert await all_keys(session, site) == before
    async with session.put(f"{site.members[2].url}/v1/kv/after", data=b"2") as response:
        assert response.status == 200  # still serving writes
