"""The LMDB materialised view of the applied state (an I/O adapter).

Every committed entry is written here together with its log index, in one
transaction, so reads are a local B-tree lookup and the state is readable
right after a restart. Full dumps for Raft log compaction are consistent
copies of this environment (``copyfd``), and installing a dump received from
the leader replaces the tables in one transaction.

Durability: transactions are not fsynced one by one (the Raft journal is the
source of truth and replays what the view missed); ``sync`` flushes them and is
called periodically and at shutdown.

Size: the LMDB map (the most the file may grow to) starts at ``map_size`` and
doubles, up to ``max_map_size``, whenever the pages in use pass three quarters
of it after a write, or when a write meets ``MDB_MAP_FULL`` (then the write is
retried). ``set_mapsize`` needs no transaction open in the process: writes run on
the event loop thread, and read transactions, which other threads may open too (a
hub replica reads its state in a worker thread while the loop applies entries), go
through ``read_txn``, which counts them: the map grows once none is open, new ones
waiting meanwhile (a growth that is only due, not forced by ``MDB_MAP_FULL``, waits
for no reader: it is tried again after a later write). A write that still does not
fit raises ``ViewFullError``. The view also keeps the logical size of the state (see
``raft.state_machine``) in its metadata, updated in the transaction of each
entry, and recounts it from the records when it is missing.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

from raft.errors import SnapshotError, ViewFullError
from raft.sessions import SESSIONS_TABLE
from raft.state_machine import (
    Applied,
    Reader,
    Record,
    StoredReader,
    ValueReader,
    Write,
    record_cost,
)

logger = logging.getLogger(__name__)

_META_DB = b"__raft__"
_APPLIED_KEY = b"applied_index"
_SNAPSHOT_KEY = b"snapshot_meta"
_LOGICAL_KEY = b"logical_bytes"
_INDEX = struct.Struct(">Q")
DEFAULT_MAP_SIZE = 1 << 30
DEFAULT_MAX_MAP_SIZE = 16 << 30
# Grow the map once the pages in use pass this fraction of it.
GROW_AT = 0.75
READERS_WAIT_S = 30.0  # the longest a forced growth waits for read transactions to close

T = TypeVar("T")


class StateView:
    """Tables of (key -> Record) in one LMDB environment, plus the applied index."""

    def __init__(
        self,
        path: Path,
        tables: Sequence[str],
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # The client sessions' table (raft.sessions) is the state machine's own.
        self.tables = (*tables, *(() if SESSIONS_TABLE in tables else (SESSIONS_TABLE,)))
        self.max_map_size = max(map_size, max_map_size)
        self._env = lmdb.open(
            str(path),
            max_dbs=len(self.tables) + 1,
            map_size=map_size,
            sync=False,
            metasync=False,
            max_readers=256,
        )
        # Read transactions open (any thread) and whether the map is being resized.
        self._reads = threading.Condition()
        self._open_reads = 0
        self._resizing = False
        # Checked after every write: kept here rather than asked of LMDB each time.
        self._page_bytes = int(self._env.stat()["psize"])
        self._map_bytes = self.map_size()
        self._meta = self._env.open_db(_META_DB)
        self._dbs = {name: self._env.open_db(name.encode()) for name in self.tables}
        # Bumped by every write to a table: what is derived from a table is valid while
        # its count is unchanged (see ``changes``).
        self._changes = dict.fromkeys(self.tables, 0)
        self._logical = self._load_logical()
        self._maybe_grow()

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    def sync(self) -> None:
        self._env.sync(True)

    def size_bytes(self) -> int:
        """The size of the data in use (what a dump of the view would copy)."""
        return int((self._env.info()["last_pgno"] + 1) * self._page_bytes)

    def map_size(self) -> int:
        """The current size of the LMDB map: what the data may grow to before it grows."""
        return int(self._env.info()["map_size"])

    def logical_bytes(self) -> int:
        """The logical size of the state: ``record_cost`` summed over every record."""
        return self._logical

    def changes(self, table: str) -> int:
        """A count that changes whenever a record of ``table`` is written, deleted or
        replaced by a snapshot (before the next read of the view can see it)."""
        return self._changes[table]

    def applied_index(self) -> int:
        with self.read_txn(self._meta) as txn:
            raw = txn.get(_APPLIED_KEY)
        return 0 if raw is None else int(_INDEX.unpack(raw)[0])

    @contextmanager
    def read_txn(self, db: lmdb._Database | None = None) -> Iterator[lmdb.Transaction[bytes]]:
        """A read transaction, from any thread; the map is not resized while it is open
        (see Size). For readers that decode records themselves (``reader``)."""
        with self._reads:
            while self._resizing:
                self._reads.wait()
            self._open_reads += 1
        try:
            with self._env.begin(db=db) as txn:
                yield txn
        finally:
            with self._reads:
                self._open_reads -= 1
                if not self._open_reads:
                    self._reads.notify_all()

    def reader(self, table: str) -> lmdb._Database:
        """The database of ``table`` for readers that decode records themselves (each
        value is ``Record.encode``: the index, ``RECORD_HEAD_BYTES``, then the value),
        in a ``read_txn``."""
        return self._dbs[table]

    def get(self, table: str, key: bytes) -> Record | None:
        with self.read_txn(self._dbs[table]) as txn:
            raw = txn.get(key)
        return None if raw is None else Record.decode(raw)

    def scan(
        self,
        table: str,
        prefix: bytes,
        limit: int,
        *,
        start: bytes | None = None,
        preceding: bool = False,
    ) -> tuple[list[tuple[bytes, Record]], bool]:
        """Up to ``limit`` records whose key starts with ``prefix``, in key order,
        and whether more follow. ``start`` begins at that key (or the next one);
        with ``preceding`` the last key before ``start`` under ``prefix`` comes first
        (the record covering ``start`` when keys are range starts)."""
        found: list[tuple[bytes, Record]] = []
        begin = prefix if start is None or start < prefix else start
        with self.read_txn(self._dbs[table]) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(begin)
            if preceding and start is not None:
                stepped = cursor.prev() if positioned else cursor.last()
                if stepped and bytes(cursor.key()).startswith(prefix):
                    positioned = True
                else:  # nothing before ``start`` under the prefix: back to ``start``
                    positioned = cursor.set_range(begin)
            if not positioned:
                return found, False
            for key, raw in cursor:
                if not key.startswith(prefix):
                    break
                if len(found) == limit:
                    return found, True
                found.append((bytes(key), Record.decode(raw)))
        return found, False

    def apply(self, index: int, writes: Iterable[Write]) -> None:
        """Store the writes of entry ``index`` and advance the applied index, atomically."""
        stored = tuple(writes)
        self.apply_with(index, lambda _read: Applied(stored, ()))

    def apply_with(self, index: int, compute: Callable[[Reader], Applied]) -> Applied:
        """Run ``compute`` against the current state and store the writes it returns,
        in one write transaction together with the applied index. ``compute`` may run
        twice (again after the map has grown): it must not have side effects."""

        def run(txn: lmdb.Transaction[bytes]) -> tuple[Applied, int]:
            def read(table: str, key: bytes) -> Record | None:
                raw = txn.get(key, db=self._dbs[table])
                return None if raw is None else Record.decode(raw)

            applied = compute(read)
            return applied, self._store(txn, index, applied.writes)

        applied, delta = self._write(run)
        self._logical += delta
        return applied

    def apply_indexed(
        self, index: int, compute: Callable[[StoredReader, ValueReader, int], Applied]
    ) -> Applied:
        """``apply_with`` for a ``compute`` that only needs the index and value length of
        each key it reads (``apply_command_indexed``), and gets the logical size of the
        state before the entry."""

        def run(txn: lmdb.Transaction[bytes]) -> tuple[Applied, int]:
            applied = compute(*self._readers(txn), self._logical)
            return applied, self._store(txn, index, applied.writes)

        applied, delta = self._write(run)
        self._logical += delta
        return applied

    def evaluate(self, compute: Callable[[StoredReader, ValueReader, int], Applied]) -> Applied:
        """What ``apply_indexed`` would compute now, without storing anything."""
        with self.read_txn() as txn:
            return compute(*self._readers(txn), self._logical)

    def _readers(self, txn: lmdb.Transaction[bytes]) -> tuple[StoredReader, ValueReader]:
        dbs = self._dbs
        get = txn.get
        unpack_index = _INDEX.unpack_from
        head = _INDEX.size

        def read_stored(table: str, key: bytes) -> tuple[int, int] | None:
            raw = get(key, db=dbs[table])
            return None if raw is None else (int(unpack_index(raw)[0]), len(raw) - head)

        def read_value(table: str, key: bytes) -> bytes | None:
            raw = get(key, db=dbs[table])
            return None if raw is None else bytes(raw[head:])

        return read_stored, read_value

    def _store(self, txn: lmdb.Transaction[bytes], index: int, writes: Iterable[Write]) -> int:
        """Make the writes; return by how much they change the logical size."""
        dbs = self._dbs
        head = _INDEX.size
        delta = 0
        changes = self._changes
        # One cursor a table: Transaction.replace/pop open a cursor for every call.
        cursors: dict[str, lmdb.Cursor[bytes]] = {}
        for write in writes:
            table = write.table
            changes[table] += 1
            cursor = cursors.get(table)
            if cursor is None:
                cursor = cursors[table] = txn.cursor(db=dbs[table])
            if write.record is None:
                old = cursor.pop(write.key)
            else:
                old = cursor.replace(write.key, write.record.encode())
                delta += record_cost(len(write.key), len(write.record.value))
            if old is not None:
                delta -= record_cost(len(write.key), len(old) - head)
        put = txn.put
        if delta:
            put(_LOGICAL_KEY, _INDEX.pack(self._logical + delta), db=self._meta)
        put(_APPLIED_KEY, _INDEX.pack(index), db=self._meta)
        return delta

    def _write(self, run: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        """``run`` in a write transaction. On ``MDB_MAP_FULL`` the map grows and ``run``
        runs again (a few times at most: the map doubles each time); ViewFullError once
        it is at ``max_map_size``."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    outcome = run(txn)
            except lmdb.MapFullError as exc:
                if not self._grow(forced=True):
                    raise ViewFullError(
                        f"the view does not fit in its map of {self.map_size()} bytes "
                        f"(max_view_bytes {self.max_map_size})"
                    ) from exc
                continue
            self._maybe_grow()
            return outcome

    def _maybe_grow(self) -> None:
        """Grow the map once the pages in use pass ``GROW_AT`` of it."""
        size = self._map_bytes
        if size < self.max_map_size and self.size_bytes() > size * GROW_AT:
            self._grow()

    def _grow(self, at_least: int = 0, *, forced: bool = False) -> bool:
        """Double the map (or more, to ``at_least``), up to ``max_map_size``; False if it
        is there already, or if readers are open and the growth is not ``forced`` (it
        waits for them when it is: see Size)."""
        current = self.map_size()
        wanted = min(self.max_map_size, max(current * 2, at_least))
        if wanted <= current:
            return False
        with self._reads:
            if self._open_reads and not forced:
                return False
            self._resizing = True
            try:
                # A reader of this very thread would never close: say so, not hang.
                if not self._reads.wait_for(lambda: not self._open_reads, READERS_WAIT_S):
                    raise ViewFullError(
                        f"the view's map must grow but {self._open_reads} read "
                        f"transaction(s) stayed open for {READERS_WAIT_S:g} s"
                    )
                self._env.set_mapsize(wanted)
            finally:
                self._resizing = False
                self._reads.notify_all()
        grown = self._map_bytes = self.map_size()
        logger.info("view map grown from %d to %d bytes", current, grown)
        return grown > current

    def _load_logical(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_LOGICAL_KEY)
        if raw is not None:
            return int(_INDEX.unpack(raw)[0])
        # A view written before the logical size was kept: count it once.
        with self._env.begin() as txn:
            total = sum(
                _cost(key, raw)
                for db in self._dbs.values()
                for key, raw in txn.cursor(db=db).iternext()
            )

        def store(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(_LOGICAL_KEY, _INDEX.pack(total), db=self._meta)

        self._write(store)
        return total

    def write_snapshot(self, destination: Path, raft_meta: bytes) -> None:
        """Write a consistent copy of the view, tagged with ``raft_meta``, to a file."""

        def tag(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(_SNAPSHOT_KEY, raft_meta, db=self._meta)

        self._write(tag)
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._env.copyfd(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    def restore_snapshot(self, source: Path) -> bytes:
        """Install the dump at ``source`` if it is ahead of the view; return its raft_meta."""
        try:
            dump = lmdb.open(
                str(source),
                subdir=False,
                readonly=True,
                lock=False,
                max_dbs=len(self.tables) + 1,
            )
        except lmdb.Error as exc:
            raise SnapshotError(f"cannot open dump {source}: {exc}") from exc
        try:
            meta_db = dump.open_db(_META_DB, create=False)
            with dump.begin(db=meta_db) as txn:
                raft_meta = txn.get(_SNAPSHOT_KEY)
                applied_raw = txn.get(_APPLIED_KEY)
            if raft_meta is None or applied_raw is None:
                raise SnapshotError(f"dump {source} carries no raft metadata")
            dump_index = int(_INDEX.unpack(applied_raw)[0])
            if dump_index > self.applied_index():
                logger.info("installing dump at index %d", dump_index)
                self._install(dump, dump_index)
            return bytes(raft_meta)
        finally:
            dump.close()

    def _install(self, dump: lmdb.Environment, dump_index: int) -> None:
        # The old pages are freed when the transaction commits: room for both.
        dump_bytes = int((dump.info()["last_pgno"] + 1) * dump.stat()["psize"])
        if self.size_bytes() + 2 * dump_bytes > self.map_size() * GROW_AT:
            self._grow(at_least=int((self.size_bytes() + 2 * dump_bytes) / GROW_AT), forced=True)

        def install(txn: lmdb.Transaction[bytes]) -> int:
            total = 0

            def counted(items: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
                nonlocal total
                for key, raw in items:
                    total += _cost(key, raw)
                    yield key, raw

            for name, db in self._dbs.items():
                self._changes[name] += 1
                txn.drop(db, delete=False)
                try:
                    source_db = dump.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    continue
                with dump.begin(db=source_db) as source_txn:
                    txn.cursor(db=db).putmulti(counted(source_txn.cursor().iternext()), append=True)
            txn.put(_LOGICAL_KEY, _INDEX.pack(total), db=self._meta)
            txn.put(_APPLIED_KEY, _INDEX.pack(dump_index), db=self._meta)
            return total

        self._logical = self._write(install)
        self._env.sync(True)


def _cost(key: bytes, raw: bytes) -> int:
    """``record_cost`` of a stored record (its raw value starts with the index)."""
    return record_cost(len(key), len(raw) - _INDEX.size)
