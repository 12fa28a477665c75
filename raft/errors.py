"""Exceptions of the replicated state machine.

RaftError
├── CommandDecodeError      bytes that are not a valid command (local or remote)
├── SnapshotError           a full dump that cannot be written or read
└── ProposalError           a proposal that was not acknowledged
    ├── NotCommittedError   definitely not applied (queue full, discarded, denied)
    └── OutcomeUnknownError may or may not be applied later (timeout, leader lost)
"""

from __future__ import annotations


class RaftError(Exception):
    """Root of every error raised by the ``raft`` package."""


class CommandDecodeError(RaftError):
    """The bytes are not a command this version understands."""


class SnapshotError(RaftError):
    """A full dump could not be written or restored."""


class ProposalError(RaftError):
    """A proposed command was not acknowledged as committed."""

    code = "not_committed"


class NotCommittedError(ProposalError):
    """The command was refused before it could be committed; retrying is safe."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"command not committed: {reason}")
        self.reason = reason


class OutcomeUnknownError(ProposalError):
    """No answer in time: the command may still be committed later."""

    code = "outcome_unknown"
