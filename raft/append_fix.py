"""A follower keeps the entries it holds when an append arrives late or twice.

pysyncobj (0.3.x, ``pysyncobj/syncobj.py``, ``SyncObj.__onMessageReceived``, the
``if len(prevEntries) > 1:`` branch: line 991 in 0.3.17) handles an append whose
``prevLogIdx`` P matches by deleting every entry after P, then adding the message's
entries, even when the follower holds those very entries and more. An append resent
from the leader's ``nextIndex`` (after a rejection or a reconnection) that arrives
after later ones, or a duplicate, thus truncates entries the follower had acknowledged
(the leader counted them in a majority: a committed write can be lost) and maybe
applied (pysyncobj logs CRITICAL "truncating already-applied log entries").

Raft (Figure 2, AppendEntries, receiver rules 3-5) deletes only from the first entry
that conflicts (same index, other term), appends the entries not yet held, and sets
commitIndex = min(leaderCommit, index of the last new entry), never lower. Here, for an
append pysyncobj acts on (its term is not older than ours) whose entry P matches the local
log, the log going past P:

* the entries the log already holds (same index and term) are skipped: the message is
  handed to pysyncobj as if it started after them, so it truncates only from the
  first conflicting entry, which is Raft's repair path;
* when it holds them all and more, pysyncobj would truncate the rest: the follower
  answers itself. pysyncobj is handed the message without its log part (what it does
  for any leader's message: term, leader, follower state, election deadline, commit
  index), with the commit index capped at P + len(entries); the answer vouches for
  P + len(entries) only: entries beyond may be from an older term.

A large entry (over ``appendEntriesBatchSizeBytes``) travels in pieces (``transmission``
start, process, finish) and is resent like any append; the last piece is that append
with its one entry, so it is assembled here and checked the same way. pysyncobj's leader
labels a piece "finish" by comparing with the command's length, not the pickled entry's:
when the last piece starts within the pickle's few bytes of overhead, the piece before it
says "finish" too. Unpickled then, the entry is incomplete, every resend repeats it and
the follower never gets the entry. A "finish" whose pieces do not unpickle (a strict
prefix of a pickle never does: its last byte is the STOP opcode) is taken as "process".
``SafeAppendsSyncObj`` is pysyncobj's ``SyncObj`` with this message handler.
"""

from __future__ import annotations

from typing import Any

import pysyncobj.pickle
from pysyncobj import SyncObj

_LOG_PART = ("prevLogIdx", "prevLogTerm", "entries", "transmission", "data")


class SafeAppendsSyncObj(SyncObj):  # type: ignore[misc]
    """``SyncObj`` whose followers never drop entries on a stale or duplicated append."""

    _SyncObj__recvTransmission: Any  # pysyncobj's ``__recvTransmission``: the pieces so far

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        handle = SyncObj._SyncObj__onMessageReceived
        if (
            message.get("type") != "append_entries"
            or message.get("prevLogIdx") is None  # a snapshot, or a predecessor not held
            or message["term"] < self._SyncObj__raftCurrentTerm  # pysyncobj ignores it
        ):
            handle(self, node, message)
            return
        transmission = message.get("transmission")
        if transmission == "finish":
            assembled = self._assembled(message)
            if assembled is None:  # labelled "finish" before the last piece (docstring)
                handle(self, node, {**message, "transmission": "process"})
                return
            message = assembled
        elif transmission is not None:  # the first pieces of an entry: nothing to compare
            handle(self, node, message)
            return
        prev_index: int = message["prevLogIdx"]
        entries: list[tuple[Any, int, int]] = message.get("entries", [])
        held = self._held(prev_index, message["prevLogTerm"], entries)
        if held is not None and held == len(entries) and self._last_index() > prev_index + held:
            self._acknowledge(node, message, prev_index + held)
        elif held:  # from the first entry not held: pysyncobj truncates only from a conflict
            rest = {**message, "prevLogIdx": prev_index + held, "entries": entries[held:]}
            rest["prevLogTerm"] = entries[held - 1][2]
            handle(self, node, rest)
        else:
            handle(self, node, message)

    def _last_index(self) -> int:
        index: int = self._SyncObj__raftLog[-1][1]
        return index

    def _held(
        self, prev_index: int, prev_term: int, entries: list[tuple[Any, int, int]]
    ) -> int | None:
        """How many leading ``entries`` the log holds with the same index and term, if it
        holds entry ``prev_index`` of ``prev_term`` and more; else None (pysyncobj's own
        path is right: it rejects the append, or nothing follows P to truncate)."""
        if self._last_index() <= prev_index:
            return None
        local = self._SyncObj__getEntries(prev_index, len(entries) + 1)
        if not local or local[0][2] != prev_term:
            return None
        held = 0
        for mine, theirs in zip(local[1:], entries, strict=False):
            if mine[1] != theirs[1] or mine[2] != theirs[2]:
                break
            held += 1
        return held

    def _acknowledge(self, node: Any, message: dict[str, Any], vouched: int) -> None:
        """Answer an append whose entries (up to index ``vouched``) are all held, the log
        going further: as pysyncobj would, without truncating."""
        leader_commit: int = message["commit_index"]
        bookkeeping = {k: v for k, v in message.items() if k not in _LOG_PART}
        bookkeeping["commit_index"] = min(leader_commit, vouched)
        SyncObj._SyncObj__onMessageReceived(self, node, bookkeeping)
        self._SyncObj__leaderCommitIndex = leader_commit  # what the leader said, as pysyncobj
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=vouched + 1, success=True)

    def _assembled(self, finish: dict[str, Any]) -> dict[str, Any] | None:
        """The last piece of a large entry as the plain append it completes; None when
        the pieces so far are not a whole entry yet (nothing changed)."""
        data = self._SyncObj__recvTransmission + finish["data"]
        try:
            entry = pysyncobj.pickle.loads(data)
        except Exception:  # a truncated pickle fails in many ways (EOF, imports, opcodes)
            return None
        self._SyncObj__recvTransmission = ""  # as pysyncobj, once the entry is whole
        plain = {k: v for k, v in finish.items() if k not in ("transmission", "data")}
        plain["entries"] = [entry]
        return plain
