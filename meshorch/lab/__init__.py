"""The lab: edge sites made of network namespaces on one machine (root only).

A WAN namespace with the hub, and per site a LAN behind a NAT router with its hosts.
``plan_lab`` and friends decide everything as plain data (no root needed); ``Lab``
builds it, starts processes in hosts, partitions and heals, and tears it all down.
The CLI (``meshorch lab ...`` or ``python -m meshorch.lab``) wraps ``Lab``.

Errors: see ``meshorch.lab.errors`` (root ``LabError``).

May import site and every layer below it, the foundation modules and raft, gossip,
netmesh; never demo, chaos or cli.
"""

from meshorch.lab.commands import (
    host_commands,
    plan_commands,
    plan_stages,
    render_command,
    router_commands,
    teardown_commands,
)
from meshorch.lab.errors import (
    LabCommandError,
    LabError,
    LabLookupError,
    LabPlanError,
    LabPrivilegeError,
    LabStateError,
)
from meshorch.lab.lab import Lab
from meshorch.lab.partition import Endpoint, PartitionRule, parse_endpoint, plan_partition
from meshorch.lab.plan import (
    DEFAULT_PREFIX,
    Bridge,
    HostPlan,
    LabPlan,
    Node,
    SitePlan,
    VethPair,
    plan_add_host,
    plan_lab,
    plan_lab_from_counts,
)
from meshorch.lab.state import LabState, ProcessRecord
from meshorch.lab.status import LabStatus, format_status

__all__ = [
    "DEFAULT_PREFIX",
    "Bridge",
    "Endpoint",
    "HostPlan",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabLookupError",
    "LabPlan",
    "LabPlanError",
    "LabPrivilegeError",
    "LabState",
    "LabStateError",
    "LabStatus",
    "Node",
    "PartitionRule",
    "ProcessRecord",
    "SitePlan",
    "VethPair",
    "format_status",
    "host_commands",
    "parse_endpoint",
    "plan_add_host",
    "plan_commands",
    "plan_lab",
    "plan_lab_from_counts",
    "plan_partition",
    "plan_stages",
    "render_command",
    "router_commands",
    "teardown_commands",
]
