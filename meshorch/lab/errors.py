"""Exceptions of the lab.

MeshorchError (meshorch.errors)
└── LabError                root of everything the lab raises
    ├── LabPlanError        a topology or template that cannot be built (sizes, names)
    ├── LabLookupError      an unknown host, site or node name
    ├── LabStateError       no lab, a lab that already exists, an unreadable state file
    ├── LabPrivilegeError   not root: the lab creates network namespaces
    └── LabCommandError     an ``ip``/``iptables`` command failed (argv, exit code, stderr)
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from meshorch.errors import MeshorchError


class LabError(MeshorchError):
    """Root of every error raised by ``meshorch.lab``."""


class LabPlanError(LabError):
    """The requested topology or command template cannot be built."""


class LabLookupError(LabError):
    """A host, site or node name that the lab does not have."""


class LabStateError(LabError):
    """The lab's persisted state is missing, conflicting or unreadable."""


class LabPrivilegeError(LabError):
    """The lab needs root."""

    def __init__(self) -> None:
        super().__init__("the lab needs root: it creates network namespaces")


class LabCommandError(LabError):
    """A system command failed; carries what is needed to understand why."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = f": {self.stderr}" if self.stderr else ""
        super().__init__(f"command failed (exit {returncode}): {shlex.join(self.argv)}{detail}")
