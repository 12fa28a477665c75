"""Registry credentials kept as a tenant's sealed secret: a pull names the secret, the
agent decrypts it for that registry only (lab test: podman pushes the images)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.images.registry_fixtures import PASSWORD, USER, PushedImages, registry_with_images
from tests.labutil import require_lab
from tests.secrets.helpers import Driver
from tests.waiting import until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


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
    assert PASSWORD not in orjson.dumps(answer).decode()
