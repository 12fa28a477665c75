"""Runtimes: where instances actually run (podman containers or plain processes).

The agent talks to a :class:`Runtime`; :class:`PodmanRuntime` runs containers
with cgroup limits, :class:`ProcessRuntime` runs plain subprocesses (hosts
without podman, fast tests). Errors are drawn in :mod:`meshorch.runtime.errors`.

The bottom layer: it may import only the foundation modules (``meshorch.errors``, ...)
and raft, gossip, netmesh, never another meshorch subpackage.
"""

from typing import TYPE_CHECKING

from meshorch.runtime.base import (
    LABEL_INSTANCE,
    LABEL_SPEC,
    NAME_PREFIX,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    PortMapping,
    Runtime,
    SpecFile,
    instance_name,
)
from meshorch.runtime.errors import (
    ExecTimeout,
    ImageError,
    InstanceError,
    InstanceNotFound,
    InvalidSpec,
    RuntimeBackendError,
    RuntimeUnavailable,
)
from meshorch.runtime.process import PROCESS_IMAGE, ProcessRuntime

if TYPE_CHECKING:
    from meshorch.runtime.images import (
        BUSYBOX_IMAGE_REF,
        build_busybox_rootfs,
        ensure_busybox_image,
    )
    from meshorch.runtime.podman import PodmanRuntime

# Imported when first used: a host running processes needs neither podman nor the busybox
# image (nor tarfile and tempfile, which they import).
_LAZY = {
    "BUSYBOX_IMAGE_REF": "meshorch.runtime.images",
    "build_busybox_rootfs": "meshorch.runtime.images",
    "ensure_busybox_image": "meshorch.runtime.images",
    "PodmanRuntime": "meshorch.runtime.podman",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meshorch.runtime' has no attribute {name!r}")


__all__ = [
    "BUSYBOX_IMAGE_REF",
    "LABEL_INSTANCE",
    "LABEL_SPEC",
    "NAME_PREFIX",
    "PROCESS_IMAGE",
    "ExecTimeout",
    "ImageError",
    "InstanceError",
    "InstanceNotFound",
    "InstanceSpec",
    "InstanceState",
    "InstanceStatus",
    "InvalidSpec",
    "PodmanRuntime",
    "PortMapping",
    "ProcessRuntime",
    "Runtime",
    "RuntimeBackendError",
    "RuntimeUnavailable",
    "SpecFile",
    "build_busybox_rootfs",
    "ensure_busybox_image",
    "instance_name",
]
