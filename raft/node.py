"""A Raft node on pysyncobj, driven by the asyncio event loop.

pysyncobj keeps the Raft state; this module is the seam:

* pysyncobj runs without its own thread (``autoTick=False``): its sockets are
  watched by the event loop
  (``_LoopPoller``), and the node ticks it after every batch of socket events,
  after every proposal and every ``tick_interval_s`` (timers: heartbeats,
  elections, reconnections). Everything therefore runs on the event loop
  thread: no lock, no GIL hand-over, no thread wake-ups per write;
* proposals go in through ``propose``, are grouped into one Raft entry per
  batch (group commit: while a node's batch is being committed, the next one
  fills up) and resolve their futures when pysyncobj reports them applied;
* committed entries are applied by the pure ``apply_command_indexed`` and
  stored in the LMDB ``StateView``, one transaction per entry; the state budget
  (``max_state_bytes``) refuses writes deterministically (``raft.state_machine``),
  and a member whose view cannot hold an entry even at ``max_view_bytes`` stops
  (``ViewFullError``) instead of retrying it on every tick;
* ``propose`` refuses, before anything reaches pysyncobj, operations that encode
  to more than ``max_entry_bytes`` (``EntryTooLargeError``) and writes the state
  budget would refuse as this member sees it (``StateFullError``);
* pysyncobj's connections are capped (``raft.transport``): a peer announcing a
  message larger than the largest entry, or larger than a few KiB before it has
  proved it knows the password, is dropped at once instead of buffered;
* full dumps (log compaction, and catching up a far-behind follower) are LMDB
  copies written and installed through pysyncobj's serializer hooks; the log
  is also compacted once it holds more bytes than a dump would, which bounds
  its memory;
* a status snapshot is refreshed on ticks, and leadership changes are
  delivered to listeners.

Ordering rules: a proposal's future resolves only after its entry is committed
by a majority and applied to this node's view, so a read after an acknowledged
write sees it; a ``barrier`` proposal therefore gives linearizable reads on any
member.

The event loop must not block for long: a stall longer than the election
timeout looks like a dead node to the others. Slow disk work (``fsync`` of the
view) runs in a worker thread; dumps are written synchronously, as pysyncobj
needs them complete when its serializer returns.

Its size: the asyncio bridge owns pysyncobj's thread, the group commit, the retry rules
of proposals and the membership changes, which all share one lock and one queue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pysyncobj import FAIL_REASON, SyncObjConf, replicated
from pysyncobj.poller import POLL_EVENT_TYPE

from raft.append_fix import SafeAppendsSyncObj
from raft.commands import Append, Barrier, Op, Put, Session, encode_ops, join_encoded
from raft.config import RaftConfig
from raft.errors import (
    BackloggedError,
    EntryTooLargeError,
    NotCommittedError,
    OutcomeUnknownError,
    ProposalError,
    RaftError,
    SessionError,
    StateFullError,
    ViewFullError,
)
from raft.journal import DurableJournal
from raft.journal import register as register_journal
from raft.password import PasswordRing, derive
from raft.sessions import SESSION_REFUSALS, ClientRequest
from raft.state_machine import NO_SPACE, OpResult, apply_command_indexed, growth_bound, record_cost
from raft.transport import CappedTransport, message_cap
from raft.view import StateView

logger = logging.getLogger(__name__)

_NOT_COMMITTED = {
    FAIL_REASON.QUEUE_FULL: "queue_full",
    FAIL_REASON.MISSING_LEADER: "no_leader",
    FAIL_REASON.DISCARDED: "discarded",
    FAIL_REASON.NOT_LEADER: "not_leader",
    FAIL_REASON.REQUEST_DENIED: "denied",
}

# Outcomes pysyncobj cannot tell, in words.
_UNKNOWN = {
    FAIL_REASON.LEADER_CHANGED: "the leader changed while the entry was in flight",
    FAIL_REASON.UNKNOWN_OUTCOME: "the entry's outcome is unknown to this member",
}


def retryable(error: ProposalError, *, idempotent: bool, read_only: bool) -> bool:
    """May a failed proposal be sent again? One that certainly did nothing, if the caller
    says its ops are idempotent. One whose outcome is unknown (the leader changed while a
    follower waited for its answer: the entry may be committed) only if it writes nothing:
    a write applied by the first attempt and again after another client's newer write to
    the same key would undo that write (found by the chaos suite's linearizability check)."""
    if isinstance(error, NotCommittedError):
        return idempotent
    return read_only


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def final_error(error: ProposalError, earlier: OutcomeUnknownError | None) -> ProposalError:
    """What a proposal sent more than once answers: a last attempt that certainly did
    nothing says nothing of an earlier one whose outcome was unknown."""
    if earlier is not None and isinstance(error, NotCommittedError):
        return OutcomeUnknownError(f"{earlier}; sent again, then: {error.reason}")
    return error


_BATCH_HEADER_BYTES = len(join_encoded(0, []))
# An append stores its item under key + 8 bytes and a 16-byte counter under key.
_ITEM_SUFFIX_BYTES = 8
_COUNTER_BYTES = 16
_BIND_ATTEMPTS = 10
MEMBERSHIP_RETRY_S = 25.0  # under the agent CLI's 30 s HTTP timeout
_BIND_RETRY_S = 1.0


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


@dataclass(slots=True)
class _Proposal:
    count: int  # operations
    body: bytes  # the operations, encoded once (``encode_ops``); dropped once handed over
    future: asyncio.Future[list[OpResult]]
    handed: bool = False  # given to pysyncobj: from then on it may be applied
    # Set when its caller was told the outcome is unknown: the answer that came later.
    outcome: asyncio.Future[list[OpResult]] | None = None


@dataclass(slots=True)
class _InFlight:
    batch_id: int
    proposals: list[_Proposal]
    timer: asyncio.TimerHandle | None = None
    done: bool = False


# Batches past their time whose outcome is still awaited (``_InFlight`` late): at most
# this many are remembered, the oldest then answered as unknown for good.
_MAX_LATE_BATCHES = 1024


EventCallback = Callable[[int, int], None]


class _LoopPoller:
    """pysyncobj's poller interface (``subscribe``/``unsubscribe``/``poll``) on the event loop.

    pysyncobj registers every socket and its wake-up pipe with ``SyncObj._poller``
    and expects ``poll`` to dispatch their events. Here the event loop watches
    them and dispatches each event as it comes, then asks for a tick, which is
    what pysyncobj's own thread does after ``poll`` returns. Registrations made
    on another thread (while ``SyncObj`` is constructed) are handed to the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[], None]) -> None:
        self._loop = loop
        self._on_event = on_event
        self._loop_thread = threading.get_ident()
        self._callbacks: dict[int, EventCallback] = {}

    def subscribe(self, descr: int, callback: EventCallback, event_mask: int) -> None:
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.subscribe, descr, callback, event_mask)
            return
        loop = self._loop
        self._callbacks[descr] = callback
        # An error or hang-up makes the socket readable; pysyncobj then sees it on recv.
        if event_mask & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR):
            loop.add_reader(descr, self._dispatch, callback, descr, POLL_EVENT_TYPE.READ)
        else:
            loop.remove_reader(descr)
        if event_mask & POLL_EVENT_TYPE.WRITE:
            loop.add_writer(descr, self._dispatch, callback, descr, POLL_EVENT_TYPE.WRITE)
        else:
            loop.remove_writer(descr)

    def unsubscribe(self, descr: int) -> None:
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.unsubscribe, descr)
            return
        # Events of descr already queued by the loop are dropped by _dispatch.
        self._callbacks.pop(descr, None)
        for remove in (self._loop.remove_writer, self._loop.remove_reader):
            # pysyncobj closes a socket before it unsubscribes it, which some
            # selectors report; the kernel has forgotten the descriptor anyway.
            with contextlib.suppress(OSError):
                remove(descr)

    def poll(self, timeout: float) -> None:
        """Nothing to wait for: the event loop has already dispatched every event."""

    def close(self) -> None:
        for descr in list(self._callbacks):
            self.unsubscribe(descr)

    def _dispatch(self, callback: EventCallback, descr: int, event: int) -> None:
        if self._callbacks.get(descr) != callback:
            return  # unsubscribed, or the descriptor now belongs to another connection
        try:
            callback(descr, event)
        finally:
            self._on_event()


class _SyncObj(SafeAppendsSyncObj):
    """The pysyncobj object; its one replicated method hands bytes to ``on_apply``.

    A follower keeps the entries it holds when an append comes late or twice
    (``raft.append_fix``).

    Its ``_poller`` (the attribute through which pysyncobj's transport and
    wake-up pipe register their file descriptors) is the event loop's.
    """

    def __init__(
        self,
        self_address: str,
        partners: Sequence[str],
        conf: SyncObjConf,
        on_apply: Callable[[bytes, int], list[OpResult] | None],
        poller: _LoopPoller,
        max_message_bytes: int,
        ring: PasswordRing,
    ) -> None:
        self._on_apply = on_apply
        self._appends_sent: tuple[int, int] | None = None  # (last index, commit index)
        self.__dict__["_loop_poller"] = poller
        self.__dict__["_password_ring"] = ring  # before the transport reads it
        transport = functools.partial(
            CappedTransport, message_bytes=max_message_bytes, before_send=self.sync_journal
        )
        super().__init__(self_address, list(partners), conf, transportClass=transport)

    @property
    def _poller(self) -> _LoopPoller:
        poller: _LoopPoller = self.__dict__["_loop_poller"]
        return poller

    @_poller.setter
    def _poller(self, _ignored: object) -> None:
        """SyncObj's constructor makes a ``select.poll`` poller: the loop's is kept."""

    def send_appends(self) -> None:
        """As leader, send what this tick changed (entries appended, the commit index
        advanced) to every follower, once; pysyncobj's heartbeat carries the rest."""
        if not self._isLeader():
            self._appends_sent = None
            return
        state = (self._SyncObj__getCurrentLogIndex(), self._SyncObj__raftCommitIndex)
        if state != self._appends_sent:
            self._appends_sent = state
            self._SyncObj__sendAppendEntries()

    def sync_journal(self) -> None:
        """Put the journal on disk if it changed (a no-op unless it is durable)."""
        journal = self.__dict__.get("_SyncObj__raftLog")  # pysyncobj's, once it made it
        if isinstance(journal, DurableJournal):
            journal.sync()

    @property
    def encryptor(self) -> PasswordRing:
        """Every connection's encryptor: the ring, whose passwords change in place (the
        conf carries no password, so pysyncobj derives no key of its own)."""
        ring: PasswordRing = self.__dict__["_password_ring"]
        return ring

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, payload: bytes) -> list[OpResult] | None:
        # pysyncobj increments raftLastApplied after this returns.
        return self._on_apply(payload, self.raftLastApplied + 1)


class RaftNode:
    """One member of a replicated state machine. Use as an async context manager."""

    def __init__(self, config: RaftConfig) -> None:
        config.validate()
        self.config = config
        # How long a session's request is resent for: leader changes take a few election
        # timeouts, and resending it is safe.
        self.session_retry_s = 2 * config.proposal_timeout_s
        self.view = StateView(
            config.data_dir / "view",
            config.tables,
            map_size=config.view_map_bytes,
            max_map_size=config.max_view_bytes,
        )
        self._tables = frozenset(config.tables)
        self._applied_index = self.view.applied_index()
        self._syncobj: _SyncObj | None = None
        self._poller: _LoopPoller | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Proposal] = deque()
        self._batches: dict[int, _InFlight] = {}
        self._late: dict[int, _InFlight] = {}  # out of their slot, outcome still awaited
        self._next_batch = 0
        self._flush_scheduled = False
        self._tick_scheduled = False
        self._tick_timer: asyncio.TimerHandle | None = None
        self._tick_interval_s = min(config.tick_interval_s, config.heartbeat_interval_s)
        self._tick_due = 0.0
        self._skipped_late_tick = False
        self._status = RaftStatus(config.self_address, None, 0, 0, 0, (), False, False, False)
        self._last_sync_at = time.monotonic()
        self._sync_task: asyncio.Future[None] | None = None
        self._log_bytes = 0  # payload bytes applied since the last dump
        self._compaction_asked = False
        self._handed_over = False  # commands given to pysyncobj since the last tick
        self._leader_listeners: list[Callable[[RaftStatus], None]] = []
        self._apply_listeners: list[Callable[[], None]] = []
        self._stopped = False
        self.failure: RaftError | None = None  # why the node stopped itself
        self._failure_stop: asyncio.Task[None] | None = None
        self._ring: PasswordRing | None = None  # the cluster password(s), from start()

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> RaftNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        data_dir = self.config.data_dir
        # Without it pysyncobj listens on 0.0.0.0; Raft must only answer where we say.
        bind_address = self.config.bind_address or self.config.self_address
        conf = SyncObjConf(
            password=None,  # encryption is the ring's: see _SyncObj.encryptor
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            serializer=self._write_dump,
            deserializer=self._read_dump,
            dynamicMembershipChange=True,
            # pysyncobj sends appends on its heartbeat timer only: the entries and the
            # commit index of a tick leave at its end, in one append per follower
            # (_SyncObj.send_appends), not one per command added and one more per apply.
            appendEntriesUseBatch=True,
            # An entry larger than this travels as a pickled dump in pieces, which is
            # several times slower: keep every entry group commit makes below it.
            appendEntriesBatchSizeBytes=2 * self.config.max_batch_bytes,
            commandsWaitLeader=True,
            bindAddress=bind_address,
            raftMinTimeout=self.config.election_timeout_min_s,
            raftMaxTimeout=self.config.election_timeout_max_s,
            appendEntriesPeriod=self.config.heartbeat_interval_s,
            leaderFallbackTimeout=self.config.leader_fallback_s,
            connectionTimeout=self.config.connection_timeout_s,
            connectionRetryTime=self.config.connection_retry_s,
            logCompactionMinEntries=self.config.compaction_min_entries,
            logCompactionMinTime=self.config.compaction_min_interval_s,
            # Ticked by the event loop (see _LoopPoller). Its constructor retries a
            # failed bind in a busy loop, so the port is awaited beforehand.
            autoTick=False,
            maxBindRetries=1,
        )
        # pysyncobj makes its journal through raft.journal's factory: durable or not.
        register_journal(data_dir / "raft.journal", self.config.durability)  # type: ignore[arg-type]
        await _wait_bindable(bind_address)
        if self._ring is None:
            await asyncio.to_thread(derive, [self.config.password])  # PBKDF2
            self._ring = PasswordRing(self.config.password)
        self._poller = _LoopPoller(loop, self._schedule_tick)
        try:
            # The constructor derives the cluster key (PBKDF2), reads the journal and binds.
            self._syncobj = await asyncio.to_thread(
                _SyncObj,
                self.config.self_address,
                self.config.partners,
                conf,
                self._on_apply,
                self._poller,
                message_cap(self.config.max_entry_bytes, conf.appendEntriesBatchSizeBytes),
                self._ring,
            )
        except BaseException:
            # Registrations made by the failed constructor are queued on the loop.
            loop.call_soon(self._poller.close)
            raise
        self._syncobj.addOnTickCallback(self._on_tick)
        self._tick_due = loop.time() + self._tick_interval_s
        self._tick_timer = loop.call_at(self._tick_due, self._periodic_tick)
        self._status = self.status()
        logger.info(
            "raft node %s started, partners %s",
            self.config.self_address,
            ", ".join(self.config.partners) or "none",
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        syncobj = self._syncobj
        if syncobj is not None:
            syncobj.destroy()  # closes its sockets and journal at once (no tick thread)
        if self._poller is not None:
            self._poller.close()
        for batch in [*self._batches.values(), *self._late.values()]:
            self._finish_batch(batch, None, OutcomeUnknownError("node stopped"))
        for proposal in self._pending:
            if not proposal.future.done():
                proposal.future.set_exception(NotCommittedError("node stopped"))
        self._pending.clear()
        if self._sync_task is not None:
            with contextlib.suppress(Exception):
                await self._sync_task
        self.view.close()

    # -- ticking pysyncobj ---------------------------------------------------

    def _schedule_tick(self) -> None:
        """Tick soon, once however many events and proposals arrive meanwhile."""
        if not self._tick_scheduled and self._loop is not None:
            self._tick_scheduled = True
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_scheduled = False
        syncobj = self._syncobj
        if syncobj is None or self._stopped:
            return
        handed_over, self._handed_over = self._handed_over, False
        try:
            syncobj.doTick(0.0)
        except Exception:
            logger.exception("pysyncobj tick failed")
            syncobj.sync_journal()  # a tick cut short skipped _on_tick's sync
        if handed_over:
            # pysyncobj appends new commands at the end of a tick and commits them in a
            # later one. Peers' acks bring that tick; a lone node has none, so tick again
            # now rather than at the next timer (a whole tick interval per write).
            self._schedule_tick()

    def _periodic_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        late = now - self._tick_due > self._tick_interval_s
        self._tick_due = now + self._tick_interval_s
        self._tick_timer = loop.call_at(self._tick_due, self._periodic_tick)
        if late and not self._skipped_late_tick:
            # The loop was blocked for a while. Network events that piled up
            # meanwhile (heartbeats, acks) are handled first, each followed by a
            # tick, so that pysyncobj's timers do not fire as if the peers were silent.
            self._skipped_late_tick = True
            return
        self._skipped_late_tick = False
        self._tick()

    # -- proposals ---------------------------------------------------------

    async def propose(
        self, ops: Sequence[Op], *, idempotent: bool = False, session: ClientRequest | None = None
    ) -> list[OpResult]:
        """Commit ``ops`` atomically (in one entry) and return one result each.

        Raises NotCommittedError (safe to retry) or OutcomeUnknownError. With
        ``idempotent`` (applying the ops twice has the effect of applying them
        once: plain puts, deletes, barriers), attempts that certainly did
        nothing are retried until ``proposal_timeout_s`` has passed, which
        hides most leader changes; see ``retryable`` for the unknown ones.

        With ``session`` the ops are that request of a client session
        (``raft.sessions``), applied at most once: every failed attempt, an unknown
        outcome included, is resent until ``session_retry_s`` has passed, and a resent
        request already applied answers with its first results. SessionError if the
        session refuses it.
        """
        if self._stopped or self._syncobj is None or self._loop is None:
            reason = "node not running" if self.failure is None else f"node stopped: {self.failure}"
            raise NotCommittedError(reason)
        if session is not None:
            ops = [Session(session.client, session.seq, session.floor, len(ops)), *ops]
        body = encode_ops(ops)
        self._check_limits(ops, body)
        read_only = all(isinstance(op, Barrier) for op in ops)
        timeout_s = self.config.proposal_timeout_s if session is None else self.session_retry_s
        deadline = self._loop.time() + timeout_s
        delay_s = 0.05
        unknown: OutcomeUnknownError | None = None  # an earlier attempt's
        while True:
            try:
                results = await self._propose_once(len(ops), body, deadline)
                if session is None:
                    return results
                if results[0].error in SESSION_REFUSALS:  # else the ops' results say it
                    raise SessionError(str(results[0].error))
                return results[1:]
            except SessionError:
                raise
            except ProposalError as exc:
                late = self._stopped or self._loop.time() + delay_s >= deadline
                safe = session is not None and not isinstance(
                    exc, EntryTooLargeError | StateFullError
                )
                if late or not (safe or retryable(exc, idempotent=idempotent, read_only=read_only)):
                    error = final_error(exc, unknown)
                    if error is exc:
                        raise
                    raise error from exc
                if isinstance(exc, OutcomeUnknownError):
                    unknown = exc
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    def _check_limits(self, ops: Sequence[Op], body: bytes) -> None:
        """Refuse, before proposing them, operations too large for one entry and writes
        the state budget would refuse (as this member's view sees the state: the
        outcome at apply time, on the committed state, is what counts)."""
        size = _BATCH_HEADER_BYTES + len(body)
        if size > self.config.max_entry_bytes:
            raise EntryTooLargeError(
                f"the operations encode to {size} bytes, over max_entry_bytes "
                f"({self.config.max_entry_bytes})"
            )
        budget = self.config.max_state_bytes
        used = self.view.logical_bytes()
        if used + growth_bound(len(body), len(ops)) <= budget:
            return  # far from the budget: not even the precise bound below is needed
        # An upper bound of what the writes add: no lookup while far from the budget.
        most = 0
        for op in ops:
            if isinstance(op, Put):
                most += record_cost(len(op.key), len(op.value))
            elif isinstance(op, Append):
                most += record_cost(len(op.key) + _ITEM_SUFFIX_BYTES, len(op.value))
                most += record_cost(len(op.key), _COUNTER_BYTES)
        if not most or used + most <= budget:
            return
        payload = join_encoded(len(ops), [body])
        index = self._applied_index + 1
        tables = self._tables
        applied = self.view.evaluate(
            lambda read_stored, read_value, used: apply_command_indexed(
                payload, index, read_stored, tables, read_value, used_bytes=used, max_bytes=budget
            )
        )
        if any(result.error == NO_SPACE for result in applied.results):
            raise StateFullError(
                f"the writes would take the state past max_state_bytes ({budget}; "
                f"{self.view.logical_bytes()} in use)"
            )

    async def _propose_once(self, count: int, body: bytes, deadline: float) -> list[OpResult]:
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[list[OpResult]] = loop.create_future()
        proposal = _Proposal(count, body, future)
        self._pending.append(proposal)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # A plain timer rather than asyncio.wait_for: far cheaper per proposal.
        timer = loop.call_at(deadline, self._expire, proposal)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, proposal: _Proposal) -> None:
        if proposal.future.done():
            return
        if not proposal.handed:  # ``_flush`` skips it from now on: nothing can apply it
            proposal.future.set_exception(
                BackloggedError(
                    f"not proposed within {self.config.proposal_timeout_s:g}s: earlier "
                    "proposals were still in flight"
                )
            )
            return
        proposal.future.set_exception(self._unknown(proposal))

    def _unknown(self, proposal: _Proposal) -> OutcomeUnknownError:
        """The error of a handed-over proposal past its time, with the future its later
        outcome will resolve (pysyncobj reports every entry it took, once its index is
        applied: see ``_finish_batch``)."""
        assert self._loop is not None
        if proposal.outcome is None:
            proposal.outcome = self._loop.create_future()
            # Nobody may wait for it: its error must not be logged as never retrieved.
            proposal.outcome.add_done_callback(_retrieve)
        return OutcomeUnknownError(
            f"no commit within {self.config.proposal_timeout_s:g}s "
            "(no quorum, leader lost, or a slow commit?)",
            proposal.outcome,
        )

    async def barrier(self) -> int:
        """Return once every entry committed before the call is applied locally."""
        results = await self.propose([Barrier()], idempotent=True)
        return results[0].index

    def _flush(self) -> None:
        """Hand the pending proposals to pysyncobj, as few entries as the limits allow."""
        self._flush_scheduled = False
        loop = self._loop
        syncobj = self._syncobj
        if loop is None or syncobj is None or self._stopped:
            return
        pending = self._pending
        max_ops = self.config.max_batch_ops
        max_bytes = self.config.max_batch_bytes
        while pending and len(self._batches) < self.config.max_batches_in_flight:
            live: list[_Proposal] = []
            ops_count = 0
            size = 0
            while pending:
                nxt = pending[0]
                if nxt.future.done():  # timed out while waiting
                    pending.popleft()
                    continue
                too_big = size + len(nxt.body) > max_bytes
                too_many = ops_count + nxt.count > max_ops
                if live and (too_big or too_many):
                    break
                live.append(pending.popleft())
                ops_count += nxt.count
                size += len(nxt.body)
            if not live:
                continue
            batch = _InFlight(self._next_batch, live)
            self._next_batch += 1
            self._batches[batch.batch_id] = batch
            batch.timer = loop.call_later(self.config.proposal_timeout_s, self._expire_batch, batch)
            payload = join_encoded(ops_count, [p.body for p in live])
            for proposal in live:
                proposal.handed = True
                proposal.body = b""
            syncobj.apply_entry(payload, callback=self._result_callback(batch))
            self._handed_over = True
        self._schedule_tick()

    def _expire_batch(self, batch: _InFlight) -> None:
        """A batch past its time frees its slot for the next one; its callers learn that
        the outcome is unknown, with a future for the answer pysyncobj gives later."""
        if batch.done:
            return
        batch.timer = None
        self._batches.pop(batch.batch_id, None)
        for proposal in batch.proposals:
            if not proposal.future.done():
                proposal.future.set_exception(self._unknown(proposal))
        if len(self._late) >= _MAX_LATE_BATCHES:
            oldest = self._late[next(iter(self._late))]
            self._finish_batch(oldest, None, OutcomeUnknownError("no answer kept for so long"))
        self._late[batch.batch_id] = batch
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _result_callback(self, batch: _InFlight) -> Callable[[Any, int], None]:
        def on_result(result: Any, error: int) -> None:
            # Called by pysyncobj during a tick, on the event loop.
            if error == FAIL_REASON.SUCCESS:
                self._finish_batch(batch, result, None)
            elif error in _NOT_COMMITTED:
                self._finish_batch(batch, None, NotCommittedError(_NOT_COMMITTED[error]))
            else:
                why = _UNKNOWN.get(error, f"pysyncobj failure {error}")
                self._finish_batch(batch, None, OutcomeUnknownError(why))

        return on_result

    def _finish_batch(
        self, batch: _InFlight, results: list[OpResult] | None, error: ProposalError | None
    ) -> None:
        if batch.done:
            return
        batch.done = True
        if batch.timer is not None:
            batch.timer.cancel()
        self._batches.pop(batch.batch_id, None)
        self._late.pop(batch.batch_id, None)
        if error is None and results is None:
            error = OutcomeUnknownError("entry applied without results (undecodable?)")
        offset = 0
        for proposal in batch.proposals:
            count = proposal.count
            # Its caller's future, or if that was answered "unknown", the later outcome.
            waiting = proposal.future if not proposal.future.done() else proposal.outcome
            if waiting is not None and not waiting.done():
                if error is not None:
                    waiting.set_exception(error)
                else:
                    assert results is not None
                    waiting.set_result(results[offset : offset + count])
            offset += count
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- membership ----------------------------------------------------------

    async def add_member(self, address: str) -> None:
        """Add a node (started with this cluster as partners); returns once committed."""
        await self._change_membership("add", address)

    async def remove_member(self, address: str, retry_s: float = MEMBERSHIP_RETRY_S) -> None:
        """Remove a node; returns once committed. The leader cannot be removed (pysyncobj
        refuses): make it ``step_down`` first."""
        await self._change_membership("remove", address, retry_s)

    def step_down(self) -> bool:
        """As leader, hand leadership to the most caught-up connected follower (Raft's
        TimeoutNow); False when not leader or no follower is fully caught up yet. The
        new leader shows in ``status()`` once elected."""
        if self._syncobj is None:
            return False
        outcome: list[int] = []
        self._syncobj.transferLeadership(callback=lambda _r, error: outcome.append(error))
        self._schedule_tick()
        return outcome == [FAIL_REASON.SUCCESS]

    async def _change_membership(
        self, action: str, address: str, retry_s: float = MEMBERSHIP_RETRY_S
    ) -> None:
        if self._syncobj is None or self._loop is None:
            raise NotCommittedError("node not running")
        loop = self._loop
        # pysyncobj refuses a change while another is uncommitted, and right
        # after an election (until the new leader's no-op is applied, which a
        # loaded site can take seconds to do): retry those refusals for a while.
        deadline = loop.time() + retry_s
        while True:
            future: asyncio.Future[int] = loop.create_future()

            def on_result(_result: Any, error: int, fut: asyncio.Future[int] = future) -> None:
                if not fut.done():
                    fut.set_result(error)

            if action == "add":
                self._syncobj.addNodeToCluster(address, callback=on_result)
            else:
                self._syncobj.removeNodeFromCluster(address, callback=on_result)
            self._schedule_tick()
            try:
                async with asyncio.timeout(self.config.proposal_timeout_s):
                    error = await future
            except TimeoutError as exc:
                raise OutcomeUnknownError(
                    f"membership change {action} {address} timed out"
                ) from exc
            if error == FAIL_REASON.SUCCESS:
                return
            if error != FAIL_REASON.REQUEST_DENIED or loop.time() > deadline:
                reason = _NOT_COMMITTED.get(error, f"failure {error}")
                raise NotCommittedError(f"membership change {action} {address}: {reason}")
            await asyncio.sleep(0.1)

    # -- the cluster password ----------------------------------------------------

    async def use_passwords(self, send: str, also_accept: Sequence[str] = ()) -> None:
        """Send with ``send`` and accept it and ``also_accept`` from now on, on the
        connections already open too (one step of a rolling change: raft.password)."""
        await asyncio.to_thread(derive, [send, *also_accept])  # PBKDF2, off the loop
        if self._ring is None:
            self._ring = PasswordRing(send)
        self._ring.use(send, also_accept)

    def passwords(self) -> tuple[str, tuple[str, ...]]:
        """The password this node sends with, and those it accepts."""
        if self._ring is None:
            return self.config.password, (self.config.password,)
        return self._ring.sending, self._ring.accepting

    # -- status ----------------------------------------------------------------

    def reachable(self) -> frozenset[str]:
        """Members this node has a live Raft connection to, its own address included.

        A member whose process died drops its connection at once, so the leader
        learns of a dead host well before any timeout.
        """
        syncobj = self._syncobj
        if syncobj is None:
            return frozenset()
        # pysyncobj runs on this event loop: its sets cannot change while we read them.
        others = [n for n in syncobj.otherNodes if syncobj.isNodeConnected(n)]
        return frozenset({self.config.self_address, *(n.address for n in others)})

    def status(self) -> RaftStatus:
        syncobj = self._syncobj
        if syncobj is None:
            return self._status
        leader = syncobj._getLeader()
        self_address = self.config.self_address
        leader_address = leader.address if leader is not None else None
        return RaftStatus(
            self_address=self_address,
            leader_address=leader_address,
            term=syncobj.raftCurrentTerm,
            commit_index=syncobj.raftCommitIndex,
            applied_index=self._applied_index,
            members=tuple(sorted({self_address, *(n.address for n in syncobj.otherNodes)})),
            is_leader=syncobj._isLeader(),
            ready=syncobj.isReady() and leader_address is not None,
            has_quorum=bool(syncobj.hasQuorum),
        )

    def on_leader_change(self, listener: Callable[[RaftStatus], None]) -> None:
        """Call ``listener`` on the event loop whenever the known leader or term changes."""
        self._leader_listeners.append(listener)

    def on_applied(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` on the event loop after each entry is applied to the view
        (during a tick: it must be cheap, e.g. schedule its work). Not called when a full
        dump replaces the view."""
        self._apply_listeners.append(listener)

    def _on_tick(self) -> None:
        # Called by pysyncobj at the end of every tick; keep it cheap.
        syncobj = self._syncobj
        assert syncobj is not None and self._loop is not None
        # Results committed in this tick reach their callers only after it returns: the
        # entries behind them are on disk first (a one-member cluster sends nothing). The
        # entries a leader appended in this tick went to its followers unsynced
        # (raft.transport.unsynced_send_allowed): it counts itself towards their commit in
        # a later tick only, after this sync.
        syncobj.send_appends()  # before the sync: followers write while the leader does
        syncobj.sync_journal()
        leader = syncobj._getLeader()
        leader_address = leader.address if leader is not None else None
        if leader_address != self._status.leader_address or (
            syncobj.raftCurrentTerm != self._status.term
        ):
            self._status = self.status()
            self._loop.call_soon(self._notify_leader_change, self._status)
        if (
            self._log_bytes > self.config.compaction_log_bytes
            and not self._compaction_asked
            and self._log_bytes > self.view.size_bytes()
        ):
            # The log holds more than a dump of the state would: compact it, which
            # bounds its memory (pysyncobj keeps every entry in memory until then).
            self._compaction_asked = True
            syncobj.forceLogCompaction()
        now = time.monotonic()
        if now - self._last_sync_at > self.config.view_sync_interval_s and self._sync_task is None:
            self._last_sync_at = now
            self._sync_task = self._loop.run_in_executor(None, self.view.sync)
            self._sync_task.add_done_callback(self._sync_done)

    def _sync_done(self, task: asyncio.Future[None]) -> None:
        self._sync_task = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("syncing the view failed: %s", task.exception())

    def _notify_leader_change(self, status: RaftStatus) -> None:
        logger.info("leader is now %s (term %d)", status.leader_address, status.term)
        for listener in list(self._leader_listeners):
            try:
                listener(status)
            except Exception:
                logger.exception("leader-change listener failed")

    # -- apply and dumps (called by pysyncobj during a tick) -------------------

    def _on_apply(self, payload: bytes, index: int) -> list[OpResult] | None:
        self._log_bytes += len(payload)
        if index <= self._applied_index:
            # Journal replay after a restart: the view already holds this entry.
            return None
        tables = self._tables
        budget = self.config.max_state_bytes
        try:
            applied = self.view.apply_indexed(
                index,
                lambda read_stored, read_value, used: apply_command_indexed(
                    payload,
                    index,
                    read_stored,
                    tables,
                    read_value,
                    used_bytes=used,
                    max_bytes=budget,
                ),
            )
        except ViewFullError as exc:
            self._fail(exc, index)
            raise
        self._applied_index = index
        for listener in self._apply_listeners:
            try:
                listener()
            except Exception:
                logger.exception("apply listener failed")
        return list(applied.results)

    def _fail(self, error: RaftError, index: int) -> None:
        """Stop the node: entry ``index`` cannot be applied here, and applying it any
        other way than the other members would make this replica diverge. The others
        carry on; the journal replays the entry once the node restarts with room."""
        if self.failure is not None:
            return
        self.failure = error
        logger.critical(
            "raft node %s stops: entry %d cannot be applied: %s (raise max_view_bytes "
            "or free disk space, then restart)",
            self.config.self_address,
            index,
            error,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_after_failure)

    def _stop_after_failure(self) -> None:
        self._failure_stop = asyncio.ensure_future(self.stop())

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
        self._log_bytes = 0
        self._compaction_asked = False

    def _read_dump(self, filename: str) -> tuple[Any, ...]:
        meta = orjson.loads(self.view.restore_snapshot(Path(filename)))
        if meta.get("v") != 1:
            raise RaftError(f"unsupported dump metadata version {meta.get('v')}")
        self._applied_index = self.view.applied_index()
        last_entry, previous_entry = (_entry_from_json(e) for e in meta["entries"])
        return last_entry, previous_entry, list(meta["cluster"])


async def _wait_bindable(address: str) -> None:
    """Wait until ``address`` can be bound (a previous process may still hold it)."""
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(_BIND_ATTEMPTS):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.strip("[]"), int(port)))
                return
            except OSError as exc:
                retry = exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
                if not retry or attempt == _BIND_ATTEMPTS - 1:
                    raise RaftError(f"cannot bind the raft address {address}: {exc}") from exc
        await asyncio.sleep(_BIND_RETRY_S)


def _entry_to_json(entry: tuple[bytes, int, int]) -> list[object]:
    command, index, term = entry
    return [base64.b64encode(bytes(command)).decode(), index, term]


def _entry_from_json(raw: list[Any]) -> tuple[bytes, int, int]:
    return base64.b64decode(raw[0]), int(raw[1]), int(raw[2])
