"""PodmanRuntime, for real: needs root, podman and runc (lab test).

All storage lives in a temporary podman root for this module, purged at the end,
so nothing leaks into the machine's podman storage.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshorch.apps.health import probe_exec, probe_http
from meshorch.apps.settings import podman_dirs
from meshorch.runtime import (
    BUSYBOX_IMAGE_REF,
    ImageError,
    InstanceNotFound,
    InstanceSpec,
    InstanceState,
    PodmanRuntime,
    PortMapping,
    Runtime,
    SpecFile,
    ensure_busybox_image,
)
from meshorch.runtime._proc import run_command
from tests.labutil import require_lab
from tests.runtime.helpers import eventually, free_port, status_of, wait_exited

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

MiB = 1024 * 1024
# PID 1 ignores SIGTERM unless it installs a handler: this loop does.
LOOP = "trap 'echo bye; exit 0' TERM; echo hello; while true; do sleep 1; done"


@dataclass
class PodmanLab:
    base: Path

    def runtime(self, name: str = "a") -> PodmanRuntime:
        # podman refuses a run root longer than 50 characters: keep it under /run.
        return PodmanRuntime(*podman_dirs(self.base / name))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanLab]:
    require_lab("podman", "runc")
    podman_lab = PodmanLab(tmp_path_factory.mktemp("podman"))
    runtime = podman_lab.runtime()
    try:
        asyncio.run(ensure_busybox_image(runtime, podman_lab.base))
        yield podman_lab
    finally:
        asyncio.run(runtime.purge())
        assert not runtime.root.exists()


@pytest.fixture
async def rt(lab: PodmanLab) -> AsyncIterator[PodmanRuntime]:
    runtime = lab.runtime()
    try:
        yield runtime
    finally:
        for status in await runtime.list():
            await runtime.remove(status.instance_id)


def httpd_spec(instance_id: str, port: int, **kwargs: object) -> InstanceSpec:
    return InstanceSpec(
        instance_id,
        BUSYBOX_IMAGE_REF,
        ("httpd", "-f", "-p", str(port), "-h", "/www"),
        files=(SpecFile("/www/index.html", f"hello from {instance_id}\n".encode()),),
        ports=(PortMapping(None, port, "tcp"),),
        **kwargs,  # type: ignore[arg-type]
    )


def loop_spec(instance_id: str, **kwargs: object) -> InstanceSpec:
    return InstanceSpec(instance_id, BUSYBOX_IMAGE_REF, ("sh", "-c", LOOP), **kwargs)  # type: ignore[arg-type]


async def serving(port: int, timeout_s: float = 60) -> None:
    async def ok() -> bool:
        return await probe_http("127.0.0.1", port, "/index.html", 5)

    await eventually(ok, timeout_s, f"http on port {port}", interval_s=0.5)


async def container_id(rt: PodmanRuntime, instance_id: str) -> str:
    return str((await rt.inspect(instance_id))["Id"])


async def test_http_instance_probes_and_exec(rt: PodmanRuntime) -> None:
    assert isinstance(rt, Runtime)
    port = free_port()
    spec = httpd_spec("web", port, env={"GREETING": "hello world", "EMPTY": ""})
    await rt.start(spec)
    await serving(port)
    status = await status_of(rt, "web")
    assert status is not None
    assert status.state is InstanceState.RUNNING
    assert status.spec_hash == spec.spec_hash
    assert status.image == BUSYBOX_IMAGE_REF
    assert status.pid is not None and status.pid > 0
    assert status.started_at is not None and abs(status.started_at - time.time()) < 300

    # Same spec again: the very same container keeps running.
    first_id = await container_id(rt, "web")
    await rt.start(spec)
    assert await container_id(rt, "web") == first_id

    assert await probe_exec(rt, "web", ["test", "-f", "/www/index.html"], 30)
    assert await probe_exec(rt, "web", ["sh", "-c", 'test "$GREETING" = "hello world"'], 30)
    assert not await probe_exec(rt, "web", ["false"], 30)
    assert not await probe_exec(rt, "nope", ["true"], 30)
    assert await rt.exec("web", ["sh", "-c", "exit 7"], 30) == 7
    # Files are mounted read-only.
    assert await rt.exec("web", ["sh", "-c", "echo x > /www/index.html"], 30) != 0
    with pytest.raises(InstanceNotFound):
        await rt.exec("nope", ["true"], 30)


async def test_own_network_namespace_and_a_port_published_as_asked(rt: PodmanRuntime) -> None:
    """A container has a network of its own: its port 8080 is published on the host port
    the spec asks for, and the host's loopback is out of its reach."""
    host_port = free_port()
    spec = InstanceSpec(
        "own-net",
        BUSYBOX_IMAGE_REF,
        ("httpd", "-f", "-p", "8080", "-h", "/www"),
        files=(SpecFile("/www/index.html", b"published\n"),),
        ports=(PortMapping(host_port, 8080, "tcp"),),
        user=300_123,
    )
    await rt.start(spec)
    await serving(host_port)  # 127.0.0.1:host_port on the host reaches the container's 8080
    pid = str((await rt.inspect("own-net"))["State"]["Pid"])
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert any(name.startswith("mo-u300123") for name in os.listdir("/sys/class/net"))

    # A server on the host's loopback: the host reaches it, the container does not.
    accepted: list[bool] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        inside = ["sh", "-c", f"nc -w 2 127.0.0.1 {port} </dev/null"]
        assert await rt.exec("own-net", inside, 30) != 0
        await asyncio.sleep(0.2)
        assert accepted == [True]  # the host's connection only
    finally:
        server.close()
        await server.wait_closed()


async def test_a_container_on_the_hosts_network_is_replaced_by_one_of_its_own(
    rt: PodmanRuntime, lab: PodmanLab
) -> None:
    """What an earlier release started with ``--network host`` moves to its own network."""
    port = free_port()
    spec = httpd_spec("moved", port)
    old = PodmanRuntime(rt.root, rt.runroot, network="host")  # same storage, as before
    await old.start(spec)
    await serving(port)
    assert (await rt.inspect("moved"))["HostConfig"]["NetworkMode"] == "host"
    status = await status_of(rt, "moved")
    assert status is not None and status.running and status.spec_hash is None
    await rt.start(spec)
    await serving(port)
    assert (await rt.inspect("moved"))["HostConfig"]["NetworkMode"] != "host"
    status = await status_of(rt, "moved")
    assert status is not None and status.spec_hash == spec.spec_hash


async def test_limits_applied_and_memory_hog_killed(rt: PodmanRuntime) -> None:
    port = free_port()
    await rt.start(httpd_spec("neighbour", port, memory_limit_bytes=64 * MiB, cpu_limit=0.5))
    await serving(port)
    host_config = (await rt.inspect("neighbour"))["HostConfig"]
    assert host_config["Memory"] == 64 * MiB
    assert host_config["MemorySwap"] == 64 * MiB
    assert host_config["NanoCpus"] == 500_000_000

    # dd allocates its 256 MiB block at once: the memory cgroup OOM-kills it.
    hog = InstanceSpec(
        "hog",
        BUSYBOX_IMAGE_REF,
        ("dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"),
        memory_limit_bytes=32 * MiB,
    )
    await rt.start(hog)
    status = await wait_exited(rt, "hog", 120)
    assert status.exit_code == 137  # SIGKILL from the OOM killer
    assert status.finished_at is not None

    assert await probe_http("127.0.0.1", port, "/index.html", 10)
    neighbour = await status_of(rt, "neighbour")
    assert neighbour is not None and neighbour.running


async def test_stop_start_remove_idempotence_and_logs(rt: PodmanRuntime) -> None:
    spec = loop_spec("loop")
    await rt.start(spec)

    async def said_hello() -> bool:
        return "hello" in await rt.logs("loop", 10)

    await eventually(said_hello, 60, "hello in the logs", interval_s=0.5)
    await rt.stop("loop", timeout_s=30)
    status = await status_of(rt, "loop")
    assert status is not None
    assert status.state is InstanceState.EXITED and status.exit_code == 0
    assert status.pid is None
    assert "bye" in await rt.logs("loop", 10)
    await rt.stop("loop")  # already stopped
    await rt.stop("never-was")

    # start after stop: replaced, running again.
    await rt.start(spec)
    status = await status_of(rt, "loop")
    assert status is not None and status.running
    old_id = await container_id(rt, "loop")
    # A changed spec replaces the container.
    changed = loop_spec("loop", env={"V": "2"})
    await rt.start(changed)
    assert await container_id(rt, "loop") != old_id
    status = await status_of(rt, "loop")
    assert status is not None and status.spec_hash == changed.spec_hash

    await rt.remove("loop")
    await rt.remove("loop")
    assert await status_of(rt, "loop") is None
    assert not (rt.files_dir / "meshorch-loop").exists()
    with pytest.raises(InstanceNotFound):
        await rt.logs("loop", 10)


async def test_list_after_runtime_restart_and_foreign_containers(
    rt: PodmanRuntime, lab: PodmanLab
) -> None:
    spec = loop_spec("survivor")
    await rt.start(spec)
    first_id = await container_id(rt, "survivor")
    # A container meshorch did not create, in the same storage.
    foreign = await run_command(
        [
            *rt._base,
            "run",
            "-d",
            "--name",
            "meshorch-foreign",
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            BUSYBOX_IMAGE_REF,
            "sleep",
            "300",
        ],
        timeout_s=120,
    )
    assert foreign.returncode == 0, foreign.stderr_text
    try:
        await rt.close()
        restarted = lab.runtime()  # a new agent process, same storage
        [status] = await restarted.list()
        assert status.instance_id == "survivor"
        assert status.running and status.spec_hash == spec.spec_hash
        await restarted.start(spec)
        assert await container_id(restarted, "survivor") == first_id
    finally:
        await run_command([*rt._base, "rm", "-f", "-t", "0", "meshorch-foreign"], timeout_s=120)


async def test_missing_image(rt: PodmanRuntime) -> None:
    assert not await rt.has_image("localhost/no-such-image:1")
    with pytest.raises(ImageError):
        await rt.start(InstanceSpec("ghost", "localhost/no-such-image:1", ("true",)))
    assert await status_of(rt, "ghost") is None


async def test_image_replication_between_roots(rt: PodmanRuntime, lab: PodmanLab) -> None:
    archive = lab.base / "busybox-image.tar"
    await rt.save_image(BUSYBOX_IMAGE_REF, archive)
    peer = lab.runtime("peer")  # another host: storage of its own
    try:
        assert not await peer.has_image(BUSYBOX_IMAGE_REF)
        await peer.load_image(archive, "localhost/copied:1")
        assert await peer.has_image("localhost/copied:1")
        await peer.start(InstanceSpec("once", "localhost/copied:1", ("sh", "-c", "echo copied")))
        status = await wait_exited(peer, "once", 120)
        assert status.exit_code == 0
        assert "copied" in await peer.logs("once", 5)
    finally:
        await peer.purge()
    assert not peer.root.exists()


async def test_an_image_in_use_is_kept_then_removed(rt: PodmanRuntime, lab: PodmanLab) -> None:
    """What image garbage collection relies on: ``image_names`` lists what is loaded,
    ``remove_image`` keeps an image a container uses (False) and forgets it once unused."""
    archive = lab.base / "gc-image.tar"
    await rt.save_image(BUSYBOX_IMAGE_REF, archive)
    peer = lab.runtime("gc")
    name = "registry.test/lab/app:sha256-" + "a" * 64
    try:
        await peer.load_image(archive, name)
        assert await peer.remove_image(BUSYBOX_IMAGE_REF) is True  # the archive's name
        assert await peer.image_names() == [name]
        await peer.start(InstanceSpec("user", name, ("sh", "-c", LOOP)))
        assert await peer.remove_image(name) is False
        assert await peer.has_image(name)
        await peer.remove("user")
        assert await peer.remove_image(name) is True
        assert not await peer.has_image(name) and name not in await peer.image_names()
        assert await peer.remove_image(name) is True  # already gone: nothing to do
    finally:
        await peer.purge()
    assert not peer.root.exists()
