"""A snapshot of a lab for humans and scripts (pure: built by ``Lab.status``)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from meshorch.lab.plan import NodeKind


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    kind: NodeKind
    netns: str
    ip: str
    site: int | None
    present: bool  # the namespace exists


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    node: str
    pid: int
    alive: bool
    argv: tuple[str, ...]
    log: str


@dataclass(frozen=True, slots=True)
class LabStatus:
    prefix: str
    phase: str
    state_path: str
    wan_subnet: str
    nodes: tuple[NodeStatus, ...]
    processes: tuple[ProcessStatus, ...]
    partitions: tuple[tuple[str, str], ...]
    stray_namespaces: tuple[str, ...]  # have the prefix but are not in the plan

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "phase": self.phase,
            "state_path": self.state_path,
            "wan_subnet": self.wan_subnet,
            "nodes": [
                {
                    "name": n.name,
                    "kind": n.kind,
                    "netns": n.netns,
                    "ip": n.ip,
                    "site": n.site,
                    "present": n.present,
                }
                for n in self.nodes
            ],
            "processes": [
                {"node": p.node, "pid": p.pid, "alive": p.alive, "argv": list(p.argv), "log": p.log}
                for p in self.processes
            ],
            "partitions": [list(p) for p in self.partitions],
            "stray_namespaces": list(self.stray_namespaces),
        }


def format_status(status: LabStatus) -> str:
    procs = {p.node: p for p in status.processes}
    lines = [
        f"lab {status.prefix}: {status.phase} (state {status.state_path})",
        f"WAN {status.wan_subnet}",
    ]
    for node in status.nodes:
        indent = "  " if node.kind != "host" else "    "
        missing = "" if node.present else "  [namespace MISSING]"
        line = f"{indent}{node.name:<10} {node.ip:<15} {node.netns}{missing}"
        proc = procs.get(node.name)
        if proc is not None:
            state = "alive" if proc.alive else "DEAD"
            line += f"  pid {proc.pid} {state}: {shlex.join(proc.argv)}"
        lines.append(line)
    if status.partitions:
        lines.append("partitions:")
        lines += [f"  {a} <-/-> {b}" for a, b in status.partitions]
    else:
        lines.append("partitions: none")
    if status.stray_namespaces:
        lines.append(
            "stray namespaces (lab down removes them): " + ", ".join(status.stray_namespaces)
        )
    return "\n".join(lines)
