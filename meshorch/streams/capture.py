"""Capture of instances' stdout and stderr into log streams.

:class:`LogCapture` follows the output files of the instances this host's runtime
runs (:meth:`~meshorch.runtime.base.LogFileSource.log_files`: two plain files per
process instance, one podman ``k8s-file`` per container) by polling them at an
offset, and hands batches of lines to an injected async sink. Every line of
instance ``i`` of app ``a`` of tenant ``t`` becomes an event of stream ``t/a/logs``:
the line without its newline as payload, ``key`` the instance id, ``level`` 6 for
stdout and 3 for stderr, ``time_s`` the time podman stamped on it (the time it was
read for a process instance).

Delivery:

- Read positions are kept per instance in ``state_dir/{instance_id}.json``, written
  *after* the sink accepted a batch, so an agent restart neither loses nor repeats
  lines. If the agent dies between the sink's acceptance and that write, the batch is
  sent again after the restart: at-least-once in that case only. The same holds when
  :meth:`LogCapture.stop` has to cancel a sink call that overran its time.
- A failing sink keeps the batch and is retried with exponential backoff (0.5 s up to
  30 s); lines stay in their files meanwhile, at most one batch per instance in memory.
- A line longer than ``max_line_bytes`` is cut there and ends with
  ``" …[truncated N bytes]"``; memory per line stays bounded.
- A last line without a newline waits for it, and is sent as it is after
  ``PARTIAL_FLUSH_S``; what follows then is another line.
- A file replaced at its path (podman's rotation, a replaced process instance) is
  read to its end through the still open descriptor, then the new one from its start;
  a file truncated in place (smaller than the read position, or its first bytes
  changed) is read again from its start. Across an agent restart a file is
  recognised by device, inode and its first 256 bytes; a different file is read from
  its start. Not detected: a file rewritten in place with the same first bytes and
  grown beyond the read position between two polls. Lost: what was in a file
  replaced twice while unread (podman's rotation at 10 MB keeps no old file).
- An instance is drained, then forgotten with its positions, after :meth:`forget`,
  or when the runtime no longer lists it and its log files are gone.
- A batch holds at most ``max_batch`` lines and about ``MAX_BATCH_BYTES``.

Its size: one tailer per instance with rotation, truncation and restart handling, all
sharing the positions file; the rules are small, the cases many.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from meshorch.runtime.base import LogFile, LogFileSource, LogFormat, LogStream, Runtime
from meshorch.streams.model import (
    HEADER_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    NewEvent,
    StreamName,
)

logger = logging.getLogger(__name__)

LogSink = Callable[[StreamName, list[NewEvent]], Awaitable[None]]
"""Stores a batch of one stream; raises on failure (the batch is retried later)."""

LOGS_STREAM = "logs"
LEVELS: dict[LogStream, int] = {"stdout": 6, "stderr": 3}  # syslog info / error
MAX_BATCH_BYTES = 512 * 1024
PARTIAL_FLUSH_S = 3.0
STOP_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
LIST_INTERVAL_S = 5.0
READ_CHUNK = 64 * 1024
READ_BUDGET = 4 * 1024 * 1024  # per instance and pass: others get their turn
BATCHES_PER_PASS = 4
HEAD_BYTES = 256  # a file's first bytes recognise it across restarts
MAX_RECORD_BYTES = 1024 * 1024  # a k8s-file record without newline beyond this is cut
STATE_VERSION = 1
_SUFFIX_RESERVE = 64  # room for the truncation marker within an event
_KEY_RESERVE = 128  # longest instance id

_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_STREAMS: tuple[LogStream, ...] = ("stdout", "stderr")


# -- lines ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _FileRef:
    """One file (not path) being read: its identity and first bytes."""

    dev: int
    ino: int
    head: bytes = b""


@dataclass(slots=True)
class _Line:
    """A complete line and where its file's reading stands once it is delivered."""

    stream: LogStream
    payload: bytes
    time_s: float
    file: _FileRef
    end: int  # offset after the record that completed the line
    pending: tuple[tuple[LogStream, int], ...]  # other streams' unfinished lines (starts)


class _Assembler:
    """One stream's unfinished line: the first ``max_bytes`` kept, the rest counted."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.dropped = 0
        self.start = -1  # file offset of the line's first byte; -1: no line
        self.time_s = 0.0
        self.since = 0.0  # monotonic time its first byte was seen

    @property
    def active(self) -> bool:
        return self.start >= 0

    def add(self, data: bytes, start: int, time_s: float, now: float) -> None:
        if self.start < 0:
            self.start, self.time_s, self.since = start, time_s, now
        room = self.max_bytes - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))

    def take(self) -> tuple[bytes, float]:
        payload = bytes(self.buf)
        if self.dropped:
            payload += f" …[truncated {self.dropped} bytes]".encode()
        time_s = self.time_s
        self.buf.clear()
        self.dropped = 0
        self.start = -1
        return payload, time_s


class _RawParser:
    """A file holding one stream's bytes as written; lines end with ``\\n``."""

    def __init__(self, stream: LogStream, file: _FileRef, max_bytes: int) -> None:
        self.stream = stream
        self.file = file
        self.line = _Assembler(max_bytes)

    def feed(self, data: bytes, pos: int, wall: float, now: float) -> list[_Line]:
        lines: list[_Line] = []
        i = 0
        while True:
            j = data.find(b"\n", i)
            if j < 0:
                if i < len(data):
                    self.line.add(data[i:], pos + i, wall, now)
                return lines
            self.line.add(data[i:j], pos + i, wall, now)
            payload, time_s = self.line.take()
            lines.append(_Line(self.stream, payload, time_s, self.file, pos + j + 1, ()))
            i = j + 1

    def flush(self, pos: int, now: float, force: bool) -> list[_Line]:
        line = self.line
        if not line.active or not (force or now - line.since >= PARTIAL_FLUSH_S):
            return []
        payload, time_s = line.take()
        return [_Line(self.stream, payload, time_s, self.file, pos, ())]


def _k8s_time(raw: bytes) -> float | None:
    try:
        # fromisoformat keeps microseconds of podman's nanoseconds.
        return datetime.fromisoformat(raw.decode("ascii")).timestamp()
    except ValueError:
        return None


class _K8sParser:
    """Podman's k8s-file: ``<time> stdout|stderr F|P <text>`` records, ``P`` continued.

    After a restart, reading resumes before the delivered position when a line was
    unfinished then: a record ending at or before ``skip_end`` is skipped unless it
    belongs to such a line (its stream's start in ``keep_from``, at or after it).
    """

    def __init__(
        self,
        file: _FileRef,
        pos: int,
        max_bytes: int,
        skip_end: int = 0,
        keep_from: dict[LogStream, int] | None = None,
    ) -> None:
        self.file = file
        self.lines = {s: _Assembler(max_bytes) for s in _STREAMS}
        self.record = bytearray()
        self.record_start = pos  # everything before it is parsed
        self.skip_end = skip_end
        self.keep_from = keep_from or {}
        self.malformed = 0

    def feed(self, data: bytes, pos: int, wall: float, now: float) -> list[_Line]:
        lines: list[_Line] = []
        i = 0
        while True:
            j = data.find(b"\n", i)
            if j < 0:
                self.record += data[i:]
                if len(self.record) > MAX_RECORD_BYTES:  # not conmon's: keep memory bounded
                    self._record(bytes(self.record), pos + len(data), wall, now, lines)
                return lines
            self.record += data[i:j]
            self._record(bytes(self.record), pos + j + 1, wall, now, lines)
            i = j + 1

    def _record(self, record: bytes, end: int, wall: float, now: float, out: list[_Line]) -> None:
        start = self.record_start
        self.record.clear()
        self.record_start = end
        parts = record.split(b" ", 3)
        stream: LogStream
        if len(parts) >= 3 and parts[1] in (b"stdout", b"stderr") and parts[2] in (b"F", b"P"):
            stream = "stdout" if parts[1] == b"stdout" else "stderr"
            final = parts[2] == b"F"
            text = parts[3] if len(parts) == 4 else b""
            time_s = _k8s_time(parts[0]) or wall
        else:
            if self.malformed == 0:
                logger.warning("log file record not in k8s-file format: %r", record[:80])
            self.malformed += 1
            stream, final, text, time_s = "stdout", True, record, wall
        if end <= self.skip_end:
            keep = self.keep_from.get(stream)
            if keep is None or start < keep:
                return  # delivered before the restart
        line = self.lines[stream]
        line.add(text, start, time_s, now)
        if final:
            out.append(self._complete(stream, end))

    def _complete(self, stream: LogStream, end: int) -> _Line:
        payload, time_s = self.lines[stream].take()
        pending = tuple((s, a.start) for s, a in self.lines.items() if a.active)
        return _Line(stream, payload, time_s, self.file, end, pending)

    def flush(self, pos: int, now: float, force: bool) -> list[_Line]:
        out: list[_Line] = []
        if force and self.record:  # a record cut short: parse what there is
            self._record(bytes(self.record), pos, time.time(), now, out)
        end = self.record_start  # records before it are fully parsed
        for stream, line in self.lines.items():
            if line.active and (force or now - line.since >= PARTIAL_FLUSH_S):
                out.append(self._complete(stream, end))
        return out


_Parser = _RawParser | _K8sParser


# -- one file ------------------------------------------------------------------------------


def _head_digest(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


class _Source:
    """One log file path of an instance, read through a descriptor kept open."""

    def __init__(self, spec: LogFile, saved: dict[str, Any] | None, max_line_bytes: int) -> None:
        self.spec = spec
        self.saved = saved  # position from the previous run, for the first file seen
        self.max_line_bytes = max_line_bytes
        self.fd: int | None = None
        self.file: _FileRef | None = None
        self.parser: _Parser | None = None
        self.pos = 0
        self.lines: deque[_Line] = deque()
        self.committed: dict[str, Any] | None = saved
        self.exhausted = False  # at the end of its last file, nothing unfinished

    def _parser(
        self, file: _FileRef, pos: int, skip_end: int = 0, keep: dict[LogStream, int] | None = None
    ) -> _Parser:
        if self.spec.format is LogFormat.K8S_FILE:
            return _K8sParser(file, pos, self.max_line_bytes, skip_end, keep)
        return _RawParser(self.spec.stream or "stdout", file, self.max_line_bytes)

    def _open(self) -> bool:
        try:
            fd = os.open(self.spec.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        file = _FileRef(st.st_dev, st.st_ino, os.pread(fd, HEAD_BYTES, 0))
        saved, self.saved = self.saved, None
        self.fd, self.file, self.pos = fd, file, 0
        if saved is not None and self._same_file(saved, fd, file):
            keep: dict[LogStream, int] = {
                s: int(v) for s, v in saved.get("pending", {}).items() if s in _STREAMS
            }
            end = int(saved["end"])
            self.pos = min([end, *keep.values()])
            self.parser = self._parser(file, self.pos, end, keep)
        else:
            if saved is not None:
                logger.info("%s: a new file since the last run; reading it all", self.spec.path)
            self.parser = self._parser(file, 0)
        return True

    @staticmethod
    def _same_file(saved: dict[str, Any], fd: int, file: _FileRef) -> bool:
        try:
            head_len = int(saved["head_len"])
            resume = min([int(saved["end"]), *(int(v) for v in saved.get("pending", {}).values())])
            return (
                (int(saved["dev"]), int(saved["ino"])) == (file.dev, file.ino)
                and os.fstat(fd).st_size >= resume
                and len(file.head) >= head_len
                and _head_digest(file.head[:head_len]) == saved["head"]
            )
        except (KeyError, TypeError, ValueError):
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, max_lines: int, final: bool) -> None:
        """Parse what was appended (up to a budget); ``final``: drain, flush, stay put."""
        now, wall = time.monotonic(), time.time()
        budget = READ_BUDGET
        self.exhausted = False
        if self.fd is not None and not final and self._rewritten():
            logger.warning("%s was truncated: reading it again from its start", self.spec.path)
            self._reopen(now)
        while len(self.lines) < max_lines and budget > 0:
            if self.fd is None and not self._open():
                self.exhausted = True
                return
            assert self.fd is not None and self.file is not None and self.parser is not None
            data = os.pread(self.fd, READ_CHUNK, self.pos)
            if data:
                if len(self.file.head) < HEAD_BYTES:
                    self.file.head = os.pread(self.fd, HEAD_BYTES, 0)
                self.lines.extend(self.parser.feed(data, self.pos, wall, now))
                self.pos += len(data)
                budget -= len(data)
                continue
            if final:
                self.lines.extend(self.parser.flush(self.pos, now, force=True))
                self.exhausted = True
                return
            if not self._switch_if_replaced(now):
                self.lines.extend(self.parser.flush(self.pos, now, force=False))
                return

    def _switch_if_replaced(self, now: float) -> bool:
        """At the end of the open file: move to a replaced or truncated file; True if so."""
        assert self.fd is not None and self.file is not None and self.parser is not None
        try:
            st = os.stat(self.spec.path)
        except FileNotFoundError:
            return False  # removed, or being replaced: keep what we have open
        if (st.st_dev, st.st_ino) != (self.file.dev, self.file.ino):
            logger.debug("%s was replaced: reading the new file", self.spec.path)
            return self._reopen(now)
        if os.fstat(self.fd).st_size < self.pos:
            logger.warning("%s was truncated: reading it again from its start", self.spec.path)
            return self._reopen(now)
        return False

    def _rewritten(self) -> bool:
        """Truncated and written again since the last pass: its first bytes changed."""
        assert self.fd is not None and self.file is not None
        head = self.file.head
        return bool(head) and os.pread(self.fd, len(head), 0) != head

    def _reopen(self, now: float) -> bool:
        assert self.parser is not None
        self.lines.extend(self.parser.flush(self.pos, now, force=True))
        self.close()
        return self._open()

    def commit(self, line: _Line) -> None:
        """Record the position after ``line`` (delivered) for the state file."""
        self.committed = {
            "dev": line.file.dev,
            "ino": line.file.ino,
            "head_len": len(line.file.head),
            "head": _head_digest(line.file.head),
            "end": line.end,
            "pending": dict(line.pending),
        }


# -- one instance --------------------------------------------------------------------------


@dataclass
class _Batch:
    events: list[NewEvent]
    last: dict[int, _Line]  # source index -> its last line in the batch


@dataclass
class _Follower:
    instance_id: str
    stream: StreamName
    sources: list[_Source] = field(default_factory=list)
    loaded: bool = False
    forgetting: bool = False
    absent: int = 0  # consecutive runtime listings without it
    batch: _Batch | None = None
    backoff_s: float = 0.0
    retry_at: float = 0.0

    def next_batch(self, max_lines: int) -> _Batch | None:
        key = self.instance_id.encode()
        events: list[NewEvent] = []
        last: dict[int, _Line] = {}
        size = 0
        while len(events) < max_lines:
            ready = [i for i, s in enumerate(self.sources) if s.lines]
            if not ready:
                break
            # Two raw files (process runtime): interleave by the time lines were read.
            index = min(ready, key=lambda i: self.sources[i].lines[0].time_s)
            line = self.sources[index].lines[0]
            cost = HEADER_BYTES + len(key) + len(line.payload)
            if events and size + cost > MAX_BATCH_BYTES:
                break
            self.sources[index].lines.popleft()
            events.append(NewEvent(line.payload, line.time_s, key, LEVELS[line.stream]))
            last[index] = line
            size += cost
        return _Batch(events, last) if events else None

    @property
    def drained(self) -> bool:
        return self.batch is None and all(s.exhausted and not s.lines for s in self.sources)

    def close(self) -> None:
        for source in self.sources:
            source.close()


# -- the service ---------------------------------------------------------------------------


class LogCapture:
    """Follows the output of the runtime's instances into ``tenant/app/logs`` streams.

    See the module docstring for what is guaranteed. ``follow`` and ``forget`` only
    record the wish; a background task started by :meth:`start` does the work.
    """

    def __init__(
        self,
        runtime: Runtime,
        state_dir: Path,
        sink: LogSink,
        *,
        poll_interval_s: float = 0.5,
        max_batch: int = 1000,
        max_line_bytes: int = 16 * 1024,
    ) -> None:
        if not isinstance(runtime, LogFileSource):
            raise TypeError(f"runtime {runtime.name!r} does not expose log files (log_files)")
        if not 1 <= max_batch <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch must be 1-{MAX_BATCH_EVENTS}, got {max_batch}")
        longest = MAX_EVENT_BYTES - HEADER_BYTES - _KEY_RESERVE - _SUFFIX_RESERVE
        if not 1 <= max_line_bytes <= longest:
            raise ValueError(f"max_line_bytes must be 1-{longest}, got {max_line_bytes}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.runtime = runtime
        self._files: LogFileSource = runtime
        self.state_dir = Path(state_dir)
        self.sink = sink
        self.poll_interval_s = poll_interval_s
        self.max_batch = max_batch
        self.max_line_bytes = max_line_bytes
        self._followers: dict[str, _Follower] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._next_list = 0.0
        self._swept = False

    # -- public -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True)
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="log-capture")

    async def stop(self) -> None:
        """Deliver what can be read now (one try each), persist positions, close files."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            self._wake.set()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(task)
            except TimeoutError:
                logger.warning("log capture did not finish within %g s", STOP_TIMEOUT_S)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                # A read may still run in its thread: leave its descriptors to it.
                self._followers.clear()
        for follower in self._followers.values():
            follower.close()
        self._followers.clear()

    def follow(self, instance_id: str, tenant: str, app: str) -> None:
        """Capture the instance's output into ``tenant/app/logs``; idempotent."""
        if not _INSTANCE_ID_RE.fullmatch(instance_id):
            raise ValueError(f"bad instance id {instance_id!r}")
        stream = StreamName(tenant, app, LOGS_STREAM)
        follower = self._followers.get(instance_id)
        if follower is None:
            self._followers[instance_id] = _Follower(instance_id, stream)
            self._wake.set()
            return
        follower.stream = stream
        follower.forgetting = False
        follower.absent = 0

    def forget(self, instance_id: str) -> None:
        """Read the instance's files to their end, deliver, then drop it and its positions."""
        follower = self._followers.get(instance_id)
        if follower is not None:
            follower.forgetting = True
            self._wake.set()
        elif _INSTANCE_ID_RE.fullmatch(instance_id):
            self._state_path(instance_id).unlink(missing_ok=True)

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping.is_set():
            if time.monotonic() >= self._next_list:
                self._next_list = time.monotonic() + LIST_INTERVAL_S
                await self._check_listing()
            busy = await self._pass(final=False)
            if busy:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
        await self._pass(final=True)

    async def _pass(self, *, final: bool) -> bool:
        """Read and deliver for every instance; True when some had more than it sent."""
        busy = False
        for follower in list(self._followers.values()):
            if not final and follower.batch is not None and time.monotonic() < follower.retry_at:
                continue
            try:
                busy = await self._serve(follower, final) or busy
            except Exception:  # one instance's trouble must not stop the others' logs
                logger.exception("log capture of %s failed", follower.instance_id)
        return busy

    async def _serve(self, follower: _Follower, final: bool) -> bool:
        drain = follower.forgetting and not final
        await asyncio.to_thread(self._read, follower, drain)
        for _ in range(BATCHES_PER_PASS):
            batch = follower.batch or follower.next_batch(self.max_batch)
            if batch is None or not await self._deliver(follower, batch):
                break
        else:
            return True
        if follower.forgetting and follower.drained and not final:
            await self._drop(follower)
        return False

    def _read(self, follower: _Follower, drain: bool) -> None:
        if not follower.loaded:
            saved = self._load(follower.instance_id)
            follower.sources = [
                _Source(spec, saved.get(str(spec.path)), self.max_line_bytes)
                for spec in self._files.log_files(follower.instance_id)
            ]
            follower.loaded = True
        if follower.batch is not None:
            return  # one batch in memory at most
        for source in follower.sources:
            source.read(self.max_batch, drain)

    async def _deliver(self, follower: _Follower, batch: _Batch) -> bool:
        try:
            await self.sink(follower.stream, batch.events)
        except Exception as exc:  # any sink failure: keep the lines and try again later
            follower.batch = batch
            first = follower.backoff_s == 0
            follower.backoff_s = min(max(follower.backoff_s * 2, BACKOFF_INITIAL_S), BACKOFF_MAX_S)
            follower.retry_at = time.monotonic() + follower.backoff_s
            # Once per outage at warning level: a sink down for all instances is one story.
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "logs of %s not stored (%s); retrying in %.1f s",
                follower.instance_id,
                exc,
                follower.backoff_s,
            )
            return False
        if follower.backoff_s:
            logger.info("logs of %s stored again", follower.instance_id)
        follower.batch = None
        follower.backoff_s = 0.0
        for index, line in batch.last.items():
            follower.sources[index].commit(line)
        await asyncio.to_thread(self._save, follower)
        return True

    async def _drop(self, follower: _Follower) -> None:
        self._followers.pop(follower.instance_id, None)
        follower.close()
        await asyncio.to_thread(self._state_path(follower.instance_id).unlink, missing_ok=True)
        logger.debug("logs of %s: drained and forgotten", follower.instance_id)

    async def _check_listing(self) -> None:
        """Forget instances gone from the runtime with their files; sweep stale positions."""
        try:
            listed = {s.instance_id for s in await self.runtime.list()}
        except Exception as exc:  # a runtime hiccup only delays the clean-up
            logger.warning("log capture: cannot list instances: %s", exc)
            return
        for follower in self._followers.values():
            if follower.instance_id in listed:
                follower.absent = 0
                continue
            follower.absent += 1
            if follower.absent >= 2 and not await asyncio.to_thread(
                self._files_exist, follower.instance_id
            ):
                follower.forgetting = True
        if not self._swept:
            self._swept = True
            try:
                await asyncio.to_thread(self._sweep, listed)
            except OSError as exc:
                logger.warning("log capture: cannot sweep old positions: %s", exc)

    # -- files ------------------------------------------------------------------------

    def _files_exist(self, instance_id: str) -> bool:
        return any(spec.path.exists() for spec in self._files.log_files(instance_id))

    def _sweep(self, listed: set[str]) -> None:
        for path in self.state_dir.glob("*.json"):
            instance_id = path.name.removesuffix(".json")
            if instance_id in listed or instance_id in self._followers:
                continue
            if _INSTANCE_ID_RE.fullmatch(instance_id) and not self._files_exist(instance_id):
                path.unlink(missing_ok=True)

    def _state_path(self, instance_id: str) -> Path:
        return self.state_dir / f"{instance_id}.json"

    def _load(self, instance_id: str) -> dict[str, Any]:
        try:
            data = orjson.loads(self._state_path(instance_id).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            logger.warning("log positions of %s unreadable (%s): starting over", instance_id, exc)
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}

    def _save(self, follower: _Follower) -> None:
        files = {str(s.spec.path): s.committed for s in follower.sources if s.committed is not None}
        path = self._state_path(follower.instance_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(orjson.dumps({"v": STATE_VERSION, "files": files}))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError as exc:  # lines were delivered: at worst they repeat after a restart
            logger.error("cannot save log positions of %s: %s", follower.instance_id, exc)
