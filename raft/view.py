"""The LMDB materialised view of the applied state (an I/O adapter).

Every committed entry is written here together with its log index, in one
transaction, so reads are a local B-tree lookup and the state is readable
right after a restart. Full dumps for Raft log compaction are consistent
copies of this environment (``copyfd``), and installing a dump received from
the leader replaces the tables in one transaction.

Durability: transactions are not fsynced one by one (the Raft journal is the
source of truth and replays what the view missed); ``sync`` flushes them and is
called periodically and at shutdown.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lmdb

from raft.errors import SnapshotError
from raft.state_machine import Applied, IndexReader, Reader, Record, ValueReader, Write

logger = logging.getLogger(__name__)

_META_DB = b"__raft__"
_APPLIED_KEY = b"applied_index"
_SNAPSHOT_KEY = b"snapshot_meta"
_INDEX = struct.Struct(">Q")
DEFAULT_MAP_SIZE = 1 << 30


class StateView:
    """Tables of (key -> Record) in one LMDB environment, plus the applied index."""

    def __init__(self, path: Path, tables: Sequence[str], map_size: int = DEFAULT_MAP_SIZE) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.tables = tuple(tables)
        self._env = lmdb.open(
            str(path),
            max_dbs=len(self.tables) + 1,
            map_size=map_size,
            sync=False,
            metasync=False,
            max_readers=256,
        )
        self._meta = self._env.open_db(_META_DB)
        self._dbs = {name: self._env.open_db(name.encode()) for name in self.tables}

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    def sync(self) -> None:
        self._env.sync(True)

    def size_bytes(self) -> int:
        """The size of the data in use (what a dump of the view would copy)."""
        info = self._env.info()
        return int((info["last_pgno"] + 1) * self._env.stat()["psize"])

    def applied_index(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_APPLIED_KEY)
        return 0 if raw is None else int(_INDEX.unpack(raw)[0])

    def get(self, table: str, key: bytes) -> Record | None:
        with self._env.begin(db=self._dbs[table]) as txn:
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
        with self._env.begin(db=self._dbs[table]) as txn:
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
        self.apply_with(index, lambda _read: Applied(tuple(writes), ()))

    def apply_with(self, index: int, compute: Callable[[Reader], Applied]) -> Applied:
        """Run ``compute`` against the current state and store the writes it returns,
        in one write transaction together with the applied index."""
        with self._env.begin(write=True) as txn:

            def read(table: str, key: bytes) -> Record | None:
                raw = txn.get(key, db=self._dbs[table])
                return None if raw is None else Record.decode(raw)

            applied = compute(read)
            self._store(txn, index, applied.writes)
        return applied

    def apply_indexed(
        self, index: int, compute: Callable[[IndexReader, ValueReader], Applied]
    ) -> Applied:
        """``apply_with`` for a ``compute`` that only needs the index of each key it reads
        (``apply_command_indexed``): values are not copied out of LMDB."""
        dbs = self._dbs
        unpack_index = _INDEX.unpack_from
        with self._env.begin(write=True) as txn:
            get = txn.get

            def read_index(table: str, key: bytes) -> int | None:
                raw = get(key, db=dbs[table])
                return None if raw is None else int(unpack_index(raw)[0])

            def read_value(table: str, key: bytes) -> bytes | None:
                raw = get(key, db=dbs[table])
                return None if raw is None else bytes(raw[_INDEX.size :])

            applied = compute(read_index, read_value)
            self._store(txn, index, applied.writes)
        return applied

    def _store(self, txn: lmdb.Transaction, index: int, writes: Iterable[Write]) -> None:
        dbs = self._dbs
        put = txn.put
        for write in writes:
            if write.record is None:
                txn.delete(write.key, db=dbs[write.table])
            else:
                put(write.key, write.record.encode(), db=dbs[write.table])
        put(_APPLIED_KEY, _INDEX.pack(index), db=self._meta)

    def write_snapshot(self, destination: Path, raft_meta: bytes) -> None:
        """Write a consistent copy of the view, tagged with ``raft_meta``, to a file."""
        with self._env.begin(write=True) as txn:
            txn.put(_SNAPSHOT_KEY, raft_meta, db=self._meta)
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
        with self._env.begin(write=True) as txn:
            for name, db in self._dbs.items():
                txn.drop(db, delete=False)
                try:
                    source_db = dump.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    continue
                with dump.begin(db=source_db) as source_txn:
                    txn.cursor(db=db).putmulti(source_txn.cursor().iternext(), append=True)
            txn.put(_APPLIED_KEY, _INDEX.pack(dump_index), db=self._meta)
        self._env.sync(True)
