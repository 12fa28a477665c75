"""What a service of the agent sees of the site: Protocols, so none is handed the agent.

``SiteState`` is the replicated state as services use it: a view to read, proposals to
write, a barrier for reads that must see every acknowledged write, and the Raft status
(who leads). ``raft.RaftNode`` is the implementation. ``Members`` is the roster of the
site's hosts (``meshorch.state.roster.Roster``). The agent (``meshorch.site.agent``) is
the one place that builds the real ones and hands each service what it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshorch.state.tables import MemberRecord
from raft import Op, OpResult, RaftStatus, StateView


class SiteState(Protocol):
    """The site's replicated state (a Raft member)."""

    @property
    def view(self) -> StateView: ...

    async def propose(self, ops: Sequence[Op], *, idempotent: bool = False) -> list[OpResult]: ...

    async def barrier(self) -> int: ...

    def status(self) -> RaftStatus: ...


class Members(Protocol):
    """The site's hosts: recorded, heard from now, drained by an operator."""

    def members(self) -> list[MemberRecord]: ...

    def reachable_hosts(self) -> set[str]: ...

    def drained_hosts(self) -> set[str]: ...
