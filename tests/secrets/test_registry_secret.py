"""Registry credentials kept as a tenant's sealed secret: a pull names the secret, the
agent decrypts it for that registry only; an app's ``pull_secret`` lets the leader pull
the image by itself (lab test: podman pushes the images)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from meshorch.demo.localsite import LocalSite
from tests.images.registry_fixtures import PASSWORD, USER, PushedImages, registry_with_images
from tests.labutil import require_lab
from tests.secrets.helpers import Driver, new_site
from tests.waiting import until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory, images: PushedImages) -> Iterator[LocalSite]:
    """The secrets tests' site, told that the test registry speaks plain HTTP."""
    local = new_site(tmp_path_factory.mktemp("site"))
    local.extra_args = [*local.extra_args, "--plain-http-registry", images.host]
    local.start()
    try:
        yield local
    finally:
        local.stop()
        print(local.logs())


def credentials(registry: str, password: str = PASSWORD) -> bytes:
    return orjson.dumps({"registry": registry, "username": USER, "password": password})


async def test_a_pull_with_the_tenants_secret(driver: Driver, images: PushedImages) -> None:
    await driver.wait_ready()
    await driver.wait_unsealed()
    host = driver.hosts[0]
    await driver.put_secret("regcred", credentials(images.host), 1)
    await driver.put_secret("elsewhere", credentials("evil.example:5000"), 1)
    await driver.put_secret("garbage", b"alice:hunter2", 1)
    ref = f"{images.host}/lab/app:1"

    async def decrypted() -> bool:
        listed = (await driver.ok("GET", host, "/v1/secrets?consistency=local"))["secrets"]
        return sum(s["state"] == "ready" for s in listed) == 3

    await until("the secrets decrypted", decrypted)
    refused = [
        ({"ref": ref, "secret": "nothing", "plain_http": True}, 409, "secret_unavailable"),
        ({"ref": ref, "secret": "elsewhere", "plain_http": True}, 400, "bad_registry_secret"),
        ({"ref": ref, "secret": "garbage", "plain_http": True}, 400, "bad_registry_secret"),
        ({"ref": ref, "secret": "regcred", "username": USER, "password": "x"}, 400, "bad_request"),
        ({"ref": ref, "secret": "../x"}, 400, "bad_request"),
        ({"ref": ref, "secret": "regcred", "tenant": "Bad Tenant"}, 400, "bad_tenant"),
        ({"ref": ref, "secret": "regcred", "tenant": "acme", "plain_http": True}, 409,
         "secret_unavailable"),  # another tenant's secret of that name: none
    ]  # fmt: skip
    for body, status, code in refused:
        answer_status, answer = await driver.call("POST", host, "/v1/images/pull", body)
        assert (answer_status, answer["error"]["code"]) == (status, code), (body, answer)
    assert (await driver.ok("GET", host, "/v1/images"))["images"] == []

    body = {"ref": ref, "secret": "regcred", "plain_http": True}
    answer = await driver.ok("POST", host, "/v1/images/pull", body)
    assert answer["image"]["digest"] == images.digests["app"]
    assert answer["image"]["tenant"] == "default"
    assert PASSWORD not in orjson.dumps(answer).decode()


def app_spec(image: str, pull_secret: str) -> dict[str, object]:
    container = {"name": "main", "image": image, "command": ["sleep", "1000"],
                 "pull_secret": pull_secret,
                 "resources": {"memory_limit": "16Mi", "cpu_request": 0.1}}  # fmt: skip
    return {"api_version": "meshorch/v1", "name": "pulled", "version": "1",
            "services": [{"name": "s", "replicas": 3, "containers": [container]}]}  # fmt: skip


async def test_the_leader_pulls_an_apps_image_once_with_its_pull_secret(
    driver: Driver, images: PushedImages
) -> None:
    await driver.wait_ready()
    await driver.wait_unsealed()
    host = driver.hosts[0]
    digest = await asyncio.to_thread(images.push, "app:1", "lab/auto:1")
    await driver.put_secret("regcred", credentials(images.host), 1)
    await driver.put_secret("elsewhere", credentials("evil.example:5000"), 1)
    other = f"{images.host}/lab/base:1"
    await driver.apply_app(app_spec(other, "elsewhere"))  # the secret is not for it

    ref = f"{images.host}/lab/auto:1"
    spec = app_spec(ref, "regcred")
    spec["name"] = "pulled2"
    await driver.apply_app(spec)

    async def everywhere() -> bool:
        listed = (await driver.ok("GET", host, "/v1/images"))["images"]
        return any(i["ref"] == ref and len(i["holders"]) == 3 for i in listed)

    await until("the app's image pulled and on every host", everywhere)
    listed = (await driver.ok("GET", host, "/v1/images"))["images"]
    (image,) = [i for i in listed if i["ref"] == ref]
    assert image["digest"] == digest and image["source"] == f"{images.host}/lab/auto@{digest}"
    assert image["tenant"] == "default"  # pulled with its secret: its apps alone run it
    assert other not in [i["ref"] for i in listed]  # refused: no credentials for it
    pulled = 0
    for member in driver.hosts:
        pulled += (await driver.ok("GET", member, "/v1/images"))["local"]["pulled_bytes"]
    assert pulled == image["size"] - dict(map(tuple, image["blobs"]))[digest]  # once, by one
