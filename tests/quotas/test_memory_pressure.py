"""Run time: two tenants' apps on one host, one of them over its memory limit.

The container limits (``memory_limit``) hold each instance to its share: the one whose
container goes over its limit is stopped and held in restart backoff (its status says
so), the other tenant's instance keeps running and ready. Process runtime (RLIMIT_AS:
the allocation fails) and podman with runc (the cgroup limit: the kernel kills it).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshorch.apps.settings import WorkloadSettings, podman_dirs
from meshorch.net.app_network import NetworkSettings
from meshorch.runtime import BUSYBOX_IMAGE_REF, PodmanRuntime, build_busybox_rootfs
from meshorch.site.agent import Agent
from tests.agent_token import HEADERS
from tests.labutil import require_lab
from tests.quotas.test_agent_quotas import MI, Site, agent_config, spec
from tests.waiting import until

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
# busybox dd allocates its whole block at once: 256 MiB is far over a 64 MiB limit.
HOG = ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]


@pytest.fixture(
    params=["process", pytest.param("podman", marks=[pytest.mark.lab, pytest.mark.timeout(300)])]
)
async def runtime_site(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Site, str]]:
    """The agent, and the image its apps use."""
    runtime: str = request.param
    if runtime == "podman":
        require_lab("podman", "runc")
    elif not Path(BUSYBOX).exists():
        pytest.skip("needs busybox (its dd allocates at once)")
    config = agent_config(tmp_path)
    settings = WorkloadSettings(runtime=runtime, cpu_millis=4000, memory_bytes=4096 * MI)
    try:
        async with (
            # On this machine's own network: no isolation chains left behind in it.
            Agent(config, None, settings, NetworkSettings(isolate_tenants=False)) as agent,
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=120), headers=HEADERS
            ) as session,
        ):
            site = Site(agent, session)

            async def ready() -> bool:
                status, _ = await site.call("GET", "/v1/apps")
                return status == 200

            await until("the agent answers", ready, 30)
            image = "process"
            if runtime == "podman":
                rootfs = build_busybox_rootfs(tmp_path / "busybox-rootfs.tar")
                async with session.post(
                    f"{site.base}/v1/images?ref={BUSYBOX_IMAGE_REF}", data=rootfs.read_bytes()
                ) as response:
                    assert response.status == 200, await response.text()
                image = BUSYBOX_IMAGE_REF
            yield site, image
    finally:
        if runtime == "podman":
            await PodmanRuntime(*podman_dirs(config.data_dir)).purge()


def app(name: str, image: str, command: list[str]) -> dict[str, Any]:
    body = spec(name, replicas=1, memory="64Mi", command=command)
    body["services"][0]["containers"][0]["image"] = image
    return body


async def test_the_instance_over_its_memory_limit_is_held_the_other_runs(
    runtime_site: tuple[Site, str],
) -> None:
    site, image = runtime_site
    prefix = [BUSYBOX] if image == "process" else []
    for tenant in ("acme", "globex"):
        status, _ = await site.call("PUT", f"/v1/quotas/{tenant}", {"memory_bytes": 128 * MI})
        assert status == 200
    status, body = await site.call("POST", "/v1/apps?tenant=acme", app("hog", image, prefix + HOG))
    assert status == 200, body
    calm = app("calm", image, [*prefix, "sleep", "100000"])
    status, body = await site.call("POST", "/v1/apps?tenant=globex", calm)
    assert status == 200, body

    async def hog_held() -> dict[str, Any] | None:
        (instance,) = (await site.app("hog"))["instances"]
        held = instance["state"] == "backoff" and instance["restarts"] >= 1
        return instance if held and "exited with" in instance["message"] else None

    hog = await until("the hog stopped and held in backoff", hog_held, 90)
    assert not hog["ready"]
    # The process runtime refuses the allocation (dd exits 1); under podman the kernel
    # kills the container at its cgroup limit (SIGKILL: 137).
    code = 1 if image == "process" else 137
    assert f"exited with {code}; restart in" in hog["message"], hog

    (neighbour,) = (await site.app("calm"))["instances"]
    assert neighbour["state"] == "running" and neighbour["restarts"] == 0
    # Still so a while later (the hog has been restarted and refused again meanwhile).
    await until("the hog restarted again", _restarted_again(site, hog["restarts"]), 60)
    (neighbour,) = (await site.app("calm"))["instances"]
    assert neighbour["state"] == "running" and neighbour["restarts"] == 0
    assert neighbour["ready"]


def _restarted_again(site: Site, restarts: int) -> Any:
    async def check() -> bool:
        (instance,) = (await site.app("hog"))["instances"]
        return bool(instance["restarts"] > restarts)

    return check
