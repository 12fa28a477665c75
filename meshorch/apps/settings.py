"""What a host offers to run applications: runtime, capacity, labels."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from meshorch import __version__
from meshorch.apps.scheduler import HostInfo
from meshorch.errors import ConfigurationError
from meshorch.runtime import ProcessRuntime, Runtime
from meshorch.state.protocol import PROTOCOL

RUNTIMES = ("auto", "podman", "process")


def total_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 30


@dataclass(frozen=True)
class WorkloadSettings:
    runtime: str = "auto"
    cpu_millis: int | None = None  # None: the host's CPU count
    memory_bytes: int | None = None  # None: the host's memory
    labels: dict[str, str] = field(default_factory=dict)
    # Disk or memory use at which the host sheds its lowest-priority instances.
    evict_at_pct: float = 95.0
    # Registries (host:port) the site pulls from over plain HTTP, not HTTPS (a lab, a LAN).
    plain_http_registries: tuple[str, ...] = ()
    # Images no app names are removed after this long (unless pinned).
    image_grace_s: float = 3600.0
    # The most the image store may hold on this host (None: only disk use counts).
    image_store_max_bytes: int | None = None

    def validate(self) -> None:
        if not self.image_grace_s >= 0:
            raise ConfigurationError("--image-grace: seconds, not negative")
        if self.image_store_max_bytes is not None and self.image_store_max_bytes < 0:
            raise ConfigurationError("--image-store-max: a size, not negative")

    def host_info(self, host_id: str) -> HostInfo:
        return HostInfo(
            host_id,
            dict(self.labels),
            self.cpu_millis or (os.cpu_count() or 1) * 1000,
            self.memory_bytes or total_memory_bytes(),
            agent_version=__version__,
            protocol=PROTOCOL,
        )


def podman_dirs(data_dir: Path) -> tuple[Path, Path]:
    """Storage root under the data dir; the run root under /run, because podman
    refuses a run root longer than 50 characters."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return data_dir / "podman" / "root", Path("/run/meshorch-podman") / digest


def make_runtime(choice: str, data_dir: Path) -> Runtime:
    """podman when asked, or for ``auto`` when podman and runc are there and we are root."""
    if choice not in RUNTIMES:
        raise ConfigurationError(f"--runtime: one of {', '.join(RUNTIMES)}")
    podman_ok = shutil.which("podman") and shutil.which("runc") and os.geteuid() == 0
    if choice == "podman" or (choice == "auto" and podman_ok):
        from meshorch.runtime.podman import PodmanRuntime  # podman only (tarfile, ...)

        return PodmanRuntime(*podman_dirs(data_dir))
    return ProcessRuntime(data_dir / "instances")


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels
