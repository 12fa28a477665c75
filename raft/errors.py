"""Exceptions of the replicated state machine.

RaftError
├── CommandDecodeError      bytes that are not a valid command (local or remote)
├── SnapshotError           a full dump that cannot be written or read
├── ViewFullError           the LMDB view cannot hold an entry even at its largest map
└── ProposalError           a proposal that was not acknowledged
    ├── NotCommittedError   definitely not applied (queue full, discarded, denied)
    │   ├── EntryTooLargeError  larger than ``max_entry_bytes``: refused, nothing proposed
    │   ├── StateFullError      would take the state past ``max_state_bytes``: refused
    │   └── BackloggedError     its time ran out behind earlier proposals: never proposed
    ├── OutcomeUnknownError may or may not be applied later (timeout, leader lost)
    └── SessionError        a client session's request refused: expired, stale or malformed
"""

from __future__ import annotations

import asyncio
from typing import Any


class RaftError(Exception):
    """Root of every error raised by the ``raft`` package."""


class CommandDecodeError(RaftError):
    """The bytes are not a command this version understands."""


class SnapshotError(RaftError):
    """A full dump could not be written or restored."""


class ViewFullError(RaftError):
    """The LMDB map is at ``max_view_bytes`` and still too small for an entry.

    Only possible if the physical overhead of LMDB exceeds the margin the
    configuration leaves above ``max_state_bytes``: a local condition, which the
    node answers by stopping rather than by applying the entry differently from
    the other members (see ``raft.state_machine``)."""


class ProposalError(RaftError):
    """A proposed command was not acknowledged as committed."""

    code = "not_committed"


class NotCommittedError(ProposalError):
    """The command was refused before it could be committed; retrying is safe."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"command not committed: {reason}")
        self.reason = reason


class EntryTooLargeError(NotCommittedError):
    """The operations encode to more than ``max_entry_bytes``: nothing was proposed, and
    sending them again will not help."""

    code = "entry_too_large"


class StateFullError(NotCommittedError):
    """The writes would take the state past ``max_state_bytes`` (as this member sees it):
    nothing was proposed. Deleting data makes room."""

    code = "no_space"


class BackloggedError(NotCommittedError):
    """The proposal's time ran out while it waited behind earlier ones (``max_batches_in_flight``
    entries already in flight): it was never handed to Raft, so nothing was applied."""

    code = "backlogged"


class OutcomeUnknownError(ProposalError):
    """No answer in time: the command may still be committed later.

    ``outcome``, when set, is that later answer: the entry reached this member's Raft
    layer, which reports every entry it took once that log index is applied (the
    results, or NotCommittedError if another leader's entry took the index). A caller
    that must know may wait for it (a ``list[OpResult]``; not spelled out: this module
    comes before ``raft.state_machine``); None when it cannot be learnt (the leader
    changed while a follower waited, the node stopped)."""

    code = "outcome_unknown"

    def __init__(self, message: str, outcome: asyncio.Future[Any] | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class SessionError(ProposalError):
    """A request of a client session (``raft.sessions``) was refused and changed nothing.
    ``session_expired``: the session was dropped, so whether its earlier request was
    applied cannot be told; ``session_stale``: a later request of the session was
    applied already; ``bad_session``: not a request the session can make."""

    def __init__(self, code: str) -> None:
        super().__init__(f"client session refused: {code}")
        self.code = code
