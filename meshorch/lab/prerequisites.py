"""What the lab needs on this machine, and a message that says how to get it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Network namespaces and veths (ip), the hosts' firewalls (iptables), WireGuard.
MESH_TOOLS = ("ip", "wg", "wireguard-go", "iptables")
# And containers.
LAB_TOOLS = (*MESH_TOOLS, "podman", "runc")
INSTALL_HINT = "as root, `scripts/setup.sh --lab` installs them"


def missing_prerequisites(
    euid: int, which: Callable[[str], str | None], tools: Sequence[str] = LAB_TOOLS
) -> list[str]:
    """What stops the lab from running here, in words (empty: nothing)."""
    problems = [] if euid == 0 else ["it needs root (network namespaces, WireGuard, podman)"]
    problems += [f"{tool!r} is not installed" for tool in tools if which(tool) is None]
    return problems


def prerequisites_message(
    program: str, euid: int, which: Callable[[str], str | None], tools: Sequence[str] = LAB_TOOLS
) -> str | None:
    """``program cannot run here: ...; <how to install>``, or None when nothing is missing."""
    problems = missing_prerequisites(euid, which, tools)
    if not problems:
        return None
    return f"{program} cannot run here: {'; '.join(problems)} ({INSTALL_HINT})"
