"""A replicated state machine on pysyncobj: typed commands, a pure apply, an LMDB view.

Knows nothing of applications: callers store bytes in named tables.
"""

# First, before pysyncobj: it stands in for pysyncobj.encryptor (see raft.fernet).
import raft.fernet  # noqa: F401
from raft.commands import (
    Append,
    Barrier,
    Batch,
    Delete,
    Guard,
    Op,
    Put,
    decode_batch,
    encode_batch,
)
from raft.config import ConfigError, RaftConfig, local_preset
from raft.errors import (
    BackloggedError,
    CommandDecodeError,
    EntryTooLargeError,
    NotCommittedError,
    OutcomeUnknownError,
    ProposalError,
    RaftError,
    SessionError,
    SnapshotError,
    StateFullError,
    ViewFullError,
)
from raft.node import RaftNode, RaftStatus
from raft.sessions import ClientRequest
from raft.state_machine import OpResult, Record, apply_command
from raft.view import StateView

__all__ = [
    "Append",
    "BackloggedError",
    "Barrier",
    "Batch",
    "ClientRequest",
    "CommandDecodeError",
    "ConfigError",
    "Delete",
    "EntryTooLargeError",
    "Guard",
    "NotCommittedError",
    "Op",
    "OpResult",
    "OutcomeUnknownError",
    "ProposalError",
    "Put",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "RaftStatus",
    "Record",
    "SessionError",
    "SnapshotError",
    "StateFullError",
    "StateView",
    "ViewFullError",
    "apply_command",
    "decode_batch",
    "encode_batch",
    "local_preset",
]
