"""Pulls under way in the site state, and the route peers follow them by (three real
agents, a real registry; lab test: root, podman, docker-registry, htpasswd).

A pull that fails after resolving leaves no record behind (else the leader would wait for
that host forever); ``GET /v1/images/partials/{digest}`` answers members' signed requests
only, with what the host has of a blob, from any offset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite
from meshorch.state.peer_auth import PeerSigner, load_or_create_key
from tests.agent.test_image_gc import call, make_site, registry_blobs
from tests.images.registry_fixtures import PASSWORD, USER, PushedImages, registry_with_images
from tests.labutil import require_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]
__all__ = ["make_site"]  # the fixture, shared


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


async def test_a_failed_pull_leaves_no_record_and_peers_follow_by_signature(
    make_site: Any, images: PushedImages, tmp_path: Path
) -> None:
    site: LocalSite = await make_site()
    h1, h2 = site.members[0], site.members[1]
    ref = f"{images.host}/lab/victim:1"
    blobs = await registry_blobs(images, "lab/victim:1")
    own_layer = max(blobs, key=lambda d: blobs[d] if images.storage_blob(d).exists() else -1)
    data = images.storage_blob(own_layer)
    original = data.read_bytes()
    body = {"ref": ref, "username": USER, "password": PASSWORD, "plain_http": True}
    async with site.session() as admin, aiohttp.ClientSession() as stranger:
        data.write_bytes(bytes(b ^ 0xFF for b in original))  # served under its digest
        try:
            async with admin.post(f"{h2.url}/v1/images/pull", json=body) as response:
                answer = await response.json()
                assert response.status == 502, answer
        finally:
            data.write_bytes(original)
        listed = await call(admin, "GET", f"{h1.url}/v1/images?consistency=linearizable")
        assert listed["images"] == [] and listed["pulling"] == [], listed

        await call(admin, "POST", f"{h2.url}/v1/images/pull", json=body)
        listed = await call(admin, "GET", f"{h2.url}/v1/images")
        assert [i["ref"] for i in listed["images"]] == [ref] and listed["pulling"] == []

        path = f"/v1/images/partials/{own_layer}"
        url = h2.url + path
        member = PeerSigner("h1", load_or_create_key(h1.data_dir))
        outsider = PeerSigner("h1", load_or_create_key(tmp_path / "not-a-member"))
        async with admin.post(f"{h1.url}/v1/access-tokens", json={"role": "viewer"}) as made:
            viewer = {"Authorization": f"Bearer {(await made.json())['token']}"}
        for headers, who in (
            ({}, "no credential"),
            (dict(admin.headers), "an admin token (no host)"),
            (viewer, "a viewer"),
            (dict(outsider.headers("GET", path)), "a key of no member"),
            (dict(member.headers("GET", "/v1/images/partials/sha256:" + "1" * 64)), "replayed"),
        ):
            async with stranger.get(url, headers=headers) as response:
                refused = await response.json()
                assert (response.status, refused["error"]["code"]) == (401, "peer_only"), who
        # A member asks for the rest from an offset, as a host following a pull does.
        headers = {**member.headers("GET", path), "Range": "bytes=100-"}
        async with stranger.get(url, headers=headers) as response:
            assert response.status == 206
            assert await response.read() == original[100:]
        bad = f"/v1/images/partials/sha256:{'z' * 64}"
        async with stranger.get(h2.url + bad, headers=member.headers("GET", bad)) as response:
            assert response.status == 400
        nothing = "/v1/images/partials/sha256:" + "2" * 64
        async with stranger.get(h2.url + nothing, headers=member.headers("GET", nothing)) as resp:
            assert resp.status == 404
