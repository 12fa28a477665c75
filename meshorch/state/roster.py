"""The site's hosts as the replicated state records them, and which of them answer now."""

from __future__ import annotations

from collections.abc import Callable

from meshorch.state.ports import SiteState
from meshorch.state.tables import DRAIN_PREFIX, MEMBER_PREFIX, SYSTEM_TABLE, MemberRecord

MAX_HOSTS = 10_000  # far above any site; bounds a scan of the members table


class Roster:
    """``Members`` read from the replicated state; ``reachable`` names the Raft addresses
    this host hears from now (``RaftNode.reachable``)."""

    def __init__(
        self, state: SiteState, reachable: Callable[[], frozenset[str]], host_id: str
    ) -> None:
        self._state = state
        self._reachable = reachable
        self._host_id = host_id

    def members(self) -> list[MemberRecord]:
        records, _ = self._state.view.scan(SYSTEM_TABLE, MEMBER_PREFIX, MAX_HOSTS)
        return [MemberRecord.decode(record.value) for _, record in records]

    def reachable_hosts(self) -> set[str]:
        """Hosts this agent hears from over Raft right now (itself included)."""
        reachable = self._reachable()
        alive = {m.host_id for m in self.members() if m.raft in reachable}
        return alive | {self._host_id}

    def drained_hosts(self) -> set[str]:
        records, _ = self._state.view.scan(SYSTEM_TABLE, DRAIN_PREFIX, MAX_HOSTS)
        return {key[len(DRAIN_PREFIX) :].decode() for key, _ in records}
