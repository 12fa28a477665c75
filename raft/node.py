"""A Raft node on pysyncobj, bridged to asyncio.

pysyncobj runs consensus on its own thread. This module is the seam:

* proposals go in through ``propose`` (asyncio), are grouped into one Raft
  entry per batch (group commit), and resolve futures on the event loop with
  ``call_soon_threadsafe`` when pysyncobj reports them applied;
* committed entries are applied on the pysyncobj thread by the pure
  ``apply_command`` and stored in the LMDB ``StateView``;
* full dumps (log compaction, and catching up a far-behind follower) are LMDB
  copies written and installed through pysyncobj's serializer hooks;
* a status snapshot is refreshed from the pysyncobj thread, and leadership
  changes are delivered to asyncio listeners.

Ordering rules: a proposal's future resolves only after its entry is applied
to this node's view, so a read after an acknowledged write sees it; a
``barrier`` proposal therefore gives linearizable reads on any member.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from raft.commands import Barrier, Batch, Op, encode_batch
from raft.config import RaftConfig
from raft.errors import NotCommittedError, OutcomeUnknownError, ProposalError, RaftError
from raft.state_machine import OpResult, apply_command
from raft.view import StateView

logger = logging.getLogger(__name__)

_NOT_COMMITTED = {
    FAIL_REASON.QUEUE_FULL: "queue_full",
    FAIL_REASON.MISSING_LEADER: "no_leader",
    FAIL_REASON.DISCARDED: "discarded",
    FAIL_REASON.NOT_LEADER: "not_leader",
    FAIL_REASON.REQUEST_DENIED: "denied",
}


@dataclass(frozen=True)
class RaftStatus:
    self_address: str
    leader_address: str | None
    term: int
    commit_index: int
    applied_index: int
    members: tuple[str, ...]
    is_leader: bool
    ready: bool
    has_quorum: bool


@dataclass
class _Proposal:
    ops: tuple[Op, ...]
    future: asyncio.Future[list[OpResult]]
    size: int


@dataclass
class _InFlight:
    proposals: list[_Proposal]
    timer: asyncio.TimerHandle | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)


class _SyncObj(SyncObj):  # type: ignore[misc]
    """The pysyncobj object; its one replicated method hands bytes to ``on_apply``."""

    def __init__(
        self,
        self_address: str,
        partners: Sequence[str],
        conf: SyncObjConf,
        on_apply: Callable[[bytes, int], list[OpResult] | None],
    ) -> None:
        self._on_apply = on_apply
        super().__init__(self_address, list(partners), conf)

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, payload: bytes) -> list[OpResult] | None:
        # pysyncobj increments raftLastApplied after this returns.
        return self._on_apply(payload, self.raftLastApplied + 1)


class RaftNode:
    """One member of a replicated state machine. Use as an async context manager."""

    def __init__(self, config: RaftConfig) -> None:
        config.validate()
        self.config = config
        self.view = StateView(config.data_dir / "view", config.tables)
        self._applied_index = self.view.applied_index()
        self._syncobj: _SyncObj | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Proposal] = []
        self._in_flight: set[int] = set()
        self._batches: dict[int, _InFlight] = {}
        self._next_batch = 0
        self._flush_scheduled = False
        self._status = RaftStatus(config.self_address, None, 0, 0, 0, (), False, False, False)
        self._status_lock = threading.Lock()
        self._last_status_at = 0.0
        self._last_sync_at = time.monotonic()
        self._leader_listeners: list[Callable[[RaftStatus], None]] = []
        self._stopped = False

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> RaftNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        data_dir = self.config.data_dir
        conf = SyncObjConf(
            password=self.config.password,
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            serializer=self._write_dump,
            deserializer=self._read_dump,
            dynamicMembershipChange=True,
            # Send each entry at once: batching happens above, in propose().
            appendEntriesUseBatch=False,
            commandsWaitLeader=True,
            # Without it pysyncobj listens on 0.0.0.0; Raft must only answer where we say.
            bindAddress=self.config.bind_address or self.config.self_address,
            raftMinTimeout=self.config.election_timeout_min_s,
            raftMaxTimeout=self.config.election_timeout_max_s,
            appendEntriesPeriod=self.config.heartbeat_interval_s,
            leaderFallbackTimeout=self.config.leader_fallback_s,
            connectionTimeout=self.config.connection_timeout_s,
            connectionRetryTime=self.config.connection_retry_s,
            logCompactionMinEntries=self.config.compaction_min_entries,
            logCompactionMinTime=self.config.compaction_min_interval_s,
            maxBindRetries=10,
        )
        # SyncObj's constructor binds the port and starts the tick thread.
        self._syncobj = await asyncio.to_thread(
            _SyncObj, self.config.self_address, self.config.partners, conf, self._on_apply
        )
        self._syncobj.addOnTickCallback(self._on_tick)
        self._refresh_status(force=True)
        logger.info(
            "raft node %s started, partners %s",
            self.config.self_address,
            ", ".join(self.config.partners) or "none",
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        syncobj = self._syncobj
        if syncobj is not None:
            await asyncio.to_thread(syncobj.destroy_synchronous)
        for batch in list(self._batches.values()):
            self._finish_batch(batch, None, OutcomeUnknownError("node stopped"))
        for proposal in self._pending:
            if not proposal.future.done():
                proposal.future.set_exception(NotCommittedError("node stopped"))
        self._pending.clear()
        self.view.close()

    # -- proposals ---------------------------------------------------------

    async def propose(self, ops: Sequence[Op], *, idempotent: bool = False) -> list[OpResult]:
        """Commit ``ops`` atomically (in one entry) and return one result each.

        Raises NotCommittedError (safe to retry) or OutcomeUnknownError. With
        ``idempotent`` (applying the ops twice has the effect of applying them
        once: plain puts, deletes, barriers), failed attempts are retried
        until ``proposal_timeout_s`` has passed, which hides leader changes.
        """
        if self._stopped or self._syncobj is None or self._loop is None:
            raise NotCommittedError("node not running")
        deadline = self._loop.time() + self.config.proposal_timeout_s
        delay_s = 0.05
        while True:
            try:
                return await self._propose_once(tuple(ops), deadline)
            except ProposalError:
                if not idempotent or self._stopped or self._loop.time() + delay_s >= deadline:
                    raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    async def _propose_once(self, ops: tuple[Op, ...], deadline: float) -> list[OpResult]:
        assert self._loop is not None
        future: asyncio.Future[list[OpResult]] = self._loop.create_future()
        self._pending.append(_Proposal(ops, future, len(encode_batch(Batch(ops)))))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - self._loop.time()))
        except TimeoutError as exc:
            raise OutcomeUnknownError(
                f"no commit within {self.config.proposal_timeout_s:g}s (no quorum or leader lost?)"
            ) from exc

    async def barrier(self) -> int:
        """Return once every entry committed before the call is applied locally."""
        results = await self.propose([Barrier()], idempotent=True)
        return results[0].index

    def _flush(self) -> None:
        self._flush_scheduled = False
        assert self._loop is not None and self._syncobj is not None
        while self._pending and len(self._batches) < self.config.max_batches_in_flight:
            taken: list[_Proposal] = []
            ops_count = 0
            size = 0
            while self._pending:
                nxt = self._pending[0]
                too_big = size + nxt.size > self.config.max_batch_bytes
                too_many = ops_count + len(nxt.ops) > self.config.max_batch_ops
                if taken and (too_big or too_many):
                    break
                taken.append(self._pending.pop(0))
                ops_count += len(nxt.ops)
                size += nxt.size
            live = [p for p in taken if not p.future.done()]
            if not live:
                continue
            payload = encode_batch(Batch(tuple(op for p in live for op in p.ops)))
            batch_id = self._next_batch
            self._next_batch += 1
            batch = _InFlight(live)
            self._batches[batch_id] = batch
            batch.timer = self._loop.call_later(
                self.config.proposal_timeout_s,
                self._finish_batch,
                batch,
                None,
                OutcomeUnknownError(
                    f"no commit within {self.config.proposal_timeout_s:g}s "
                    "(no quorum or leader lost?)"
                ),
            )
            self._syncobj.apply_entry(payload, callback=self._result_callback(batch_id))

    def _result_callback(self, batch_id: int) -> Callable[[Any, int], None]:
        loop = self._loop
        assert loop is not None

        def on_result(result: Any, error: int) -> None:
            # Runs on the pysyncobj thread.
            loop.call_soon_threadsafe(self._on_batch_result, batch_id, result, error)

        return on_result

    def _on_batch_result(self, batch_id: int, result: Any, error: int) -> None:
        batch = self._batches.get(batch_id)
        if batch is None:
            return
        if error == FAIL_REASON.SUCCESS:
            self._finish_batch(batch, result, None)
        elif error in _NOT_COMMITTED:
            self._finish_batch(batch, None, NotCommittedError(_NOT_COMMITTED[error]))
        else:
            self._finish_batch(batch, None, OutcomeUnknownError(f"pysyncobj failure {error}"))

    def _finish_batch(
        self, batch: _InFlight, results: list[OpResult] | None, error: ProposalError | None
    ) -> None:
        if batch.done:
            return
        batch.done = True
        if batch.timer is not None:
            batch.timer.cancel()
        for key, value in list(self._batches.items()):
            if value is batch:
                del self._batches[key]
        if error is None and results is None:
            error = OutcomeUnknownError("entry applied without results (undecodable?)")
        offset = 0
        for proposal in batch.proposals:
            count = len(proposal.ops)
            if not proposal.future.done():
                if error is not None:
                    proposal.future.set_exception(error)
                else:
                    assert results is not None
                    proposal.future.set_result(results[offset : offset + count])
            offset += count
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- membership ----------------------------------------------------------

    async def add_member(self, address: str) -> None:
        """Add a node (started with this cluster as partners); returns once committed."""
        await self._change_membership("add", address)

    async def remove_member(self, address: str) -> None:
        await self._change_membership("remove", address)

    async def _change_membership(self, action: str, address: str) -> None:
        if self._syncobj is None or self._loop is None:
            raise NotCommittedError("node not running")
        loop = self._loop
        # pysyncobj refuses a change while another is uncommitted, and right
        # after an election: retry those refusals for a while.
        deadline = loop.time() + self.config.proposal_timeout_s * 2
        while True:
            future: asyncio.Future[int] = loop.create_future()

            def on_result(_result: Any, error: int, fut: asyncio.Future[int] = future) -> None:
                loop.call_soon_threadsafe(_settle, fut, error)

            if action == "add":
                self._syncobj.addNodeToCluster(address, callback=on_result)
            else:
                self._syncobj.removeNodeFromCluster(address, callback=on_result)
            try:
                error = await asyncio.wait_for(future, self.config.proposal_timeout_s)
            except TimeoutError as exc:
                raise OutcomeUnknownError(
                    f"membership change {action} {address} timed out"
                ) from exc
            if error == FAIL_REASON.SUCCESS:
                self._refresh_status(force=True)
                return
            if error != FAIL_REASON.REQUEST_DENIED or loop.time() > deadline:
                reason = _NOT_COMMITTED.get(error, f"failure {error}")
                raise NotCommittedError(f"membership change {action} {address}: {reason}")
            await asyncio.sleep(0.1)

    # -- status ----------------------------------------------------------------

    def reachable(self) -> frozenset[str]:
        """Members this node has a live Raft connection to, its own address included.

        A member whose process died drops its connection at once, so the leader
        learns of a dead host well before any timeout.
        """
        syncobj = self._syncobj
        if syncobj is None:
            return frozenset()
        try:
            others = [n for n in syncobj.otherNodes if syncobj.isNodeConnected(n)]
        except RuntimeError:  # the set changed under us on the pysyncobj thread
            return frozenset({self.config.self_address})
        return frozenset({self.config.self_address, *(n.address for n in others)})

    def status(self) -> RaftStatus:
        with self._status_lock:
            status = self._status
        syncobj = self._syncobj
        if syncobj is None:
            return status
        # Indexes are read live so a status taken after an acknowledged write shows it.
        return dataclasses.replace(
            status, commit_index=syncobj.raftCommitIndex, applied_index=self._applied_index
        )

    def on_leader_change(self, listener: Callable[[RaftStatus], None]) -> None:
        """Call ``listener`` on the event loop whenever the known leader or term changes."""
        self._leader_listeners.append(listener)

    def _on_tick(self) -> None:
        # Runs on the pysyncobj thread after every tick.
        self._refresh_status(force=False)
        now = time.monotonic()
        if now - self._last_sync_at > self.config.view_sync_interval_s:
            self._last_sync_at = now
            self.view.sync()

    def _refresh_status(self, force: bool) -> None:
        syncobj = self._syncobj
        if syncobj is None:
            return
        now = time.monotonic()
        leader = syncobj._getLeader()
        leader_address = leader.address if leader is not None else None
        term = syncobj.raftCurrentTerm
        previous = self._status
        changed = leader_address != previous.leader_address or term != previous.term
        if not (force or changed or now - self._last_status_at >= self.config.status_refresh_s):
            return
        self._last_status_at = now
        self_address = self.config.self_address
        members = tuple(sorted({self_address, *(n.address for n in syncobj.otherNodes)}))
        status = RaftStatus(
            self_address=self_address,
            leader_address=leader_address,
            term=term,
            commit_index=syncobj.raftCommitIndex,
            applied_index=self._applied_index,
            members=members,
            is_leader=syncobj._isLeader(),
            ready=syncobj.isReady() and leader_address is not None,
            has_quorum=bool(syncobj.hasQuorum),
        )
        with self._status_lock:
            self._status = status
        if changed and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify_leader_change, status)

    def _notify_leader_change(self, status: RaftStatus) -> None:
        logger.info("leader is now %s (term %d)", status.leader_address, status.term)
        for listener in list(self._leader_listeners):
            try:
                listener(status)
            except Exception:
                logger.exception("leader-change listener failed")

    # -- pysyncobj thread: apply and dumps -------------------------------------

    def _on_apply(self, payload: bytes, index: int) -> list[OpResult] | None:
        if index <= self._applied_index:
            # Journal replay after a restart: the view already holds this entry.
            return None
        tables = self.config.tables
        applied = self.view.apply_with(
            index, lambda read: apply_command(payload, index, read, tables)
        )
        self._applied_index = index
        return list(applied.results)

    def _write_dump(self, filename: str, raft_data: tuple[Any, ...]) -> None:
        last_entry, previous_entry, cluster = raft_data
        meta = orjson.dumps(
            {
                "v": 1,
                "entries": [_entry_to_json(last_entry), _entry_to_json(previous_entry)],
                "cluster": sorted(node.address for node in cluster),
            }
        )
        self.view.write_snapshot(Path(filename), meta)

    def _read_dump(self, filename: str) -> tuple[Any, ...]:
        meta = orjson.loads(self.view.restore_snapshot(Path(filename)))
        if meta.get("v") != 1:
            raise RaftError(f"unsupported dump metadata version {meta.get('v')}")
        self._applied_index = self.view.applied_index()
        last_entry, previous_entry = (_entry_from_json(e) for e in meta["entries"])
        return last_entry, previous_entry, list(meta["cluster"])


def _settle(future: asyncio.Future[int], error: int) -> None:
    if not future.done():
        future.set_result(error)


def _entry_to_json(entry: tuple[bytes, int, int]) -> list[object]:
    command, index, term = entry
    return [base64.b64encode(bytes(command)).decode(), index, term]


def _entry_from_json(raw: list[Any]) -> tuple[bytes, int, int]:
    return base64.b64decode(raw[0]), int(raw[1]), int(raw[2])
