"""``meshorch image pull`` on a site of three agents, from a real registry (lab test:
root, podman, docker-registry, htpasswd): one host pulls and pins the digest, the others
copy that digest from their peers, whatever the tag says later."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite
from tests.images.registry_fixtures import PASSWORD, USER, PushedImages, registry_with_images
from tests.labutil import require_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


async def catalog(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/v1/images") as response:
        assert response.status == 200
        return dict(await response.json())


async def pull_cli(
    api: str, ref: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "meshorch", "image", "pull", "--plain-http",
               "--username", USER, "--password-stdin", ref, "--agent", api]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, command, input=password + "\n", capture_output=True, text=True, timeout=120
    )


async def test_one_host_pulls_the_others_copy_the_pinned_digest(
    ready_site: LocalSite, session: aiohttp.ClientSession, images: PushedImages
) -> None:
    first = ready_site.members[0]
    ref = f"{images.host}/lab/moving:1"
    digest = await asyncio.to_thread(images.push, "app:1", "lab/moving:1")
    pulled = await pull_cli(first.api, ref)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{images.host}/lab/moving@{digest}" in pulled.stdout
    # The tag moves on at the registry; the site keeps the digest it resolved.
    moved = await asyncio.to_thread(images.push, "base:1", "lab/moving:1")
    assert moved != digest

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (image,) = (await catalog(session, first.url))["images"]
        if sorted(image["holders"]) == ["h1", "h2", "h3"]:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"not every host holds the image: {image}")
    assert image["ref"] == ref and image["kind"] == "oci"
    assert image["digest"] == digest and image["source"] == f"{images.host}/lab/moving@{digest}"
    blobs = {d: n for d, n in image["blobs"]}
    assert image["size"] == sum(blobs.values()) and len(blobs) == 4  # manifest, config, 2 layers

    pulled_bytes = fetched = 0
    for host in ready_site.members:
        counters = (await catalog(session, host.url))["local"]
        pulled_bytes += counters["pulled_bytes"]
        fetched += counters["fetched_bytes"]
        store = host.data_dir / "images" / "blobs" / "sha256"
        for blob, size in blobs.items():
            assert (store / blob.removeprefix("sha256:")).stat().st_size == size, host.host_id
    # The manifest came as a document (not a blob download); everything else once from the
    # registry, to h1, and twice inside the site.
    assert pulled_bytes == image["size"] - blobs[digest]
    assert fetched == 2 * image["size"]


async def test_pull_refusals_are_clear_and_change_nothing(
    ready_site: LocalSite, session: aiohttp.ClientSession, images: PushedImages
) -> None:
    first = ready_site.members[0]
    wrong = await pull_cli(first.api, f"{images.host}/lab/app:1", password="wrong")
    assert wrong.returncode != 0 and "registry_auth" in wrong.stderr, wrong.stderr
    assert "refused the credentials" in wrong.stderr
    url = first.url + "/v1/images/pull"
    cases: list[tuple[object, int, str]] = [
        ({"ref": "Not A Ref!"}, 400, "bad_image_reference"),
        ({"ref": f"{images.host}/lab/app:1", "plain_http": "yes"}, 400, "bad_request"),
        ({"ref": f"{images.host}/lab/app:1", "username": USER}, 400, "bad_request"),
        (
            {
                "ref": f"{images.host}/lab/nothing:1",
                "username": USER,
                "password": PASSWORD,
                "plain_http": True,
            },
            502,
            "image_not_found",
        ),
        ({"ref": f"{images.host}/lab/app:1", "plain_http": True}, 502, "registry_auth"),
        ({"ref": "127.0.0.1:1/lab/app:1", "plain_http": True}, 502, "registry_unavailable"),
        ({"ref": "x" * 20_000}, 413, "too_large"),
    ]
    for body, status, code in cases:
        async with session.post(url, json=body) as response:
            answer = await response.json()
            assert (response.status, answer["error"]["code"]) == (status, code), (body, answer)
    assert (await catalog(session, first.url))["images"] == []
