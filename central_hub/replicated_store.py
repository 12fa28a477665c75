"""The hub's store on a Raft cluster of hub replicas (an I/O adapter).

``ReplicatedStore`` is a ``Store`` whose tables are the Raft view's (``raft.view``): every
replica holds the same ones, applied from the same log. The hub's parts use it unchanged;
only the leader's hub plans changes (``central_hub.replica``).

Reads are this replica's view: each value after its record head (the log index that last
wrote it). The soft tables (``SOFT_DBS``: the latest report of each site) are this
replica's own LMDB and never go through Raft: at fleet scale reports arrive thousands of
times a second, more than the whole Raft write budget, and a lost one is re-sent within
seconds.

Writes (``apply``; ``commit`` from a worker thread) propose the writes of one change as one
Raft entry, fenced: when a replica becomes leader it writes ``meta/writer`` (``claim``),
and every entry it proposes starts with a ``Guard`` that applies it only while that record
is still its claim. A deposed leader's late proposals therefore change nothing and raise
``Deposed``; two leaders can never both extend the delta log. A proposal whose outcome is
unknown raises ``UnsureCommit``; either way the replica's hub stops and is rebuilt from the
replicated state (its in-memory head may be behind the log).

A slow commit is not an unknown outcome. Under load a commit can take longer than the
proposal timeout while this replica still leads: its entry is in its own log, and Raft
reports it once that index is applied, so the write waits for that answer (up to
``SETTLE_S`` more) instead of stopping the hub: stopping it would close every site's
stream and long-poll on the replica that is busiest already. A change still queued behind
earlier ones when its time runs out was never proposed: it raises ``Backlogged`` (retry)
and the hub goes on.

Key files: the hub keeps its keys in files sealed with the KEK (``central_hub.keyfiles``).
Each write also carries every key file whose content changed since the last one
(``meta/keyfile:NAME``, the sealed text; a deleted file, a delete), so a key created or
rotated by a change is replicated with it; ``materialise`` writes them back into a new
leader's key directory before its hub opens them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from central_hub.errors import ApiError
from central_hub.keyfiles import PLAIN_KEY_FILES
from central_hub.store import DBS, Store, Write
from raft.commands import Delete, Guard, Op, Put
from raft.durable import write_durably
from raft.errors import BackloggedError, NotCommittedError, OutcomeUnknownError, ProposalError
from raft.node import RaftNode
from raft.state_machine import NO_SPACE, RECORD_HEAD_BYTES, OpResult

logger = logging.getLogger(__name__)

SOFT_DBS = frozenset({"reports"})
REPLICATED_DBS = tuple(db for db in DBS if db not in SOFT_DBS)
WRITER_KEY = b"writer"
KEYFILE_PREFIX = "keyfile:"
# How much longer than the proposal timeout a slow commit of this replica's own is awaited
# before the hub gives up on it (and is rebuilt from the replicated state).
SETTLE_S = 30.0


class Deposed(ApiError):
    """This replica is no longer the one writing: its change was not applied."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            503,
            "leader_changed",
            f"the hub's leader changed; the change was not applied: retry it ({detail})",
            headers={"Retry-After": "1"},
        )


class UnsureCommit(ApiError):
    """The change may or may not have been applied (the leader changed meanwhile)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            503,
            "outcome_unknown",
            "the hub's leader changed while the change was committed: it may or may not "
            f"have been applied; read the state before retrying ({detail})",
            headers={"Retry-After": "1"},
        )


class Backlogged(ApiError):
    """The change waited behind earlier ones until its time ran out: never proposed."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            503,
            "hub_busy",
            f"the hub is committing earlier changes; this one was not applied: retry it ({detail})",
            headers={"Retry-After": "1"},
        )


class StoreFull(ApiError):
    """The replicated state's budget refused the change."""

    def __init__(self) -> None:
        super().__init__(507, "store_full", "the hub's replicated state is full")


class ReplicatedStore(Store):
    """See the module docstring. ``local`` holds the soft tables; ``key_dir`` is where
    the hub's key files are."""

    def __init__(
        self, node: RaftNode, local: Store, key_dir: Path, on_lost: Callable[[], None]
    ) -> None:
        # Not Store.__init__: the replicated tables are the view's environment.
        self._node = node
        self._local = local
        self._key_dir = key_dir
        self._on_lost = on_lost  # this replica's hub must stop: it may be behind the log
        self._claim_index = 0  # the log index of this replica's writer record
        self._published: dict[str, bytes | None] = {}  # key file -> what the state holds
        self._loop: asyncio.AbstractEventLoop | None = None
        self.grown = 0
        self.slow_commits = 0  # commits answered after the proposal timeout

    # -- reads ----------------------------------------------------------------------------

    def _read(self, db: str) -> Any:
        if db in SOFT_DBS:
            return self._local._read(db)
        view = self._node.view
        return view.read_txn(view.reader(db))  # from a worker thread too: see raft.view

    def _skip(self, db: str) -> int:
        return 0 if db in SOFT_DBS else RECORD_HEAD_BYTES

    def generation(self, db: str) -> int:
        if db in SOFT_DBS:
            return self._local.generation(db)
        # Entries apply on the event loop's thread, where the readers of this count are.
        return self._node.view.changes(db)

    @property
    def map_size(self) -> int:
        return self._node.view.map_size()

    def used_bytes(self) -> int:
        return self._node.view.size_bytes()

    def close(self) -> None:
        """Flush the soft tables; they and the view outlive this hub (the replica's)."""
        self._local.sync()

    def sync(self) -> None:
        self._local.sync()

    # -- the writer's claim ---------------------------------------------------------------

    async def claim(self, replica: str, term: int) -> None:
        """Become the writer: every change proposed after this is fenced by this claim."""
        self._loop = asyncio.get_running_loop()
        record = orjson.dumps({"replica": replica, "term": term})
        results = await self._propose([Put("meta", WRITER_KEY, record)])
        self._claim_index = results[0].index
        self._published = {
            name: self.get("meta", (KEYFILE_PREFIX + name).encode()) for name in PLAIN_KEY_FILES
        }
        logger.info("hub replica %s writes from log index %d", replica, self._claim_index)

    def materialise(self) -> int:
        """Write the replicated key files into the key directory (and remove the key files
        the state does not hold); returns how many files the state holds."""
        held = 0
        for name in PLAIN_KEY_FILES:
            path = self._key_dir / name
            text = self.get("meta", (KEYFILE_PREFIX + name).encode())
            if text is None:
                path.unlink(missing_ok=True)
                continue
            held += 1
            if not path.exists() or path.read_bytes() != text:
                write_durably(path, text, mode=0o600)
        return held

    def _key_file_writes(self) -> list[Put | Delete]:
        ops: list[Put | Delete] = []
        for name in PLAIN_KEY_FILES:
            path = self._key_dir / name
            try:
                text: bytes | None = path.read_bytes()
            except FileNotFoundError:
                text = None
            if text != self._published.get(name):
                key = (KEYFILE_PREFIX + name).encode()
                ops.append(Delete("meta", key) if text is None else Put("meta", key, text))
        return ops

    # -- writes ---------------------------------------------------------------------------

    async def apply(self, writes: Sequence[Write], *, sync: bool) -> None:
        soft = [w for w in writes if w[0] in SOFT_DBS]
        if soft:
            await self._local.apply(soft, sync=sync)
        ops: list[Op] = [
            Delete(db, key) if value is None else Put(db, key, value)
            for db, key, value in writes
            if db not in SOFT_DBS
        ]
        if not ops:
            return
        if not self._claim_index:
            raise Deposed("this hub replica is not the writer")
        files = self._key_file_writes()
        ops += list(files)
        fenced: list[Op] = [Guard("meta", WRITER_KEY, self._claim_index, len(ops)), *ops]
        try:
            results = await self._propose(fenced)
        except BackloggedError as exc:
            raise Backlogged(str(exc)) from exc  # nothing proposed: the hub is in step
        except NotCommittedError as exc:
            self._lose()
            raise Deposed(f"not committed: {exc}") from exc
        except ProposalError as exc:
            self._lose()
            raise UnsureCommit(str(exc)) from exc
        errors = {result.error for result in results[1:] if not result.ok}
        if "guarded" in errors:
            self._lose()
            raise Deposed("another hub replica became the writer")
        if NO_SPACE in errors:
            raise StoreFull()
        for op in files:
            name = op.key.decode()[len(KEYFILE_PREFIX) :]
            self._published[name] = op.value if isinstance(op, Put) else None

    async def _propose(self, ops: list[Op]) -> list[OpResult]:
        """``RaftNode.propose``, waiting out a slow commit (module docstring)."""
        try:
            return await self._node.propose(ops)
        except OutcomeUnknownError as unknown:
            if unknown.outcome is None:
                raise
            self.slow_commits += 1
            logger.warning("hub change slow to commit (%s); waiting for its outcome", unknown)
            try:
                async with asyncio.timeout(SETTLE_S):
                    results: list[OpResult] = await unknown.outcome
                    return results
            except TimeoutError:
                raise OutcomeUnknownError(f"{unknown}; no outcome {SETTLE_S:g}s later") from None

    def _lose(self) -> None:
        self._claim_index = 0
        self._on_lost()

    def commit(self, writes: Sequence[Write], *, sync: bool) -> None:
        """``apply`` from a worker thread (the hub opens its data in one)."""
        loop = self._loop
        if loop is None:
            raise Deposed("this hub replica is not the writer")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("ReplicatedStore.commit called on the event loop: use apply")
        if all(db in SOFT_DBS for db, _, _ in writes):
            self._local.commit(writes, sync=sync)
            return
        asyncio.run_coroutine_threadsafe(self.apply(writes, sync=sync), loop).result()
