"""Errors raised by the runtimes (podman, process).

MeshorchError
└── RuntimeBackendError     anything a runtime could not do
    ├── RuntimeUnavailable  the backend itself is missing or broken (no podman, no runc)
    ├── InvalidSpec         the spec cannot be honoured by this runtime
    ├── ImageError          an image is missing or could not be loaded
    └── InstanceError       an operation on one instance failed
        ├── InstanceNotFound  no such instance
        └── ExecTimeout       an exec did not finish in time

The root is not called ``RuntimeError`` so that it never shadows the builtin.
"""

from __future__ import annotations

from meshorch.errors import MeshorchError


class RuntimeBackendError(MeshorchError):
    """Root of the runtime errors."""


class RuntimeUnavailable(RuntimeBackendError):
    """The runtime's backend cannot be used on this host; the message says what is missing."""


class InvalidSpec(RuntimeBackendError):
    """An :class:`~meshorch.runtime.base.InstanceSpec` that is malformed or unsupported."""


class ImageError(RuntimeBackendError):
    """An image is not present, or loading it failed."""

    def __init__(self, ref: str, message: str) -> None:
        super().__init__(message)
        self.ref = ref


class InstanceError(RuntimeBackendError):
    """An operation on instance ``instance_id`` failed."""

    def __init__(self, instance_id: str, message: str) -> None:
        super().__init__(message)
        self.instance_id = instance_id


class InstanceNotFound(InstanceError):
    """The runtime does not manage an instance with this id."""


class ExecTimeout(InstanceError):
    """A command run inside an instance did not finish within its timeout."""
