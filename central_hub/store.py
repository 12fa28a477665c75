"""The hub's LMDB store (an I/O adapter).

One environment, ``DATA_DIR/hub.lmdb``, with named databases::

    meta         fleet, root key, head of the delta log, counters      (name -> JSON)
    tokens       operator tokens                                        (id -> JSON)
    sites        registered sites                                       (id -> JSON)
    apps         applications                                           (name -> JSON)
    deployments  deployments                                            (id -> JSON)
    deltas       the signed delta log                 (big-endian u64 version -> envelope)
    reports      the latest report of each site                         (id -> JSON)
    tenants      tenants and their quotas                               (id -> JSON)
    audit        the audit log, append-only   (big-endian u64 sequence -> JSON entry)
    alerts       active alerts, with their acknowledgements                 (id -> JSON)

Writes go through ``commit``: one write transaction for everything a request changes.
The environment is opened without a sync per commit; ``commit(..., sync=True)`` flushes
before it returns, which is what acknowledged operator writes use (reports are not synced
one by one: a lost report is re-sent seconds later). Reads are short read transactions
on the memory map, cheap enough for the event loop; commits can wait on the disk and are
run in a worker thread by the service.

The map grows before it fills: a commit that would leave the environment more than
``GROW_AT`` full first doubles the map (``lmdb.Environment.set_mapsize``; the file stays
sparse), and a commit that finds the map full anyway grows it and is retried once.
``set_mapsize`` invalidates every open transaction of the process, so every transaction
(read or write, any thread) is begun through ``_Gate``: many at once, and the growth
alone, once the open ones are done (new ones wait for it, a few milliseconds). A
growth that cannot have the store to itself within ``GROW_WAIT_S`` (a transaction held
open that long) is put off to the next commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import orjson

logger = logging.getLogger(__name__)

DBS = (
    "meta", "tokens", "sites", "apps", "deployments", "deltas", "reports", "tenants", "audit",
    "alerts",
)  # fmt: skip
DEFAULT_MAP_SIZE = 1 << 31
GROW_AT = 0.75  # of the map in use after a commit: grow first
GROW_WAIT_S = 2.0
_MIB = 1 << 20
_VERSION = struct.Struct(">Q")

# (database, key, value); value None deletes the key.
Write = tuple[str, bytes, bytes | None]


def version_key(version: int) -> bytes:
    return _VERSION.pack(version)


def put_json(db: str, key: str, value: object) -> Write:
    return (db, key.encode(), orjson.dumps(value))


def delete(db: str, key: str) -> Write:
    return (db, key.encode(), None)


class _Gate:
    """Shared for transactions, exclusive for growing the map (module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._growing = False

    def enter(self) -> None:
        with self._cond:
            while self._growing:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self, timeout_s: float) -> Iterator[bool]:
        """Yield True with no transaction open (new ones wait), False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._growing:
                self._cond.wait()
            self._growing = True
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            alone = not self._active
        try:
            yield alone
        finally:
            with self._cond:
                self._growing = False
                self._cond.notify_all()


class _GatedTxn:
    """``with env.begin(...) as txn``, the transaction counted by the gate."""

    def __init__(self, gate: _Gate, env: Any, kwargs: dict[str, Any]) -> None:
        self._gate = gate
        self._env = env
        self._kwargs = kwargs
        self._txn: Any = None

    def __enter__(self) -> Any:
        self._gate.enter()
        try:
            self._txn = self._env.begin(**self._kwargs)
            return self._txn.__enter__()
        except BaseException:
            self._gate.leave()
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._txn.__exit__(*exc)
        finally:
            self._gate.leave()


class _GatedEnv:
    """The LMDB environment, its transactions begun through the gate."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.gate = _Gate()

    def begin(self, **kwargs: Any) -> _GatedTxn:
        return _GatedTxn(self.gate, self.env, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class Store:
    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._env = _GatedEnv(
            lmdb.open(
                str(path),
                max_dbs=len(DBS),
                map_size=map_size,
                sync=False,
                metasync=False,
                max_readers=512,
            )
        )
        self._dbs = {name: self._env.open_db(name.encode()) for name in DBS}
        self._grow_lock = threading.Lock()
        self.grown = 0  # times the map grew since open
        self._generations = dict.fromkeys(DBS, 0)

    @property
    def map_size(self) -> int:
        return int(self._env.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes of the map in use (its pages up to the highest one written)."""
        return (int(self._env.info()["last_pgno"]) + 1) * int(self._env.stat()["psize"])

    def _grow(self, incoming: int, *, force: bool) -> None:
        """Double the map (or more, for a large commit) when ``incoming`` more bytes would
        leave it over ``GROW_AT`` full (always when ``force``)."""
        with self._grow_lock:
            size = self.map_size
            want = self.used_bytes() + 2 * incoming
            if not force and want <= size * GROW_AT:
                return
            new = max(2 * size, -(-int(want / GROW_AT) // _MIB) * _MIB)
            with self._env.gate.alone(GROW_WAIT_S) as alone:
                if not alone:
                    logger.warning("hub store: map growth put off (a transaction is open)")
                    return
                self._env.env.set_mapsize(new)
            self.grown += 1
            logger.info("hub store: map grown from %d to %d MiB", size // _MIB, new // _MIB)

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    def sync(self) -> None:
        self._env.sync(True)

    def commit(self, writes: Sequence[Write], *, sync: bool) -> None:
        """Apply every write in one transaction; flush to disk first if ``sync``. The map
        grows first when it would fill (module docstring)."""
        incoming = sum(len(key) + len(value or b"") for _, key, value in writes)
        self._grow(incoming, force=False)
        try:
            self._commit(writes)
        except lmdb.MapFullError:
            self._grow(incoming, force=True)
            self._commit(writes)
        if sync:
            self._env.sync(True)

    def _commit(self, writes: Sequence[Write]) -> None:
        with self._env.begin(write=True) as txn:
            for db, key, value in writes:
                if value is None:
                    txn.delete(key, db=self._dbs[db])
                else:
                    txn.put(key, value, db=self._dbs[db])
        # Counted once the writes are visible (this may run in a worker thread): a reader
        # that read the count, then a value, re-reads after any later change.
        for db in {db for db, _, _ in writes}:
            self._generations[db] += 1

    def generation(self, db: str) -> int:
        """A count that changes after every commit that writes ``db``: a value read from
        ``db`` after reading the count is current for as long as the count stays."""
        return self._generations[db]

    # -- reads (``central_hub.replicated_store`` reads other environments) -----------------

    def _read(self, db: str) -> Any:
        """A read transaction on ``db`` (``with self._read(db) as txn``)."""
        return self._env.begin(db=self._dbs[db])

    def _skip(self, db: str) -> int:
        """Bytes before the value in each stored record of ``db``."""
        return 0

    async def apply(self, writes: Sequence[Write], *, sync: bool) -> None:
        """``commit`` from the event loop: in a worker thread (it may wait on the disk)."""
        await asyncio.to_thread(self.commit, writes, sync=sync)

    def get(self, db: str, key: bytes) -> bytes | None:
        skip = self._skip(db)
        with self._read(db) as txn:
            value = txn.get(key)
        return None if value is None else bytes(value[skip:])

    def get_json(self, db: str, key: str) -> Any:
        raw = self.get(db, key.encode())
        return None if raw is None else orjson.loads(raw)

    def values_json(self, db: str) -> list[Any]:
        skip = self._skip(db)
        with self._read(db) as txn:
            return [orjson.loads(value[skip:]) for _, value in txn.cursor()]

    def items(self, db: str) -> list[tuple[str, bytes]]:
        """Every (key, raw value) of ``db``: for records the caller parses one by one."""
        skip = self._skip(db)
        with self._read(db) as txn:
            return [(bytes(k).decode(errors="replace"), bytes(v[skip:])) for k, v in txn.cursor()]

    def values_with_prefix(self, db: str, prefix: str) -> list[tuple[str, Any]]:
        """(key, JSON value) of the keys of ``db`` starting with ``prefix``, in key order:
        a range read, whatever else ``db`` holds."""
        start = prefix.encode()
        skip = self._skip(db)
        found: list[tuple[str, Any]] = []
        with self._read(db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return found
            for key, value in _iterate(cursor):
                if not bytes(key).startswith(start):
                    break
                found.append((bytes(key).decode(errors="replace"), orjson.loads(value[skip:])))
        return found

    def page(
        self,
        db: str,
        after: str | None,
        accept: Callable[[Any], bool],
        limit: int,
        scan: int,
        prefix: str = "",
    ) -> tuple[list[Any], str | None]:
        """Keyset pagination over ``db`` in key order: the JSON values after key ``after``
        (None: from the first) that ``accept``, at most ``limit`` of them, reading at most
        ``scan`` records (of keys starting with ``prefix``). The second item is where the
        next page starts (the last key read), None when nothing follows."""
        found: list[Any] = []
        last: str | None = None
        read = 0
        skip = self._skip(db)
        with self._read(db) as txn:
            cursor = txn.cursor()
            first = prefix.encode()
            start = first if after is None else max(after.encode(), first)
            if not cursor.set_range(start):
                return found, None
            for key, value in _iterate(cursor):
                if not bytes(key).startswith(first):
                    break
                name = bytes(key).decode(errors="replace")
                if after is not None and bytes(key) == after.encode():
                    continue
                if len(found) >= limit or read >= scan:
                    return found, last
                read += 1
                last = name
                record = orjson.loads(value[skip:])
                if accept(record):
                    found.append(record)
        return found, None

    def keys(self, db: str) -> list[str]:
        with self._read(db) as txn:
            return [bytes(key).decode() for key in txn.cursor().iternext(values=False)]

    def deltas_after(self, after: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Envelopes with version > after, in order: at most ``limit``, and no more than
        ``max_bytes`` in all (at least one, whatever its size)."""
        found: list[tuple[int, bytes]] = []
        total = 0
        skip = self._skip("deltas")
        with self._read("deltas") as txn:
            cursor = txn.cursor()
            if not cursor.set_range(version_key(after + 1)):
                return found
            for key, value in _iterate(cursor):
                value = value[skip:]
                if len(found) >= limit or (found and total + len(value) > max_bytes):
                    break
                found.append((_VERSION.unpack(key)[0], bytes(value)))
                total += len(value)
        return found

    def first_sequence(self, db: str) -> int:
        """The lowest big-endian u64 key of ``db`` (0 when empty)."""
        with self._read(db) as txn:
            cursor = txn.cursor()
            return _VERSION.unpack(bytes(cursor.key()))[0] if cursor.first() else 0

    def last_sequence(self, db: str) -> int:
        """The highest big-endian u64 key of ``db`` (0 when empty)."""
        with self._read(db) as txn:
            cursor = txn.cursor()
            return _VERSION.unpack(bytes(cursor.key()))[0] if cursor.last() else 0

    def sequence_after(self, db: str, after: int) -> Iterator[Any]:
        """JSON values of ``db`` with a u64 key above ``after``, in order (lazily)."""
        skip = self._skip(db)
        with self._read(db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(version_key(after + 1)):
                return
            for _, value in _iterate(cursor):
                yield orjson.loads(value[skip:])


def _iterate(cursor: Any) -> Iterator[tuple[bytes, bytes]]:
    yield from cursor.iternext()
