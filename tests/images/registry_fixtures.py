"""A real registry (Debian's docker-registry) with test images pushed by podman.

Images, built in a podman storage of their own from a static busybox rootfs:
``lab/base:1`` (the rootfs), ``lab/app:1`` (base + /hello.txt; its command prints it),
``lab/victim:1`` (base + a file of its own, for the corruption test), ``localhost/app:2``
(another /hello.txt; built, not pushed: tests push it to move a tag) and
``lab/multi:1``, a manifest list of app as linux/<this host> and base as linux/s390x
(or linux/arm64 on an s390x host).
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meshorch.images.oci import Platform, platform_of_machine
from meshorch.lab.pusher import Pusher
from meshorch.lab.registry import LabRegistry
from meshorch.runtime.images import build_busybox_rootfs
from tests.runtime.helpers import free_port

USER, PASSWORD = "alice", "correct horse"
HOST_PLATFORM = platform_of_machine(platform.machine())
OTHER_PLATFORM = Platform("linux", "arm64" if HOST_PLATFORM.architecture == "s390x" else "s390x")


@dataclass
class PushedImages:
    registry: LabRegistry
    work: Path
    digests: dict[str, str]  # "base", "app", "victim": manifest digests as pushed
    pusher: Pusher

    @property
    def podman(self) -> list[str]:
        return self.pusher.argv

    def push(self, local: str, remote: str) -> str:
        """Push ``localhost/<local>`` as ``<registry>/<remote>``; return the manifest digest."""
        return self.pusher.push(f"localhost/{local}", f"{self.host}/{remote}")

    @property
    def host(self) -> str:
        return self.registry.host

    def storage_blob(self, digest: str) -> Path:
        """Where the registry keeps a blob (its filesystem driver's layout)."""
        hexdigest = digest.removeprefix("sha256:")
        return (
            self.registry.work_dir
            / "storage/docker/registry/v2/blobs/sha256"
            / hexdigest[:2]
            / hexdigest
            / "data"
        )


def run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")
    return result.stdout


def _build(pusher: Pusher, context: Path, base: str, name: str, files: dict[str, str]) -> None:
    context.mkdir(parents=True, exist_ok=True)
    for file_name, content in files.items():
        (context / file_name).write_text(content)
    pusher.build(name, base, context, list(files), ["cat", "/hello.txt"])


@contextlib.contextmanager
def registry_with_images(work: Path, registry: LabRegistry | None = None) -> Iterator[PushedImages]:
    """Start the registry (default: on loopback), build and push the images (from the
    registry's namespace); stop and clean up at the end."""
    if registry is None:
        registry = LabRegistry(work / "registry", f"127.0.0.1:{free_port()}", {USER: PASSWORD})
    pusher = Pusher(work / "pusher", registry.netns, (USER, PASSWORD))
    podman = pusher.argv
    try:
        registry.start()
        rootfs = build_busybox_rootfs(work / "rootfs.tar")
        pusher.import_rootfs(rootfs, "localhost/base:1")
        _build(pusher, work / "ctx-app", "localhost/base:1", "localhost/app:1",
               {"hello.txt": "hello from the registry\n"})  # fmt: skip
        _build(pusher, work / "ctx-app2", "localhost/base:1", "localhost/app:2",
               {"hello.txt": "hello again, second build\n"})  # fmt: skip
        _build(pusher, work / "ctx-victim", "localhost/base:1", "localhost/victim:1",
               {"hello.txt": "victim\n", "victim.bin": "v" * 4096})  # fmt: skip
        creds = ["--tls-verify=false", "--creds", f"{USER}:{PASSWORD}"]
        digests = {}
        for name in ("base", "app", "victim"):
            digests[name] = pusher.push(f"localhost/{name}:1", f"{registry.host}/lab/{name}:1")
        arch, other = HOST_PLATFORM, OTHER_PLATFORM
        run([*podman, "manifest", "create", "localhost/multi:1"])
        run([*podman, "manifest", "add", "--os", arch.os, "--arch", arch.architecture,
             "localhost/multi:1", "containers-storage:localhost/app:1"])  # fmt: skip
        run([*podman, "manifest", "add", "--os", other.os, "--arch", other.architecture,
             "localhost/multi:1", "containers-storage:localhost/base:1"])  # fmt: skip
        digest_file = work / "multi.digest"
        run([*podman, "manifest", "push", "--all", *creds, "--digestfile", str(digest_file),
             "localhost/multi:1", f"docker://{registry.host}/lab/multi:1"])  # fmt: skip
        digests["multi"] = digest_file.read_text().strip()
        yield PushedImages(registry, work, digests, pusher)
    finally:
        registry.stop()
        pusher.reset()
