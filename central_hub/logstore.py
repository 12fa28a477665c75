"""The hub's store of fleet logs (an I/O adapter over ``central_hub.logindex``).

One LMDB environment, ``path``, with named databases::

    streams   position and dropped counts of each stream   site \\0 stream -> JSON
    tail      records not yet in a segment                 u64 id -> site \\0 stream \\0 columns
    blocks    sealed blocks (<= BLOCK_RECORDS records)     u64 id -> zlib(columns)
    segments  the blocks of a segment, with summaries      u64 id -> JSON (null: dropped)

and, next to it, ``vocab/<segment id>.vocab``: the token index of each segment
(``logindex.build_vocab``), a file so that it is searched in place through a read-only
map (``mmap.find`` runs at memory speed, and the page cache bounds what stays in memory).

Ingest appends a stream's new records to its *tail* (one entry per call, small entries
merged as they pile up) and acknowledges once that is on disk. When the tails of all
streams hold ``SEGMENT_RECORDS`` records (or ``SEGMENT_BYTES`` of text), they become a
*segment*: every tail is cut into blocks, compressed, and written with the segment's
summaries in one transaction, after its vocabulary file is on disk (a file without its
segment is removed at open; a segment without its file gets it rebuilt from its blocks).
Queries look up their tokens in each segment's vocabulary and read only the candidate
blocks; the tails (bounded by the same limits) are kept in memory as well, and searched
whole.

Retention (``apply_retention``) drops whole blocks and tail entries, oldest first
(``logindex.expired_blocks``): a dropped block leaves a null in its segment's list, so
the ordinals of the segment's vocabulary keep their meaning and a query never reaches
the block again; a segment whose blocks are all dropped goes with its vocabulary file.
Positions never move back: a stream keeps its high water (sites never resend what the
hub dropped), and counts what retention dropped (``hub_dropped``).

In memory: the stream positions, the summaries of all blocks (a few hundred bytes per
block of up to BLOCK_RECORDS records) and the tails; the vocabularies are mapped.

Threads: one writer at a time (``ingest`` takes a lock), queries in any thread at the same
time. Writers commit to LMDB first and then publish the new in-memory state under a short
lock; a query takes its snapshot of that state under the same lock and reads in a
read transaction begun after it, so it sees everything ingested before it started.

It is over 600 lines because ingest, segmenting, retention and queries all update the
same in-memory state under the same lock, which is the invariant this module keeps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lmdb
import orjson

from central_hub.logindex import (
    BlockRef,
    BlockSummary,
    BlockUsage,
    Columns,
    IngestResult,
    LogGap,
    LogHit,
    LogPage,
    LogQuery,
    LogQueryError,
    LogRecord,
    Matcher,
    Vocab,
    block_tokens,
    build_vocab,
    concat_columns,
    expired_blocks,
    run_query,
    split_columns,
)
from meshorch.streams.model import SEGMENT_RE, InvalidStreamName, StreamName

__all__ = [
    "IngestResult",
    "LogGap",
    "LogHit",
    "LogPage",
    "LogQuery",
    "LogQueryError",
    "LogRecord",
    "LogStore",
    "LogStoreStats",
    "RetentionResult",
]

logger = logging.getLogger(__name__)

BLOCK_RECORDS = 4096
BLOCK_BYTES = 1 << 20
SEGMENT_RECORDS = 200_000
SEGMENT_BYTES = 32 << 20
COMPRESSION = 1  # zlib level: blocks are written once and read rarely; level 1 is cheap
# Index entries a substring token may match in one segment before it is given up on
# (it would select most blocks anyway, and listing them costs more than it saves).
MAX_INDEX_ENTRIES = 20_000
# Once the exact/prefix tokens leave this few blocks of a segment, skip the vocabulary scans.
FEW_BLOCKS = 16
# Blocks dropped per retention transaction: ingest waits for at most one of them.
RETENTION_BATCH = 2000

_ID = struct.Struct(">Q")
_DBS = ("streams", "tail", "blocks", "segments")


@dataclass(slots=True)
class _Stream:
    high_water: int = 0
    dropped: int = 0  # seqs the site's retention dropped before forwarding them
    blocks: list[BlockRef] = field(default_factory=list)  # sealed, in seq order
    tail: list[BlockRef] = field(default_factory=list)  # in memory (data set), in seq order
    hub_dropped: int = 0  # records the hub's retention dropped

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "high_water": self.high_water,
                "dropped": self.dropped,
                "hub_dropped": self.hub_dropped,
            }
        )


@dataclass(frozen=True, slots=True)
class _Segment:
    segment_id: int
    blocks: tuple[BlockRef | None, ...]  # by ordinal in the vocabulary; None: dropped
    vocab: mmap.mmap


@dataclass(frozen=True, slots=True)
class RetentionResult:
    blocks: int  # blocks and tail entries dropped
    records: int
    bytes: int
    segments: int  # segments gone with all their blocks


@dataclass(frozen=True, slots=True)
class LogStoreStats:
    stored_bytes: int  # blocks, tail entries and the blocks' share of their segment's index
    records: int
    blocks: int
    hub_dropped: int  # records dropped by the hub's retention, all streams
    site_dropped: int  # seqs the sites reported dropped, all streams


def _data(ref: BlockRef) -> Columns:
    assert ref.data is not None, "a tail entry always holds its records"
    return ref.data


def _with_sizes(
    refs: list[BlockRef | None], sizes: list[int], vocab_bytes: int
) -> list[BlockRef | None]:
    """``refs`` with their sizes: their stored bytes plus their share of the vocabulary
    (in proportion to their bytes), so that the sizes of all blocks add up to the store."""
    total = sum(sizes) or 1
    return [
        None if ref is None else replace(ref, size=size + vocab_bytes * size // total)
        for ref, size in zip(refs, sizes, strict=True)
    ]


def _stream_key(site: str, stream: str) -> bytes:
    return f"{site}\0{stream}".encode()


def _check_site(site: str) -> None:
    if not isinstance(site, str) or SEGMENT_RE.fullmatch(site) is None:
        raise ValueError(f"site {site!r} is invalid: it must be 1-63 of a-z, 0-9, '-'")


def _check_records(records: Sequence[LogRecord]) -> None:
    previous = 0
    for r in records:
        if not isinstance(r.seq, int) or r.seq <= previous:
            raise ValueError(f"log seqs must be ascending from 1, got {r.seq!r} after {previous}")
        previous = r.seq
        if not isinstance(r.time_s, int | float) or not math.isfinite(r.time_s):
            raise ValueError(f"log record {r.seq}: time_s must be finite, got {r.time_s!r}")
        if r.level is not None and (not isinstance(r.level, int) or not 0 <= r.level <= 7):
            raise ValueError(f"log record {r.seq}: level must be 0..7 or None, got {r.level!r}")
        if not isinstance(r.host, str):
            raise ValueError(f"log record {r.seq}: host must be a string")
        if not isinstance(r.payload, bytes):
            raise ValueError(f"log record {r.seq}: payload must be bytes")


class LogStore:
    """Fleet logs, durable per ``ingest`` call: a record is on disk when ``ingest``
    returns (``flush`` only syncs once more)."""

    def __init__(
        self,
        path: Path,
        *,
        map_size: int = 64 << 30,
        segment_records: int = SEGMENT_RECORDS,
        block_records: int = BLOCK_RECORDS,
    ) -> None:
        """``segment_records`` and ``block_records`` tune the layout (tests make them small)."""
        self._segment_records = segment_records
        self._block_records = block_records
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(path), max_dbs=len(_DBS), map_size=map_size, sync=False, metasync=False,
            max_readers=512,
        )  # fmt: skip
        self._dbs = {name: self._env.open_db(name.encode()) for name in _DBS}
        self._vocab_dir = path / "vocab"
        self._vocab_dir.mkdir(mode=0o700, exist_ok=True)
        self._write_lock = threading.Lock()  # one writer at a time
        self._state_lock = threading.Lock()  # publishing / snapshotting the in-memory state
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._segments: list[_Segment] = []
        self._pending_records = 0
        self._pending_bytes = 0
        self._next_id = 1  # block, tail entry and segment ids (one counter)
        self._closed = False
        self._load()

    # -- opening

    def _load(self) -> None:
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=self._dbs["streams"]):
                site, stream = bytes(key).decode().split("\0")
                data = orjson.loads(value)
                self._streams[(site, stream)] = _Stream(
                    data["high_water"], data["dropped"], hub_dropped=data.get("hub_dropped", 0)
                )
            for key, value in txn.cursor(db=self._dbs["segments"]):
                segment_id = _ID.unpack(key)[0]
                entries = orjson.loads(value)
                for entry in entries:
                    if entry is not None:
                        self._next_id = max(self._next_id, entry[0] + 1)
                self._next_id = max(self._next_id, segment_id + 1)
                if all(entry is None for entry in entries):
                    continue  # nothing left (retention deletes such a segment anyway)
                refs = self._segment_refs(txn, entries)
                vocab = self._open_vocab(txn, segment_id, refs)
                if any(ref is not None and ref.size == 0 for ref in refs):
                    refs = _with_sizes(refs, self._block_sizes(txn, refs), len(vocab))
                for ref in refs:
                    if ref is not None:
                        self._stream(ref.site, ref.stream).blocks.append(ref)
                self._segments.append(_Segment(segment_id, tuple(refs), vocab))
            for key, value in txn.cursor(db=self._dbs["tail"]):
                tail_id = _ID.unpack(key)[0]
                site, stream, cols = self._decode_tail(bytes(value))
                self._stream(site, stream).tail.append(
                    BlockRef(site, stream, tail_id, BlockSummary.of(cols), cols, len(value))
                )
                self._pending_records += len(cols)
                self._pending_bytes += len(cols.text)
                self._next_id = max(self._next_id, tail_id + 1)
        for state in self._streams.values():
            state.blocks.sort(key=lambda b: b.summary.first_seq)
            state.tail.sort(key=lambda b: b.summary.first_seq)

        known = {self._vocab_path(segment.segment_id) for segment in self._segments}
        for leftover in set(self._vocab_dir.iterdir()) - known:
            logger.warning("removing %s: no segment of the log store refers to it", leftover)
            leftover.unlink()

    @staticmethod
    def _segment_refs(txn: lmdb.Transaction, entries: list[Any]) -> list[BlockRef | None]:
        """A segment's stored list: ``[block_id, site, stream, summary, size]`` or null
        (size missing in segments written before retention existed: 0, filled in later)."""
        refs: list[BlockRef | None] = []
        for entry in entries:
            if entry is None:
                refs.append(None)
                continue
            block_id, site, stream, summary, *rest = entry
            size = rest[0] if rest else 0
            refs.append(
                BlockRef(site, stream, block_id, BlockSummary.from_json(summary), None, size)
            )
        return refs

    def _block_sizes(self, txn: lmdb.Transaction, refs: list[BlockRef | None]) -> list[int]:
        sizes = []
        for ref in refs:
            raw = None if ref is None else txn.get(_ID.pack(ref.block_id), db=self._dbs["blocks"])
            sizes.append(0 if raw is None else len(raw))
        return sizes

    def _vocab_path(self, segment_id: int) -> Path:
        return self._vocab_dir / f"{segment_id:016x}.vocab"

    def _open_vocab(
        self, txn: lmdb.Transaction, segment_id: int, refs: list[BlockRef | None]
    ) -> mmap.mmap:
        path = self._vocab_path(segment_id)
        try:
            with path.open("rb") as file:
                vocab = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                Vocab(vocab).release()  # checks its size
            except (ValueError, struct.error):
                vocab.close()
                raise ValueError(f"{path} is truncated") from None
            return vocab
        except (OSError, ValueError) as exc:
            logger.warning("log segment %d: rebuilding its vocabulary (%s)", segment_id, exc)
        tokens = [
            set() if ref is None else block_tokens(self._load_block(txn, ref).text) for ref in refs
        ]  # a dropped block keeps its ordinal, with no token
        return self._write_vocab(segment_id, build_vocab(tokens))

    def _write_vocab(self, segment_id: int, data: bytes) -> mmap.mmap:
        """Write a segment's vocabulary durably and map it."""
        path = self._vocab_path(segment_id)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
        directory = os.open(self._vocab_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        with path.open("rb") as file:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def _stream(self, site: str, stream: str) -> _Stream:
        return self._streams.setdefault((site, stream), _Stream())

    @staticmethod
    def _decode_tail(raw: bytes) -> tuple[str, str, Columns]:
        site, stream, body = raw.split(b"\0", 2)
        return site.decode(), stream.decode(), Columns.decode(body)

    def close(self) -> None:
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self._env.sync(True)
                self._env.close()
                for segment in self._segments:
                    with contextlib.suppress(BufferError):  # a query still running
                        segment.vocab.close()

    def flush(self) -> None:
        """Everything ingested is already queryable and durable; this syncs once more."""
        with self._write_lock:
            self._env.sync(True)

    # -- positions

    def positions(self, site: str) -> dict[str, int]:
        """stream -> last seq stored, for every stream of ``site`` the hub has seen."""
        with self._state_lock:
            return {s: st.high_water for (t, s), st in self._streams.items() if t == site}

    def dropped(self, site: str) -> dict[str, int]:
        """stream -> seqs the site reported dropped by its retention (streams with drops)."""
        with self._state_lock:
            return {
                s: st.dropped for (t, s), st in self._streams.items() if t == site and st.dropped
            }

    def hub_dropped(self, site: str) -> dict[str, int]:
        """stream -> records the hub's retention dropped (streams with drops)."""
        with self._state_lock:
            return {
                s: st.hub_dropped
                for (t, s), st in self._streams.items()
                if t == site and st.hub_dropped
            }

    def stats(self) -> LogStoreStats:
        with self._state_lock:
            streams = list(self._streams.values())
        refs = [ref for st in streams for ref in (*st.blocks, *st.tail)]
        return LogStoreStats(
            stored_bytes=sum(ref.size for ref in refs),
            records=sum(ref.summary.count for ref in refs),
            blocks=len(refs),
            hub_dropped=sum(st.hub_dropped for st in streams),
            site_dropped=sum(st.dropped for st in streams),
        )

    # -- retention

    def apply_retention(
        self,
        now: float,
        *,
        max_age_s: float | None,
        max_bytes: int | None,
        batch: int = RETENTION_BATCH,
    ) -> RetentionResult:
        """Drop the blocks and tail entries ``expired_blocks`` selects, ``batch`` of them
        per transaction (ingest goes on between them). Positions do not move."""
        if max_age_s is None and max_bytes is None:
            return RetentionResult(0, 0, 0, 0)
        with self._state_lock:
            usage = [
                BlockUsage(ref.block_id, ref.summary.max_t, ref.size)
                for st in self._streams.values()
                for ref in (*st.blocks, *st.tail)
            ]
        chosen = expired_blocks(usage, now, max_age_s, max_bytes)
        blocks = records = size = segments = 0
        for start in range(0, len(chosen), batch):
            with self._write_lock:
                if self._closed:
                    break
                # Ids gone meanwhile (tail entries merged or sealed) are skipped: what
                # they held is somewhere else now, and the next run looks at it again.
                part = self._drop(set(chosen[start : start + batch]))
            blocks, records = blocks + part.blocks, records + part.records
            size, segments = size + part.bytes, segments + part.segments
        if blocks:
            logger.info(
                "log retention dropped %d blocks (%d records, %d bytes, %d whole segments)",
                blocks, records, size, segments,
            )  # fmt: skip
        return RetentionResult(blocks, records, size, segments)

    def _drop(self, ids: set[int]) -> RetentionResult:
        """Drop the blocks and tail entries ``ids`` in one transaction (under the write lock)."""
        streams: dict[tuple[str, str], _Stream] = {}
        dropped: list[BlockRef] = []
        for key, state in self._streams.items():
            blocks = [ref for ref in state.blocks if ref.block_id not in ids]
            tail = [ref for ref in state.tail if ref.block_id not in ids]
            if len(blocks) == len(state.blocks) and len(tail) == len(state.tail):
                continue
            gone = [r for r in (*state.blocks, *state.tail) if r.block_id in ids]
            dropped.extend(gone)
            hub_dropped = state.hub_dropped + sum(r.summary.count for r in gone)
            streams[key] = replace(state, blocks=blocks, tail=tail, hub_dropped=hub_dropped)
        if not dropped:
            return RetentionResult(0, 0, 0, 0)
        kept: list[_Segment] = []
        rewritten: list[_Segment] = []
        emptied: list[_Segment] = []
        for segment in self._segments:
            if not any(ref is not None and ref.block_id in ids for ref in segment.blocks):
                kept.append(segment)
                continue
            refs = tuple(
                None if ref is None or ref.block_id in ids else ref for ref in segment.blocks
            )
            if all(ref is None for ref in refs):
                emptied.append(segment)
            else:
                new = _Segment(segment.segment_id, refs, segment.vocab)
                kept.append(new)
                rewritten.append(new)
        # Commit and publish under the state lock: a query's snapshot and its read
        # transaction are taken together under it, so it never lists a block its
        # transaction cannot read. A commit of a few thousand deletes takes milliseconds.
        with self._state_lock:
            with self._env.begin(write=True) as txn:
                for ref in dropped:
                    db = self._dbs["tail" if ref.data is not None else "blocks"]
                    txn.delete(_ID.pack(ref.block_id), db=db)
                for segment in rewritten:
                    entries = [
                        None if r is None
                        else [r.block_id, r.site, r.stream, r.summary.to_json(), r.size]
                        for r in segment.blocks
                    ]  # fmt: skip
                    txn.put(_ID.pack(segment.segment_id), orjson.dumps(entries),
                            db=self._dbs["segments"])  # fmt: skip
                for segment in emptied:
                    txn.delete(_ID.pack(segment.segment_id), db=self._dbs["segments"])
                for (site, stream), state in streams.items():
                    txn.put(_stream_key(site, stream), state.to_json(), db=self._dbs["streams"])
            self._streams.update(streams)
            self._segments = kept
        for ref in dropped:
            if ref.data is not None:
                self._pending_records -= ref.summary.count
                self._pending_bytes = max(
                    0, self._pending_bytes - len(ref.data.text) - ref.summary.count
                )
        self._env.sync(True)
        for segment in emptied:
            # Not closed: a query that began before may still read it (the mapping goes
            # with its last reference; the file's blocks when it is unmapped).
            self._vocab_path(segment.segment_id).unlink(missing_ok=True)
        return RetentionResult(
            len(dropped),
            sum(r.summary.count for r in dropped),
            sum(r.size for r in dropped),
            len(emptied),
        )

    # -- ingest

    def ingest(
        self, site: str, stream: str, records: Sequence[LogRecord], *, dropped_through: int = 0
    ) -> IngestResult:
        """Store ``records`` (ascending seqs) of ``stream`` from ``site``; durable on return.

        Seqs up to the stored high water are duplicates (ignored, counted). A seq after a
        gap is accepted only when ``dropped_through`` covers the gap (the seqs in it are
        counted as dropped); otherwise nothing is stored and ``LogGap`` says from where
        to resend. ``dropped_through`` past the high water with no record after it moves
        the high water there (everything up to it was dropped)."""
        _check_site(site)
        try:
            StreamName.parse(stream)
        except InvalidStreamName as exc:
            raise ValueError(str(exc)) from None
        _check_records(records)
        with self._write_lock:
            if self._closed:
                raise ValueError("the log store is closed")
            state = self._streams.get((site, stream))
            high_water = 0 if state is None else state.high_water
            fresh: list[LogRecord] = []
            duplicates = dropped = 0
            expected = high_water + 1
            for record in records:
                if record.seq <= high_water:
                    duplicates += 1
                    continue
                if record.seq > expected:
                    if dropped_through < record.seq - 1:
                        raise LogGap(
                            f"{site} {stream}: seq {record.seq} after {expected - 1}, and the "
                            f"site reported drops only through {dropped_through}: resend from "
                            f"{high_water + 1}",
                            high_water,
                        )
                    dropped += record.seq - expected
                fresh.append(record)
                expected = record.seq + 1
            if not fresh and dropped_through >= expected:
                dropped += dropped_through - expected + 1
                expected = dropped_through + 1
            if not fresh and not dropped:
                return IngestResult(high_water, 0, duplicates, 0)
            self._append(site, stream, fresh, expected - 1, dropped)
            if (
                self._pending_records >= self._segment_records
                or self._pending_bytes >= SEGMENT_BYTES
            ):
                try:
                    self._write_segment()
                except (OSError, lmdb.Error):
                    # The records are safe in the tails; the next ingest tries again.
                    logger.exception("could not write a log segment")
            return IngestResult(expected - 1, len(fresh), duplicates, dropped)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _append(
        self, site: str, stream: str, fresh: list[LogRecord], high_water: int, dropped: int
    ) -> None:
        old = self._streams.get((site, stream)) or _Stream()
        tail = list(old.tail)
        removed: list[BlockRef] = []
        if fresh:
            cols = Columns.from_records(fresh)
            # Merge small entries as they pile up (sizes roughly halving from the oldest),
            # so a stream fed one record at a time keeps a few entries, not thousands.
            while tail and tail[-1].summary.count <= len(cols):
                previous = tail.pop()
                removed.append(previous)
                cols = concat_columns([_data(previous), cols])
        head = f"{site}\0{stream}\0".encode()
        raw = b""
        if fresh:
            raw = head + cols.encode()
            tail.append(
                BlockRef(site, stream, self._new_id(), BlockSummary.of(cols), cols, len(raw))
            )
        new = replace(old, blocks=old.blocks, tail=tail)
        new.high_water = high_water
        new.dropped += dropped
        with self._env.begin(write=True) as txn:
            for ref in removed:
                txn.delete(_ID.pack(ref.block_id), db=self._dbs["tail"])
            if fresh:
                txn.put(_ID.pack(tail[-1].block_id), raw, db=self._dbs["tail"])
            txn.put(_stream_key(site, stream), new.to_json(), db=self._dbs["streams"])
        self._env.sync(True)
        with self._state_lock:
            self._streams[(site, stream)] = new
        self._pending_records += len(fresh)
        self._pending_bytes += sum(len(r.payload) + 1 for r in fresh)

    def _write_segment(self) -> None:
        """Turn every tail into sealed blocks of a new segment, with its vocabulary."""
        segment_id = self._new_id()
        refs: list[BlockRef] = []
        packed: list[bytes] = []
        token_sets: list[set[bytes]] = []
        for (site, stream), state in self._streams.items():
            if not state.tail:
                continue
            cols = concat_columns([_data(ref) for ref in state.tail])
            for part in split_columns(cols, self._block_records, BLOCK_BYTES):
                refs.append(BlockRef(site, stream, self._new_id(), BlockSummary.of(part)))
                packed.append(zlib.compress(part.encode(), COMPRESSION))
                token_sets.append(block_tokens(part.text))
        vocab = self._write_vocab(segment_id, build_vocab(token_sets))
        del token_sets
        sized = _with_sizes(list(refs), [len(p) for p in packed], len(vocab))
        refs = [ref for ref in sized if ref is not None]
        with self._env.begin(write=True) as txn:
            for ref, data in zip(refs, packed, strict=True):
                txn.put(_ID.pack(ref.block_id), data, db=self._dbs["blocks"], append=True)
            for state in self._streams.values():
                for ref in state.tail:
                    txn.delete(_ID.pack(ref.block_id), db=self._dbs["tail"])
            summaries = [[r.block_id, r.site, r.stream, r.summary.to_json(), r.size] for r in refs]
            txn.put(_ID.pack(segment_id), orjson.dumps(summaries), db=self._dbs["segments"])
        # Published before the sync: memory must follow what is committed even if the sync
        # fails (until it succeeds, a crash brings back the tails, which were durable).
        by_stream: dict[tuple[str, str], list[BlockRef]] = {}
        for ref in refs:
            by_stream.setdefault((ref.site, ref.stream), []).append(ref)
        with self._state_lock:
            for stream_key, new_blocks in by_stream.items():
                old = self._streams[stream_key]
                self._streams[stream_key] = replace(old, blocks=[*old.blocks, *new_blocks], tail=[])
            self._segments = [*self._segments, _Segment(segment_id, tuple(refs), vocab)]
        self._pending_records = 0
        self._pending_bytes = 0
        self._env.sync(True)
        logger.debug("log segment %d: %d blocks", segment_id, len(refs))

    # -- queries

    def query(self, query: LogQuery) -> LogPage:
        """The page of ``query``: newest first, at most ``query.limit`` hits."""
        matcher = Matcher(query)
        with self._state_lock:
            streams = [
                (key, state) for key, state in self._streams.items() if matcher.stream_ok(*key)
            ]
            segments = self._segments
            txn = self._env.begin(buffers=True)
        try:
            blocks: list[BlockRef] = []
            wanted = {key for key, _ in streams}
            if matcher.terms:
                for segment in segments:
                    ordinals = self._candidates(segment, matcher)
                    chosen = (
                        segment.blocks
                        if ordinals is None
                        else [segment.blocks[o] for o in ordinals]
                    )
                    blocks.extend(
                        b for b in chosen
                        if b is not None  # dropped by retention
                        and (b.site, b.stream) in wanted and matcher.summary_ok(b.summary)
                    )  # fmt: skip
                for _, state in streams:
                    blocks.extend(b for b in state.tail if matcher.summary_ok(b.summary))
            else:
                for _, state in streams:
                    blocks.extend(b for b in state.blocks if matcher.summary_ok(b.summary))
                    blocks.extend(b for b in state.tail if matcher.summary_ok(b.summary))
            return run_query(matcher, blocks, lambda ref: self._load_block(txn, ref))
        finally:
            txn.abort()

    def _candidates(self, segment: _Segment, matcher: Matcher) -> list[int] | None:
        """Ordinals of the segment's blocks that may match, None for all of them."""
        vocab = Vocab(segment.vocab)
        try:
            found: set[int] | None = None
            for term in matcher.terms:
                if term.linear and found is not None and len(found) <= FEW_BLOCKS:
                    break
                ordinals = vocab.lookup(term, MAX_INDEX_ENTRIES)
                if ordinals is not None:
                    found = ordinals if found is None else found & ordinals
                    if not found:
                        break
            return None if found is None else sorted(found)
        finally:
            vocab.release()

    def _load_block(self, txn: lmdb.Transaction, ref: BlockRef) -> Columns:
        if ref.data is not None:
            return ref.data
        raw = txn.get(_ID.pack(ref.block_id), db=self._dbs["blocks"])
        if raw is None:
            raise RuntimeError(f"log block {ref.block_id} of {ref.site} {ref.stream} is missing")
        return Columns.decode(zlib.decompress(raw))
