"""pysyncobj's file journal, made power-safe: nothing is acknowledged before it is on disk.

pysyncobj keeps its log in an mmap'd file (``pysyncobj.journal.FileJournal``) that it
never syncs while running, and its term and vote in a ``.meta`` file written without
fsync. After a power cut (not a process kill: the page cache survives that) a host may
have lost entries it acknowledged, or forgotten a vote and vote twice in one term.

``DurableJournal`` is the same journal (same file format, so a data directory moves
between modes) with:

* ``sync()``: one ``fdatasync`` of the journal file if anything was written since the
  last one. The node calls it before any Raft message that vouches for the journal
  leaves this host (an append's answer, a vote: ``raft.transport``; a leader's appends
  leave first and its sync runs while the followers write), at the end of every tick,
  and so before a client is told its write committed (``raft.node``): a group-commit
  batch costs one sync;
* the term and vote stored durably before they are used (temporary file fsync'd,
  renamed, directory fsync'd), and the commit index too when it is saved;
* the file grown ahead of the entries by writing zeros (``PREALLOCATE_BYTES`` at a time).
  pysyncobj grows it with ``ftruncate``, which leaves a hole: every ``fdatasync`` after a
  write into a hole also commits the filesystem's block allocation (ext4: a journal
  commit, 3 ms here, against 0.15 ms for a write into blocks already allocated and
  written). ``fallocate`` would not do: its blocks are "unwritten" and the first write to
  each converts them, a metadata change again.

``durability="process"`` keeps pysyncobj's behaviour (survives the agent's death, not
the machine's). The factory below is how pysyncobj gets the journal: it calls
``createJournal(path)`` from its constructor, and the node registers the durability of
its path first.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any, Literal

import pysyncobj.syncobj
from pysyncobj.journal import LAST_RECORD_OFFSET_OFFSET, FileJournal, createJournal
from pysyncobj.pickle import dumps, to_bytes

from raft.durable import fsync_directory, write_durably

Durability = Literal["power", "process"]
DURABILITIES: tuple[Durability, ...] = ("power", "process")

# How far the journal file is written ahead of its last entry, and grown at a time: one
# allocation (and one slower fdatasync) per 4 MiB of entries, about 30,000 group commits.
PREALLOCATE_BYTES = 4 << 20
_ZEROS = bytes(1 << 20)
# pysyncobj's record: length, index and term, command, length (little-endian).
_LENGTH = struct.Struct("<I")
_INDEX_TERM = struct.Struct("<QQ")

_registered: dict[str, Durability] = {}
_lock = threading.Lock()


class DurableJournal(FileJournal):  # type: ignore[misc]
    """``FileJournal`` whose writes reach the disk at ``sync()``, and whose meta at once."""

    _FileJournal__currentOffset: int  # pysyncobj's: where the next record goes
    _FileJournal__journal: list[tuple[bytes, int, int]]  # its entries, in memory

    def __init__(self, journal_file: str) -> None:
        super().__init__(journal_file)
        self._path = Path(journal_file)
        self._dirty = False
        self.syncs = 0  # fdatasync calls made (the benchmark reports it)
        self._allocated = 0  # bytes of the file written (zeros or entries) from the start
        self._preallocate(0)
        os.fdatasync(self._fileno())  # the zeros, and the entries read back, are on disk
        self._dirty = False
        fsync_directory(self._path.parent)  # the journal file itself, if just created

    def _fileno(self) -> int:
        resizable = self._FileJournal__journalFile
        fileno: int = resizable._ResizableFile__f.fileno()
        return fileno

    def _preallocate(self, record_bytes: int) -> None:
        """Make sure the next ``record_bytes`` land in blocks already written, growing the
        file by ``PREALLOCATE_BYTES`` of zeros when they would not (pysyncobj's mmap then
        follows the file's size)."""
        end = self._FileJournal__currentOffset + record_bytes
        if end <= self._allocated:
            return
        resizable = self._FileJournal__journalFile
        mm = resizable._ResizableFile__mm
        fd = self._fileno()
        size = os.fstat(fd).st_size
        target = max(size, end + PREALLOCATE_BYTES)
        # Rewrite from the end of what is surely written (the holes pysyncobj left are
        # zeros when read; content past the last entry means nothing).
        offset = min(self._allocated or self._FileJournal__currentOffset, size)
        while offset < target:
            chunk = min(len(_ZEROS), target - offset)
            os.pwrite(fd, _ZEROS[:chunk], offset)  # the page cache pysyncobj's map reads
            offset += chunk
        mm.resize(target)
        self._allocated = target
        self._dirty = True

    def sync(self) -> None:
        """``fdatasync`` the journal if it changed since the last call (mmap'd pages are the
        file's page cache: fdatasync writes them, and the file's size)."""
        if self._dirty:
            self._dirty = False
            os.fdatasync(self._fileno())
            self.syncs += 1

    # -- what changes the file ---------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        """``FileJournal.add`` (same record, same offsets) written with ``pwrite`` rather
        than through the map: an fdatasync after writes to mapped pages took 0.7 ms here,
        0.13 ms after the same writes made with pwrite (the map reads them all the same:
        one page cache)."""
        data = _INDEX_TERM.pack(idx, term) + to_bytes(command)
        length = _LENGTH.pack(len(data))
        record = length + data + length
        self._preallocate(len(record))
        fd = self._fileno()
        offset = self._FileJournal__currentOffset
        os.pwrite(fd, record, offset)
        self._FileJournal__journal.append((command, idx, term))
        self._FileJournal__currentOffset = end = offset + len(record)
        os.pwrite(fd, _LENGTH.pack(end), LAST_RECORD_OFFSET_OFFSET)
        self._dirty = True

    def clear(self) -> None:
        # Entries leave the journal only once a dump holds them: pysyncobj renamed it into
        # place, and the rename must be on disk before they are gone.
        fsync_directory(self._path.parent)
        super().clear()
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # pysyncobj names them
        super().deleteEntriesFrom(entryFrom)
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        super().deleteEntriesTo(entryTo)  # clear() first: the dump's rename made durable
        self.sync()

    # -- term, vote, commit index ------------------------------------------------------

    def _store_meta(self) -> None:
        meta: dict[str, Any] = self._FileJournal__meta
        write_durably(Path(self._FileJournal__metaStorer.getPath()), dumps(meta))
        self._FileJournal__metaSaved = True

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        meta: dict[str, Any] = self._FileJournal__meta
        meta["currentTerm"] = term
        meta["votedForNodeId"] = votedForNodeId
        self._store_meta()  # before any message that reflects them is sent

    def onOneSecondTimer(self) -> None:
        if not self._FileJournal__metaSaved:
            self._store_meta()

    def _destroy(self) -> None:
        self.sync()
        super()._destroy()


def register(journal_file: Path, durability: Durability) -> None:
    """Make the journal at ``journal_file`` one of ``durability`` (before the node starts)."""
    if durability not in DURABILITIES:
        raise ValueError(f"durability must be one of {', '.join(DURABILITIES)}")
    with _lock:
        _registered[str(journal_file)] = durability


def _create_journal(journal_file: str | None = None) -> Any:
    with _lock:
        durability = _registered.get(str(journal_file)) if journal_file else None
    if journal_file is not None and durability == "power":
        return DurableJournal(journal_file)
    return createJournal(journal_file)


# pysyncobj's constructor calls the name it imported into its module.
pysyncobj.syncobj.createJournal = _create_journal
