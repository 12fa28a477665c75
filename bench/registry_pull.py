"""A pull from a real registry: meshorch's client against ``podman pull`` (root, podman).

Debian's ``docker-registry`` serves on loopback with htpasswd auth. Pushed with podman:
``bench/base`` (busybox plus SIZE MB of random bytes, one layer) and ``bench/app`` (base
plus one small file). Timed, each into empty storage: meshorch's pull of ``bench/app``
into a blob store, laid out and loaded into podman (``pull_s``, ``load_s``), and the
anchor, ``podman pull`` of the same image (``podman_pull_s``). Then, with ``bench/base``
already in the store, the bytes a pull of ``bench/app`` downloads (``shared_fetch_ratio``:
downloaded / image size; the shared base is not fetched again).

    python bench/registry_pull.py [--size-mb 64]

Last line: ``RESULT pull_s=... load_s=... podman_pull_s=... ratio_vs_podman=...
shared_fetch_ratio=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from meshorch.apps.settings import podman_dirs
from meshorch.images.oci import platform_of_machine
from meshorch.images.pull import pull, write_oci_layout
from meshorch.images.reference import parse_reference
from meshorch.images.registry import Credentials, RegistryClient
from meshorch.images.store import BlobStore
from meshorch.lab.pusher import Pusher
from meshorch.lab.registry import LabRegistry
from meshorch.runtime import PodmanRuntime, build_busybox_rootfs

USER, PASSWORD = "bench", "bench-password"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def missing() -> list[str]:
    tools = ("podman", "runc", "docker-registry", "htpasswd")
    problems = [f"{tool!r} is not installed" for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not running as root")
    return problems


def build_images(work: Path, pusher: Pusher, size_mb: int) -> None:
    rootfs = build_busybox_rootfs(work / "rootfs.tar")
    payload = work / "payload.bin"
    with open(payload, "wb") as handle:
        for _ in range(size_mb):
            handle.write(os.urandom(1 << 20))
    with tarfile.open(rootfs, "a") as tar:
        tar.add(payload, "payload.bin")
    pusher.import_rootfs(rootfs, "localhost/bench-base:1")
    context = work / "ctx"
    context.mkdir()
    (context / "hello.txt").write_text("hello\n")
    pusher.build("localhost/bench-app:1", "localhost/bench-base:1", context, ["hello.txt"])


async def measure(registry: str, work: Path) -> dict[str, float]:
    here = platform_of_machine(platform.machine())
    app = parse_reference(f"{registry}/bench/app:1")
    base = parse_reference(f"{registry}/bench/base:1")
    creds = Credentials(USER, PASSWORD)
    results: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, registry, creds, plain_http=True)
        store = BlobStore(work / "store-cold")
        started = time.monotonic()
        pulled = await pull(client, app, store, here)
        results["pull_s"] = time.monotonic() - started
        runtime = PodmanRuntime(*podman_dirs(work / "meshorch-host"))
        try:
            started = time.monotonic()
            layout = await write_oci_layout(
                store, pulled.manifest_digest, pulled.local_name(), work / "layout"
            )
            await runtime.load_image(layout, pulled.local_name())
            results["load_s"] = time.monotonic() - started
        finally:
            await runtime.purge()
        warm = BlobStore(work / "store-warm")
        await pull(client, base, warm, here)
        again = await pull(client, app, warm, here)
        size = sum(b.size for b in again.manifest.blobs())
        results["shared_fetch_ratio"] = again.fetched_bytes / size
        log(f"image {size / 1e6:.1f} MB; with the base here, {again.fetched_bytes} B fetched")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    args = parser.parse_args()
    problems = missing()
    if problems:
        print("bench/registry_pull.py cannot run here: " + "; ".join(problems), file=sys.stderr)
        print("install: sudo scripts/setup.sh --lab", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        work = Path(tmp)
        pusher = Pusher(work / "pusher", credentials=(USER, PASSWORD))
        anchor = Pusher(work / "anchor")  # podman pulling, into a storage of its own
        registry = LabRegistry(work / "registry", "127.0.0.1:15999", {USER: PASSWORD})
        try:
            registry.start()
            log(f"building a {args.size_mb} MB image")
            build_images(work, pusher, args.size_mb)
            for name in ("base", "app"):
                pusher.push(f"localhost/bench-{name}:1", f"{registry.host}/bench/{name}:1")
            results = asyncio.run(measure(registry.host, work))
            started = time.monotonic()
            anchor.run("pull", "-q", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}",
                       f"{registry.host}/bench/app:1")  # fmt: skip
            results["podman_pull_s"] = time.monotonic() - started
        finally:
            registry.stop()
            pusher.reset()
            anchor.reset()
    results["ratio_vs_podman"] = (results["pull_s"] + results["load_s"]) / results["podman_pull_s"]
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in sorted(results.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
