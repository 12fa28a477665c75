"""Fleet logs at the hub: records, blocks, the token index and the query engine (pure).

Sites forward log lines (``tenant/app/name`` streams, one sequence per site and stream);
the hub keeps them in blocks of at most ``BLOCK_RECORDS`` records of one stream, stored by
``central_hub.logstore`` (the LMDB adapter). This module holds everything that needs no
I/O:

- ``Columns``: the records of a block, column by column (seqs, times, levels, hosts,
  payloads joined by ``\\n``), with a compact binary codec. Searching a block is then one
  ``bytes.find`` over its text, in C, not a Python loop over its records.
- ``BlockSummary``: what a query can decide about a block without reading it (seq and
  time range, count per level, count per host).
- The token index of a *segment* (a group of blocks written together): its vocabulary,
  every distinct ``[A-Za-z0-9_]+`` run of the segment's text, sorted, each with the
  ordinals of the blocks that contain it. Whole tokens and token prefixes are found by
  binary search; suffixes and infixes (the edges of a substring may cut a token) by one
  linear scan of the vocabulary (2-3 times smaller than the text when most lines carry a
  unique id, far smaller otherwise), skipped when whole tokens already leave few blocks.
  Regexes use the index through their literal runs. The index only *narrows* the blocks
  to read: every candidate record is checked with the real substring or regex, so results
  are exact whatever the index says.
- Regexes come from API callers: they run on RE2 (``google-re2``), whose matching time is
  linear in the text (no backtracking: ``^(a+)+$`` costs what ``^a+$`` does); a pattern
  RE2 does not take (backreferences, lookarounds) is a ``LogQueryError`` saying so. A query
  may have a time budget (``LogQuery.budget_s``): past it the page is cut short and says
  what was scanned (``LogPage.truncated``).
- ``Matcher``: a validated ``LogQuery``; ``run_query`` turns candidate blocks into a
  page, newest first, visiting blocks by their newest possible record and stopping as
  soon as no remaining block can beat the page.
- The cursor codec (opaque, tied to the query's filters).

It is longer than the hub's other modules because these pieces share one block layout
and one index format and are tested together as the query engine; split, each would
expose its internals to the others.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import math
import mmap
import re
import struct
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice, repeat
from operator import le
from typing import Any

import orjson

from meshorch.streams.model import SEGMENT_RE

# -- the public records (re-exported by central_hub.logstore) ----------------------------


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One event as the site forwarded it."""

    seq: int  # per (site, stream), contiguous from 1
    time_s: float  # producer unix time
    level: int | None  # syslog severity 0..7 (3 = error, 4 = warning, 6 = info), None = unknown
    host: str
    payload: bytes  # the line/event; searched as UTF-8 (errors="replace")


@dataclass(frozen=True, slots=True)
class IngestResult:
    high_water: int  # last seq now stored for (site, stream)
    accepted: int  # new records stored
    duplicates: int  # records with seq <= previous high water (ignored: idempotent)
    dropped: int  # seqs skipped because the site said retention dropped them


class LogGap(Exception):
    """Records start after ``high_water + 1`` and ``dropped_through`` does not cover the gap:
    the site must resend from ``high_water + 1``."""

    def __init__(self, message: str, high_water: int) -> None:
        super().__init__(message)
        self.high_water = high_water


class LogQueryError(ValueError):
    """A query that cannot be run (bad regex, limit out of range, bad cursor...); ``code``
    is the API's error code."""

    def __init__(self, message: str, code: str = "bad_query") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class LogQuery:
    tenants: frozenset[str] | None = None  # None = all tenants; else only these tenants' streams
    site: str | None = None
    app: str | None = None  # the app segment of "tenant/app/name" (or "tenant/app")
    stream: str | None = None  # full name "tenant/app/name"
    host: str | None = None
    since: float | None = None  # inclusive, unix seconds
    until: float | None = None  # exclusive
    max_level: int | None = None  # keep level <= max_level (unknown levels excluded when set)
    substring: str | None = None  # case-sensitive substring of the payload text
    regex: str | None = None  # RE2 syntax, searched in the payload text
    limit: int = 100  # 1..MAX_LIMIT
    cursor: str | None = None  # opaque, from a previous page's next_cursor
    count: bool = False  # also return the total number of matches (whatever the cursor)
    budget_s: float | None = None  # stop scanning after this long (None: no limit)


@dataclass(frozen=True, slots=True)
class LogHit:
    site: str
    stream: str
    seq: int
    time_s: float
    level: int | None
    host: str
    text: str


@dataclass(frozen=True, slots=True)
class Truncated:
    """A query cut short by its time budget: what it had scanned by then."""

    budget_s: float
    blocks_scanned: int  # blocks read and searched (whole)
    blocks: int  # candidate blocks of the query
    records_scanned: int  # records checked against the filters

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": f"the query's time budget of {self.budget_s:g} s was spent",
            "budget_s": self.budget_s,
            "blocks_scanned": self.blocks_scanned,
            "blocks": self.blocks,
            "records_scanned": self.records_scanned,
        }


@dataclass(frozen=True, slots=True)
class LogPage:
    hits: list[LogHit]  # newest first: (time_s, site, stream, seq) descending
    next_cursor: str | None  # None when there is certainly no more
    total: int | None  # when query.count (None too when truncated)
    # Set when the budget was spent: the hits are those found in what was scanned (not
    # necessarily the newest matches), and there is no next_cursor.
    truncated: Truncated | None = None


class _OutOfTime(Exception):
    """The query's budget is spent (caught by ``run_query``)."""


MAX_LIMIT = 1000
MAX_LEVEL = 7
NO_LEVEL = 255  # a record's level byte when the level is unknown
LEVEL_SLOTS = MAX_LEVEL + 2  # counts for levels 0..7, then unknown

# A record's position in the global order: newest first means descending keys.
Key = tuple[float, str, str, int]

# -- columns ------------------------------------------------------------------------------

# magic, count, length of the hosts JSON, length of the text
_HEADER = struct.Struct("<4sIII")
_MAGIC = b"LGB1"


@dataclass(slots=True)
class Columns:
    """Records of one stream, column by column. ``text`` is the payloads joined by ``\\n``;
    ``starts[i]`` is where payload ``i`` begins. Never mutated once built."""

    seqs: array[int]  # 'q'
    times: array[float]  # 'd'
    levels: bytes  # one byte a record, NO_LEVEL when unknown
    hosts: tuple[str, ...]
    host_idx: array[int]  # 'H', index into hosts
    starts: array[int]  # 'I'
    text: bytes

    def __len__(self) -> int:
        return len(self.seqs)

    def end(self, i: int) -> int:
        return self.starts[i + 1] - 1 if i + 1 < len(self.seqs) else len(self.text)

    def payload(self, i: int) -> bytes:
        return self.text[self.starts[i] : self.end(i)]

    def level(self, i: int) -> int | None:
        value = self.levels[i]
        return None if value == NO_LEVEL else value

    @classmethod
    def from_records(cls, records: Sequence[LogRecord]) -> Columns:
        hosts: dict[str, int] = {}
        host_idx = array("H", (hosts.setdefault(r.host, len(hosts)) for r in records))
        if len(hosts) > 0xFFFF:
            raise ValueError("more than 65535 distinct hosts in one batch")
        payloads = [r.payload for r in records]
        starts = array("I", accumulate((len(p) + 1 for p in payloads[:-1]), initial=0))
        text = b"\n".join(payloads)
        if len(text) >= 1 << 32:
            raise ValueError("a batch of logs must be smaller than 4 GiB")
        return cls(
            seqs=array("q", (r.seq for r in records)),
            times=array("d", (r.time_s for r in records)),
            levels=bytes(NO_LEVEL if r.level is None else r.level for r in records),
            hosts=tuple(hosts),
            host_idx=host_idx,
            starts=starts,
            text=text,
        )

    def encode(self) -> bytes:
        hosts = orjson.dumps(self.hosts)
        return b"".join(
            (
                _HEADER.pack(_MAGIC, len(self.seqs), len(hosts), len(self.text)),
                hosts,
                self.seqs.tobytes(),
                self.times.tobytes(),
                self.levels,
                self.host_idx.tobytes(),
                self.starts.tobytes(),
                self.text,
            )
        )

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Columns:
        view = memoryview(raw)
        try:
            magic, n, hosts_len, text_len = _HEADER.unpack_from(view)
        except struct.error as exc:
            raise ValueError(f"log block too short: {exc}") from None
        if magic != _MAGIC:
            raise ValueError(f"not a log block (magic {bytes(magic)!r})")
        expected = _HEADER.size + hosts_len + n * (8 + 8 + 1 + 2 + 4) + text_len
        if len(view) != expected:
            raise ValueError(f"log block of {len(view)} bytes, its header says {expected}")
        pos = _HEADER.size

        def take(size: int) -> memoryview:
            nonlocal pos
            part = view[pos : pos + size]
            pos += size
            return part

        hosts = tuple(orjson.loads(bytes(take(hosts_len))))
        seqs, times, host_idx, starts = array("q"), array("d"), array("H"), array("I")
        seqs.frombytes(take(8 * n))
        times.frombytes(take(8 * n))
        levels = bytes(take(n))
        host_idx.frombytes(take(2 * n))
        starts.frombytes(take(4 * n))
        return cls(seqs, times, levels, hosts, host_idx, starts, bytes(take(text_len)))


assert array("I").itemsize == 4 and array("H").itemsize == 2 and array("q").itemsize == 8


def concat_columns(parts: Sequence[Columns]) -> Columns:
    """The records of ``parts`` one after the other (hosts merged)."""
    if len(parts) == 1:
        return parts[0]
    hosts: dict[str, int] = {}
    host_idx, starts = array("H"), array("I")
    seqs, times = array("q"), array("d")
    offset = 0
    for part in parts:
        mapping = [hosts.setdefault(h, len(hosts)) for h in part.hosts]
        if mapping == list(range(len(mapping))):
            host_idx.extend(part.host_idx)
        else:
            host_idx.extend(mapping[i] for i in part.host_idx)
        starts.extend(s + offset for s in part.starts) if offset else starts.extend(part.starts)
        offset += len(part.text) + 1
        seqs.extend(part.seqs)
        times.extend(part.times)
    return Columns(
        seqs=seqs,
        times=times,
        levels=b"".join(p.levels for p in parts),
        hosts=tuple(hosts),
        host_idx=host_idx,
        starts=starts,
        text=b"\n".join(p.text for p in parts),
    )


def split_columns(cols: Columns, max_records: int, max_bytes: int) -> list[Columns]:
    """Consecutive slices of at most ``max_records`` records and (unless one record is
    larger) ``max_bytes`` of text."""
    n = len(cols)
    if n <= max_records and len(cols.text) <= max_bytes:
        return [cols]
    out: list[Columns] = []
    a = 0
    while a < n:
        by_bytes = bisect_left(cols.starts, cols.starts[a] + max_bytes, a + 1)
        b = max(a + 1, min(a + max_records, by_bytes, n))
        base = cols.starts[a]
        out.append(
            Columns(
                seqs=cols.seqs[a:b],
                times=cols.times[a:b],
                levels=cols.levels[a:b],
                hosts=cols.hosts,
                host_idx=cols.host_idx[a:b],
                starts=array("I", (s - base for s in cols.starts[a:b])),
                text=cols.text[base : cols.end(b - 1)],
            )
        )
        a = b
    return out


# -- block summaries ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockSummary:
    first_seq: int
    last_seq: int
    count: int
    min_t: float
    max_t: float
    level_counts: tuple[int, ...]  # LEVEL_SLOTS counts: levels 0..7, then unknown
    host_counts: dict[str, int] = field(hash=False)
    ordered: bool = False  # times never decrease with seq: the last matches are the newest

    @classmethod
    def of(cls, cols: Columns) -> BlockSummary:
        levels = cols.levels
        level_counts = (*(levels.count(v) for v in range(MAX_LEVEL + 1)), levels.count(NO_LEVEL))
        per_index = Counter(cols.host_idx)
        return cls(
            first_seq=cols.seqs[0],
            last_seq=cols.seqs[-1],
            count=len(cols),
            min_t=min(cols.times),
            max_t=max(cols.times),
            level_counts=level_counts,
            host_counts={cols.hosts[i]: c for i, c in per_index.items()},
            ordered=all(map(le, cols.times, islice(cols.times, 1, None))),
        )

    def to_json(self) -> list[Any]:
        return [
            self.first_seq,
            self.last_seq,
            self.count,
            self.min_t,
            self.max_t,
            list(self.level_counts),
            self.host_counts,
            self.ordered,
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> BlockSummary:
        first, last, count, min_t, max_t, levels, hosts, ordered = data
        return cls(first, last, count, min_t, max_t, tuple(levels), dict(hosts), ordered)


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block as queries see it: where it is, what is in it. ``data`` is the records
    themselves for blocks still held in memory (the open tail of a stream), else None and
    ``block_id`` says where the store keeps them."""

    site: str
    stream: str
    block_id: int
    summary: BlockSummary
    data: Columns | None = None
    size: int = 0  # bytes it takes in the store (its share of the segment's index included)

    @property
    def upper(self) -> Key:
        """No record of the block sorts after this key."""
        return (self.summary.max_t, self.site, self.stream, self.summary.last_seq)

    @property
    def lower(self) -> Key:
        """No record of the block sorts before this key."""
        return (self.summary.min_t, self.site, self.stream, self.summary.first_seq)


# -- retention ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockUsage:
    """What retention needs to know of a stored block (or tail entry)."""

    block_id: int
    newest_s: float  # time of its newest record
    size: int  # bytes it takes in the store


def expired_blocks(
    blocks: Sequence[BlockUsage], now: float, max_age_s: float | None, max_bytes: int | None
) -> list[int]:
    """The ids of the blocks to drop, oldest first: every block whose newest record is
    older than ``max_age_s``, then the oldest others while the total is over ``max_bytes``.

    Oldest means by newest record (ties by id, i.e. by storage order): a block goes only
    when all of its records are past the limit, never part of it."""
    ordered = sorted(blocks, key=lambda b: (b.newest_s, b.block_id))
    total = sum(b.size for b in ordered)
    cutoff = None if max_age_s is None else now - max_age_s
    drop: list[int] = []
    for block in ordered:
        too_old = cutoff is not None and block.newest_s < cutoff
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break  # sorted by age: every later block is younger, and the total fits
        drop.append(block.block_id)
        total -= block.size
    return drop


# -- tokens and the vocabulary ------------------------------------------------------------

# Bytes that are not [A-Za-z0-9_] become spaces, so ``split()`` (C) yields the tokens.
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_TO_SPACES = bytes(c if c in _WORD else 0x20 for c in range(256))
_TOKEN_RE = re.compile(rb"[A-Za-z0-9_]+")


def block_tokens(text: bytes) -> set[bytes]:
    """The distinct tokens of a block's text."""
    return set(text.translate(_TO_SPACES).split())


# One vocabulary line: token, \x01, comma-separated block ordinals, \n.
_SEP = b"\x01"
_VOCAB_HEADER = struct.Struct("<I")


def build_vocab(block_token_sets: Sequence[set[bytes]]) -> bytes:
    """The index of a segment whose block ``i`` has the tokens ``block_token_sets[i]``:
    entry count, line offsets (u32, one more than entries) and the sorted lines."""
    # C loops (set algebra, map) wherever possible: a segment has ~1M distinct tokens.
    seen: set[bytes] = set()
    shared: set[bytes] = set()
    for tokens in block_token_sets:
        shared |= tokens & seen
        seen |= tokens
    del seen
    postings: dict[bytes, list[bytes]] = {t: [] for t in shared}
    lines: list[bytes] = []
    for ordinal, tokens in enumerate(block_token_sets):
        label = b"%d" % ordinal
        lines.extend(map(bytes.__add__, tokens - shared, repeat(_SEP + label + b"\n")))
        deque(map(list.append, map(postings.__getitem__, tokens & shared), repeat(label)), 0)
    lines.extend(t + _SEP + b",".join(p) + b"\n" for t, p in postings.items())
    del postings
    # \x01 sorts before every token byte, so sorting lines sorts their tokens.
    lines.sort()
    offsets = array("I", accumulate(map(len, lines), initial=0))
    blob = b"".join(lines)
    if len(blob) >= 1 << 32:
        raise ValueError("segment vocabulary larger than 4 GiB")
    return _VOCAB_HEADER.pack(len(lines)) + offsets.tobytes() + blob


@dataclass(frozen=True, slots=True)
class Term:
    """A token of a substring query. ``open_left``: the token may continue before it in the
    text (it starts the substring), ``open_right``: may continue after it."""

    token: bytes
    open_left: bool
    open_right: bool

    @property
    def linear(self) -> bool:
        """Needs a scan of the vocabulary (suffix or infix), not a binary search."""
        return self.open_left


MIN_SCAN_TOKEN = 3  # shorter suffixes/infixes match too much of the vocabulary to help
MIN_PREFIX_TOKEN = 2


def plan_terms(substring: str) -> list[Term]:
    """The tokens of ``substring`` usable against the index, most selective first."""
    if "\ufffd" in substring:
        return []  # a replacement character matches bytes the index never saw as such
    raw = substring.encode()
    terms = []
    for m in _TOKEN_RE.finditer(raw):
        term = Term(m.group(), m.start() == 0, m.end() == len(raw))
        if term.linear and len(term.token) < MIN_SCAN_TOKEN:
            continue
        if term.open_right and len(term.token) < MIN_PREFIX_TOKEN:
            continue
        terms.append(term)
    terms.sort(key=_term_order)
    return terms


def _term_order(term: Term) -> tuple[bool, bool, int]:
    """Exact before prefix before suffix/infix; longer first within each."""
    return (term.linear, term.open_right, -len(term.token))


# RE2 syntax that Python's parser reads otherwise (POSIX classes, \Q..\E quoting, Unicode
# classes, {,n}, flags Python lacks): no literal hints from such patterns.
_RE2_ONLY = ("[:", "\\Q", "\\E", "\\p", "\\P", "\\C", "\\z", "{,", "(?U", "(?m", "(?-")
MAX_REGEX_CHARS = 1000


def compile_regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (linear-time matching); ``LogQueryError`` (code
    ``bad_regex``) for a pattern RE2 refuses. ``re2`` is imported here, at the first
    regex query."""
    bad = f"regex {pattern[:100]!r} is invalid"
    if len(pattern) > MAX_REGEX_CHARS:
        raise LogQueryError(f"{bad}: at most {MAX_REGEX_CHARS} characters", "bad_regex")
    if not _encodable(pattern):
        raise LogQueryError(f"{bad}: it is not UTF-8 text (a lone surrogate)", "bad_regex")
    import re2  # the hub's log queries only

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
        raise LogQueryError(
            f"{bad}: {why} (regexes run on RE2, in time linear in the text: RE2 syntax, "
            "no backreferences and no lookahead or lookbehind)",
            "bad_regex",
        ) from None


def regex_literals(pattern: str) -> list[str]:
    """Runs of literal text that every match of ``pattern`` contains: the literals of its
    top level (groups, classes, repeats and alternations only cut the runs). Empty when
    unsure (case-insensitive, RE2 syntax Python's parser reads otherwise, or the
    parser's internals differ). Only the parse of Python's ``re`` is used, never its
    matching."""
    if any(token in pattern for token in _RE2_ONLY):
        return []
    try:
        parser: Any = importlib.import_module("re._parser")
        parsed = parser.parse(pattern)
        literal = parser.LITERAL
        if parsed.state.flags & re.IGNORECASE:
            return []
        runs, run = [], []
        for op, arg in parsed:
            if op == literal:
                run.append(chr(arg))
            elif run:
                runs.append("".join(run))
                run = []
        if run:
            runs.append("".join(run))
        return runs
    except Exception:  # re's parser is internal: without it, no hint, same results
        return []


class Vocab:
    """A segment's vocabulary, over its bytes or a read-only map of its file (whose
    ``find`` is as fast as ``bytes.find``)."""

    __slots__ = ("_base", "_buf", "_n", "_offsets")

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self._buf = buf
        self._n: int = _VOCAB_HEADER.unpack_from(buf)[0]
        self._base = _VOCAB_HEADER.size + 4 * (self._n + 1)  # where the lines start
        self._offsets = memoryview(buf)[_VOCAB_HEADER.size : self._base].cast("I")
        if len(buf) != self._base + self._offsets[self._n]:
            raise ValueError(f"vocabulary of {len(buf)} bytes, its header says otherwise")

    def release(self) -> None:
        """Let go of the buffer (a map cannot be closed while a view of it exists)."""
        self._offsets.release()

    def __len__(self) -> int:
        return self._n

    def _line(self, i: int) -> bytes:
        return self._buf[self._base + self._offsets[i] : self._base + self._offsets[i + 1]]

    def _token(self, i: int) -> bytes:
        line = self._line(i)
        return line[: line.index(_SEP)]

    def _first_at_least(self, token: bytes) -> int:
        lo, hi = 0, self._n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._token(mid) < token:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @staticmethod
    def _ordinals(line: bytes, into: set[int]) -> None:
        into.update(map(int, line[line.index(_SEP) + 1 : -1].split(b",")))

    def lookup(self, term: Term, max_entries: int) -> set[int] | None:
        """Ordinals of the blocks that may contain ``term``; None when more than
        ``max_entries`` vocabulary entries match (too unselective to be worth it)."""
        found: set[int] = set()
        if not term.linear:
            i = self._first_at_least(term.token)
            if not term.open_right:
                if i < self._n and self._token(i) == term.token:
                    self._ordinals(self._line(i), found)
                return found
            entries = 0
            while i < self._n:
                line = self._line(i)
                if not line.startswith(term.token):
                    break
                entries += 1
                if entries > max_entries:
                    return None
                self._ordinals(line, found)
                i += 1
            return found
        # Suffix (token then \x01) or infix: scan the lines, then keep hits in a token.
        needle = term.token if term.open_right else term.token + _SEP
        buf, base, offsets, entries = self._buf, self._base, self._offsets, 0
        pos = buf.find(needle, base)
        while pos != -1:
            i = bisect_right(offsets, pos - base) - 1
            line = self._line(i)
            if pos - base - offsets[i] + len(term.token) <= line.index(_SEP):
                entries += 1
                if entries > max_entries:
                    return None
                self._ordinals(line, found)
            # else the hit is in the ordinals, not in the token
            pos = buf.find(needle, base + offsets[i + 1])  # one hit per line is enough
        return found


# _SEVERE[m] maps a level byte to 1 when the level is at most m (never NO_LEVEL), else 0.
_SEVERE = [bytes(1 if v <= m else 0 for v in range(256)) for m in range(MAX_LEVEL + 1)]


def _positions(mask: bytes) -> list[int]:
    """Indexes of the 1 bytes of ``mask``."""
    found = []
    pos = mask.find(1)
    while pos != -1:
        found.append(pos)
        pos = mask.find(1, pos + 1)
    return found


# -- queries ------------------------------------------------------------------------------

_CURSOR_PREFIX = "lc1."


def _check_name(label: str, value: str | None, parts: int | tuple[int, ...]) -> None:
    if value is None:
        return
    allowed = parts if isinstance(parts, tuple) else (parts,)
    pieces = value.split("/") if isinstance(value, str) else []
    if len(pieces) not in allowed or not all(SEGMENT_RE.fullmatch(p) for p in pieces):
        shape = " or ".join({1: "'name'", 2: "'tenant/app'", 3: "'tenant/app/name'"}[n]
                            for n in allowed)  # fmt: skip
        raise LogQueryError(
            f"{label} {value!r} is invalid: it must be {shape}, each part 1-63 of a-z, 0-9, '-'"
        )


def _finite(label: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, int | float) or not math.isfinite(value)):
        raise LogQueryError(f"{label} must be a finite number of unix seconds, got {value!r}")


class Matcher:
    """A validated query: which streams and blocks it can touch, and its record test."""

    def __init__(self, query: LogQuery) -> None:
        q = query
        if not isinstance(q.limit, int) or not 1 <= q.limit <= MAX_LIMIT:
            raise LogQueryError(f"limit must be between 1 and {MAX_LIMIT}, got {q.limit!r}")
        if q.max_level is not None and (
            not isinstance(q.max_level, int) or not 0 <= q.max_level <= MAX_LEVEL
        ):
            raise LogQueryError(f"max_level must be between 0 and {MAX_LEVEL}, got {q.max_level!r}")
        _finite("since", q.since)
        _finite("until", q.until)
        _check_name("site", q.site, 1)
        _check_name("app", q.app, (1, 2))
        _check_name("stream", q.stream, 3)
        if q.tenants is not None:
            for tenant in q.tenants:
                _check_name("tenant", tenant, 1)
        if q.substring is not None and (not isinstance(q.substring, str) or not q.substring):
            raise LogQueryError("substring must be a non-empty string (omit it to match all)")
        self.regex: Any = None  # an RE2 pattern (compile_regex)
        if q.regex is not None:
            if not isinstance(q.regex, str) or not q.regex:
                raise LogQueryError("regex must be a non-empty string (omit it to match all)")
            self.regex = compile_regex(q.regex)
        if q.budget_s is not None and not q.budget_s > 0:
            raise LogQueryError(f"budget_s must be > 0, got {q.budget_s!r}")
        self.query = q
        self.deadline: float | None = None  # time.monotonic() past which scanning stops
        self.scanned = 0  # records checked so far
        # Text every match must contain: the substring, the regex's literal runs. The index
        # narrows blocks with their tokens, one of them narrows records inside a block.
        literals = [] if q.regex is None else regex_literals(q.regex)
        if q.substring is not None:
            literals.append(q.substring)
        # Decoded payloads never hold lone surrogates, and their U+FFFD may stand for bytes
        # the index saw otherwise: such text is checked record by record only.
        literals = [t for t in literals if "\ufffd" not in t and _encodable(t)]
        self.terms = sorted(
            (term for text in literals for term in plan_terms(text)), key=_term_order
        )
        self.needle = max((t.encode() for t in literals), key=len, default=None)
        self.has_text = q.substring is not None or q.regex is not None
        self.fingerprint = _fingerprint(q)
        self.cursor: Key | None = None if q.cursor is None else self._decode_cursor(q.cursor)

    # -- partitions

    def stream_ok(self, site: str, stream: str) -> bool:
        q = self.query
        if q.site is not None and site != q.site:
            return False
        if q.stream is not None and stream != q.stream:
            return False
        tenant, app, _ = stream.split("/", 2)
        if q.tenants is not None and tenant not in q.tenants:
            return False
        return q.app is None or q.app in (app, f"{tenant}/{app}")

    def summary_ok(self, s: BlockSummary) -> bool:
        q = self.query
        if q.since is not None and s.max_t < q.since:
            return False
        if q.until is not None and s.min_t >= q.until:
            return False
        if q.max_level is not None and not any(s.level_counts[: q.max_level + 1]):
            return False
        return q.host is None or q.host in s.host_counts

    def summary_count(self, s: BlockSummary) -> int | None:
        """The block's number of matches from its summary alone, when that is possible."""
        q = self.query
        if self.has_text or (q.host is not None and q.max_level is not None):
            return None
        if (q.since is not None and s.min_t < q.since) or (
            q.until is not None and s.max_t >= q.until
        ):
            return None
        if q.max_level is not None:
            return sum(s.level_counts[: q.max_level + 1])
        if q.host is not None:
            return s.host_counts.get(q.host, 0)
        return s.count

    # -- the budget

    def start_clock(self) -> None:
        if self.query.budget_s is not None:
            self.deadline = time.monotonic() + self.query.budget_s

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _OutOfTime

    # -- records

    def match(
        self,
        cols: Columns,
        site: str,
        stream: str,
        *,
        before: Key | None = None,
        newest: int | None = None,
    ) -> list[tuple[Key, int]]:
        """The records of the block that match, as (key, index): all of them, or only
        those with a key below ``before``. With ``newest`` (for blocks whose times are
        ordered), possibly only the ``newest`` last ones."""
        q = self.query
        candidates: Sequence[int]
        if self.needle is not None:
            candidates = self._find(cols, self.needle)
        elif q.max_level is not None:  # levels are one byte each: find the severe ones in C
            candidates = _positions(cols.levels.translate(_SEVERE[q.max_level]))
        else:
            candidates = range(len(cols))
        if newest is not None:
            candidates = candidates[::-1]
        times, levels, host_idx, seqs = cols.times, cols.levels, cols.host_idx, cols.seqs
        since, until, max_level = q.since, q.until, q.max_level
        host = -1
        if q.host is not None:
            if q.host not in cols.hosts:
                return []
            host = cols.hosts.index(q.host)
        substring, regex = q.substring, self.regex
        deadline = self.deadline
        out = []
        checked = 0
        for i in candidates:
            checked += 1
            if deadline is not None and not checked & 255 and time.monotonic() > deadline:
                self.scanned += checked
                raise _OutOfTime
            t = times[i]
            if (since is not None and t < since) or (until is not None and t >= until):
                continue
            if max_level is not None and levels[i] > max_level:
                continue  # NO_LEVEL (255) is above every level
            if host >= 0 and host_idx[i] != host:
                continue
            if substring is not None or regex is not None:
                text = cols.payload(i).decode("utf-8", "replace")
                if substring is not None and substring not in text:
                    continue
                if regex is not None and regex.search(text) is None:
                    continue
            key = (t, site, stream, seqs[i])
            if before is not None and key >= before:
                continue
            out.append((key, i))
            if newest is not None and len(out) >= newest:
                break
        self.scanned += checked
        return out

    @staticmethod
    def _find(cols: Columns, needle: bytes) -> list[int]:
        """Records whose payload contains ``needle`` (one search over the block's text)."""
        text, starts, n = cols.text, cols.starts, len(cols)
        found = []
        pos = text.find(needle)
        while pos != -1:
            i = bisect_right(starts, pos) - 1
            end = cols.end(i)
            if pos + len(needle) <= end:
                found.append(i)
                if i + 1 >= n:
                    break
                pos = text.find(needle, end + 1)
            else:
                pos = text.find(needle, pos + 1)  # it spans two records
        return found

    # -- cursors

    def encode_cursor(self, key: Key) -> str:
        raw = orjson.dumps([self.fingerprint, *key])
        return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _decode_cursor(self, cursor: str) -> Key:
        bad = "cursor is invalid: pass next_cursor of the previous page unchanged"
        if not isinstance(cursor, str) or not cursor.startswith(_CURSOR_PREFIX):
            raise LogQueryError(bad)
        body = cursor[len(_CURSOR_PREFIX) :]
        try:
            data = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, orjson.JSONDecodeError):
            raise LogQueryError(bad) from None
        if not (
            isinstance(data, list)
            and len(data) == 5
            and isinstance(data[1], int | float)
            and isinstance(data[2], str)
            and isinstance(data[3], str)
            and isinstance(data[4], int)
        ):
            raise LogQueryError(bad)
        if data[0] != self.fingerprint:
            raise LogQueryError("cursor belongs to a query with other filters")
        return (float(data[1]), data[2], data[3], data[4])


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _fingerprint(q: LogQuery) -> str:
    filters = [
        None if q.tenants is None else sorted(q.tenants),
        q.site, q.app, q.stream, q.host, q.since, q.until, q.max_level, q.substring, q.regex,
    ]  # fmt: skip
    # repr, not JSON: it escapes lone surrogates instead of failing on them.
    return hashlib.blake2b(repr(filters).encode(), digest_size=6).hexdigest()


Loader = Callable[[BlockRef], Columns]


def run_query(matcher: Matcher, blocks: Sequence[BlockRef], load: Loader) -> LogPage:
    """The page of ``matcher``'s query among ``blocks`` (each already passed the query's
    stream and summary tests), reading blocks with ``load`` only when needed; cut short
    when the query's budget is spent (``LogPage.truncated``)."""
    matcher.start_clock()
    hits: list[tuple[Key, BlockRef, Columns, int]] = []
    scanned = [0]  # blocks searched whole
    try:
        return _run_query(matcher, blocks, load, hits, scanned)
    except _OutOfTime:
        budget = matcher.query.budget_s
        assert budget is not None
        hits.sort(key=lambda h: h[0], reverse=True)
        del hits[matcher.query.limit :]
        truncated = Truncated(budget, scanned[0], len(blocks), matcher.scanned)
        return LogPage(hits=_page(hits), next_cursor=None, total=None, truncated=truncated)


def _run_query(
    matcher: Matcher,
    blocks: Sequence[BlockRef],
    load: Loader,
    hits: list[tuple[Key, BlockRef, Columns, int]],
    scanned: list[int],
) -> LogPage:
    limit, cursor = matcher.query.limit, matcher.cursor
    matched: dict[int, int] = {}  # id(block) -> its number of matches, for the count
    kth: Key | None = None  # key of the limit-th hit so far
    more = False
    for block in sorted(blocks, key=lambda b: b.upper, reverse=True):
        if kth is not None and block.upper < kth:
            more = True  # not read: it may hold older matches
            break
        if cursor is not None and block.lower >= cursor:
            continue
        matcher.check_time()
        cols = load(block)
        if matcher.query.count or not block.summary.ordered:
            found = matcher.match(cols, block.site, block.stream)
            matched[id(block)] = len(found)  # all of the block's matches
        else:  # only the block's newest matches can make the page (one more: is there more?)
            found = matcher.match(cols, block.site, block.stream, before=cursor, newest=limit + 1)
        scanned[0] += 1
        hits.extend((key, block, cols, i) for key, i in found if cursor is None or key < cursor)
        if len(hits) >= limit:
            hits.sort(key=lambda h: h[0], reverse=True)
            if len(hits) > limit:
                more = True
                del hits[limit:]
            kth = hits[-1][0]
    hits.sort(key=lambda h: h[0], reverse=True)
    total = None
    if matcher.query.count:
        total = 0
        for block in blocks:
            known = matched.get(id(block))
            if known is None:
                known = matcher.summary_count(block.summary)
            if known is None:
                matcher.check_time()
                known = len(matcher.match(load(block), block.site, block.stream))
            total += known
    next_cursor = matcher.encode_cursor(hits[-1][0]) if more and hits else None
    return LogPage(hits=_page(hits), next_cursor=next_cursor, total=total)


def _page(hits: list[tuple[Key, BlockRef, Columns, int]]) -> list[LogHit]:
    return [
        LogHit(
            site=block.site,
            stream=block.stream,
            seq=key[3],
            time_s=key[0],
            level=cols.level(i),
            host=cols.hosts[cols.host_idx[i]],
            text=cols.payload(i).decode("utf-8", "replace"),
        )
        for key, block, cols, i in hits
    ]
