"""LogCapture: instances' stdout/stderr into log streams, with real processes (and podman).

The sink is an in-memory list of batches that can be told to fail. File-level cases
that a real instance cannot produce on demand (podman's rotation, truncation, a
restart between two chunks of a line) run on files written by the test, through a
stub runtime that only names them.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import orjson
import pytest

from meshorch.apps.settings import podman_dirs
from meshorch.runtime import (
    BUSYBOX_IMAGE_REF,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    PodmanRuntime,
    ProcessRuntime,
    Runtime,
    ensure_busybox_image,
)
from meshorch.runtime.base import LogFile, LogFormat
from meshorch.streams import capture as log_capture
from meshorch.streams.capture import LogCapture
from meshorch.streams.model import NewEvent, StreamName
from tests.labutil import require_lab
from tests.runtime.helpers import eventually, wait_exited

LOGS = StreamName("acme", "shop", "logs")


@dataclass
class MemorySink:
    """Collects batches; raises while ``failures`` is positive (counting it down)."""

    batches: list[tuple[StreamName, list[NewEvent]]] = field(default_factory=list)
    failures: int = 0
    calls: int = 0

    async def __call__(self, stream: StreamName, events: list[NewEvent]) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise OSError("stream store unavailable")
        self.batches.append((stream, list(events)))

    def events(self, key: str | None = None) -> list[NewEvent]:
        return [
            e for _, batch in self.batches for e in batch if key is None or e.key == key.encode()
        ]

    def lines(self, key: str | None = None, level: int | None = None) -> list[bytes]:
        return [e.payload for e in self.events(key) if level is None or e.level == level]


def spec(instance_id: str, script: str, **kwargs: object) -> InstanceSpec:
    return InstanceSpec(instance_id, "process", ("sh", "-c", script), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    async with ProcessRuntime(tmp_path / "instances", close_timeout_s=5) as rt:
        yield rt


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_capture, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(log_capture, "BACKOFF_MAX_S", 0.2)
    monkeypatch.setattr(log_capture, "LIST_INTERVAL_S", 0.2)


def capture(runtime: Runtime, state: Path, sink: MemorySink, **kwargs: int) -> LogCapture:
    return LogCapture(runtime, state, sink, poll_interval_s=0.05, **kwargs)


async def until_lines(sink: MemorySink, count: int, key: str | None = None) -> None:
    async def enough() -> bool:
        return len(sink.lines(key)) >= count

    await eventually(enough, 30, f"{count} log lines (have {len(sink.lines(key))})", 0.05)


# -- real processes ------------------------------------------------------------------------


async def test_stdout_and_stderr_lines_with_stream_level_key_and_order(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    sink = MemorySink()
    logs = capture(runtime, tmp_path / "logs", sink, max_batch=7)
    await logs.start()
    try:
        before = time.time()
        await runtime.start(
            spec("web.main", "for i in $(seq 1 40); do echo out$i; echo err$i >&2; done")
        )
        logs.follow("web.main", "acme", "shop")
        logs.follow("web.main", "acme", "shop")  # idempotent: lines still arrive once
        await until_lines(sink, 80)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    assert sink.lines(level=6) == [f"out{i}".encode() for i in range(1, 41)]
    assert sink.lines(level=3) == [f"err{i}".encode() for i in range(1, 41)]
    assert len(sink.lines()) == 80
    assert {stream for stream, _ in sink.batches} == {LOGS}
    assert all(e.key == b"web.main" for e in sink.events())
    assert all(before - 1 <= e.time_s <= time.time() for e in sink.events())
    assert max(len(batch) for _, batch in sink.batches) == 7
    saved = orjson.loads((tmp_path / "logs" / "web.main.json").read_bytes())
    assert {Path(p).name for p in saved["files"]} == {"stdout.log", "stderr.log"}


async def test_capture_restart_neither_loses_nor_repeats(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    script = "for i in $(seq 1 80); do echo line$i; echo warn$i >&2; sleep 0.02; done; echo end"
    first, second = MemorySink(), MemorySink()
    logs = capture(runtime, tmp_path / "logs", first)
    await logs.start()
    await runtime.start(spec("job", script))
    logs.follow("job", "acme", "shop")
    await until_lines(first, 10)
    await logs.stop()
    stopped_with = len(first.lines())
    await asyncio.sleep(0.5)  # the instance writes on while nobody reads

    logs = capture(runtime, tmp_path / "logs", second)
    await logs.start()
    try:
        logs.follow("job", "acme", "shop")
        await wait_exited(runtime, "job", 30)
        await until_lines(second, 161 - stopped_with)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    both = first.lines() + second.lines()
    stdout = [line for line in both if not line.startswith(b"warn")]
    stderr = [line for line in both if line.startswith(b"warn")]
    assert stdout == [f"line{i}".encode() for i in range(1, 81)] + [b"end"]
    assert stderr == [f"warn{i}".encode() for i in range(1, 81)]
    assert second.lines(), "the second capture must have had something to do"


async def test_sink_failure_then_recovery_loses_nothing(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    sink = MemorySink(failures=4)
    logs = capture(runtime, tmp_path / "logs", sink, max_batch=10)
    await logs.start()
    try:
        await runtime.start(spec("flaky", "for i in $(seq 1 35); do echo n$i; done"))
        logs.follow("flaky", "acme", "shop")
        await until_lines(sink, 35)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    assert sink.calls >= 4 + 4  # four refusals, then four batches of at most ten
    assert sink.lines() == [f"n{i}".encode() for i in range(1, 36)]


async def test_long_line_is_cut_and_marked(runtime: ProcessRuntime, tmp_path: Path) -> None:
    sink = MemorySink()
    logs = capture(runtime, tmp_path / "logs", sink, max_line_bytes=100)
    await logs.start()
    try:
        await runtime.start(
            spec("long", "head -c 100000 /dev/zero | tr '\\0' x; echo; echo short; echo y >&2")
        )
        logs.follow("long", "acme", "shop")
        await until_lines(sink, 3)
    finally:
        await logs.stop()
    assert sink.lines(level=6) == [b"x" * 100 + " …[truncated 99900 bytes]".encode(), b"short"]
    assert sink.lines(level=3) == [b"y"]


async def test_batches_stay_under_the_byte_limit(runtime: ProcessRuntime, tmp_path: Path) -> None:
    sink = MemorySink()
    logs = capture(runtime, tmp_path / "logs", sink)
    await logs.start()
    try:
        line = "y" * 10_000
        await runtime.start(spec("big", f"for i in $(seq 1 150); do echo {line}$i; done"))
        logs.follow("big", "acme", "shop")
        await until_lines(sink, 150)
    finally:
        await logs.stop()
    assert sink.lines() == [f"{line}{i}".encode() for i in range(1, 151)]
    sizes = [sum(len(e.payload) for e in batch) for _, batch in sink.batches]
    assert len(sizes) >= 3 and max(sizes) <= log_capture.MAX_BATCH_BYTES


async def test_partial_line_waits_for_its_end_or_is_flushed(
    runtime: ProcessRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_capture, "PARTIAL_FLUSH_S", 1.5)
    sink = MemorySink()
    logs = capture(runtime, tmp_path / "logs", sink)
    await logs.start()
    try:
        await runtime.start(
            spec("slow", "printf hel; sleep 0.8; printf 'lo\\nwor'; sleep 0.5; echo ld; "
                 "printf unterminated; sleep 60")
        )  # fmt: skip
        logs.follow("slow", "acme", "shop")
        await until_lines(sink, 2)
        assert sink.lines() == [b"hello", b"world"]
        started = time.monotonic()
        await until_lines(sink, 3)
        assert time.monotonic() - started > 0.3  # flushed after waiting, not at once
        assert sink.lines() == [b"hello", b"world", b"unterminated"]
    finally:
        await logs.stop()


async def test_instance_restart_continues_without_repeats(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    sink = MemorySink()
    logs = capture(runtime, tmp_path / "logs", sink)
    await logs.start()
    try:
        await runtime.start(spec("svc", "echo first-a; echo first-b >&2; printf first-c"))
        logs.follow("svc", "acme", "shop")
        await until_lines(sink, 2)
        await wait_exited(runtime, "svc", 30)
        # Replaced at once: the old files are deleted, the unterminated line with them.
        await runtime.start(spec("svc", "echo second-a; echo second-b >&2; sleep 60"))
        logs.follow("svc", "acme", "shop")
        await until_lines(sink, 5)
        await asyncio.sleep(0.5)
    finally:
        await logs.stop()
    assert sink.lines(level=6) == [b"first-a", b"first-c", b"second-a"]
    assert sink.lines(level=3) == [b"first-b", b"second-b"]


async def test_removed_instance_is_drained_then_forgotten(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    sink = MemorySink()
    state = tmp_path / "logs"
    logs = capture(runtime, state, sink)
    await logs.start()
    try:
        await runtime.start(spec("gone", "echo hello; sleep 0.5; echo goodbye; printf last"))
        logs.follow("gone", "acme", "shop")
        await until_lines(sink, 1)
        await wait_exited(runtime, "gone", 30)
        await runtime.remove("gone")  # its files are deleted: what was open is drained
        logs.forget("gone")
        await until_lines(sink, 3)

        async def forgotten() -> bool:
            return not (state / "gone.json").exists()

        await eventually(forgotten, 10, "the positions to be deleted", 0.05)
        assert sink.lines() == [b"hello", b"goodbye", b"last"]

        # Not told: an instance the runtime no longer lists, files gone, is forgotten too.
        await runtime.start(spec("quiet", "echo hi"))
        logs.follow("quiet", "acme", "shop")
        await until_lines(sink, 4)
        await wait_exited(runtime, "quiet", 30)
        assert (state / "quiet.json").exists()
        await runtime.remove("quiet")

        async def quiet_forgotten() -> bool:
            return not (state / "quiet.json").exists()

        await eventually(quiet_forgotten, 10, "quiet to be forgotten", 0.05)
    finally:
        await logs.stop()


def test_refuses_a_runtime_without_log_files(tmp_path: Path) -> None:
    class Blind:
        name = "blind"

    with pytest.raises(TypeError, match="log_files"):
        LogCapture(cast(Runtime, Blind()), tmp_path, MemorySink())
    with pytest.raises(ValueError, match="max_line_bytes"):
        LogCapture(FileRuntime(tmp_path, {}).as_runtime(), tmp_path, MemorySink(), max_line_bytes=0)


# -- files written by the test (k8s-file format, rotation, truncation) ----------------------


@dataclass
class FileRuntime:
    """Only what LogCapture uses: ``list`` and ``log_files`` over given files."""

    base: Path
    files: dict[str, builtins.list[LogFile]]
    name: str = "files"

    async def list(self) -> builtins.list[InstanceStatus]:
        return [InstanceStatus(i, InstanceState.RUNNING) for i in self.files]

    def log_files(self, instance_id: str) -> builtins.list[LogFile]:
        return self.files.get(instance_id, [])

    def as_runtime(self) -> Runtime:
        return cast(Runtime, self)


def k8s(stream: str, tag: str, text: str, second: int = 0) -> bytes:
    return f"2026-11-28T10:00:{second:02d}.123456789+00:00 {stream} {tag} {text}\n".encode()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.fixture
def k8s_file(tmp_path: Path) -> Iterator[tuple[FileRuntime, Path]]:
    path = tmp_path / "ctr.log"
    yield FileRuntime(tmp_path, {"c1": [LogFile(path, LogFormat.K8S_FILE)]}), path


async def test_k8s_file_partials_rotation_and_truncation(
    k8s_file: tuple[FileRuntime, Path], tmp_path: Path
) -> None:
    files, path = k8s_file
    sink = MemorySink()
    logs = capture(files.as_runtime(), tmp_path / "logs", sink)
    await logs.start()
    try:
        logs.follow("c1", "acme", "shop")
        append(path, k8s("stdout", "P", "hel", 1) + k8s("stderr", "F", "oops", 2))
        append(path, k8s("stdout", "F", "lo", 3)[:20])  # a record half written
        await until_lines(sink, 1)
        append(path, k8s("stdout", "F", "lo", 3)[20:])
        await until_lines(sink, 2)
        # podman rotates by putting a new file in place; the old one has a last line.
        append(path, k8s("stdout", "F", "old-last", 4))
        rotated = tmp_path / "ctr.log.new"
        rotated.write_bytes(k8s("stdout", "F", "new-first", 5))
        os.replace(rotated, path)
        await until_lines(sink, 4)
        # Truncated in place: read again from the start.
        path.write_bytes(k8s("stderr", "F", "after-truncate", 6))
        await until_lines(sink, 5)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    assert sink.lines() == [b"oops", b"hello", b"old-last", b"new-first", b"after-truncate"]
    assert [e.level for e in sink.events()] == [3, 6, 6, 6, 3]
    hello = sink.events()[1]
    assert hello.time_s == pytest.approx(1795860001.123456)  # the first chunk's stamp


async def test_k8s_restart_with_a_line_unfinished_keeps_its_start(
    k8s_file: tuple[FileRuntime, Path], tmp_path: Path
) -> None:
    files, path = k8s_file
    first, second = MemorySink(), MemorySink()
    logs = capture(files.as_runtime(), tmp_path / "logs", first)
    await logs.start()
    logs.follow("c1", "acme", "shop")
    # stdout's line is unfinished while stderr lines complete after it.
    append(path, k8s("stdout", "P", "begin-") + k8s("stderr", "F", "e1") + k8s("stderr", "F", "e2"))
    await until_lines(first, 2)
    await logs.stop()
    append(path, k8s("stdout", "F", "end") + k8s("stderr", "F", "e3"))

    logs = capture(files.as_runtime(), tmp_path / "logs", second)
    await logs.start()
    try:
        logs.follow("c1", "acme", "shop")
        await until_lines(second, 2)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    assert first.lines() == [b"e1", b"e2"]
    assert second.lines() == [b"begin-end", b"e3"]


async def test_replaced_file_while_stopped_is_read_from_its_start(
    k8s_file: tuple[FileRuntime, Path], tmp_path: Path
) -> None:
    files, path = k8s_file
    first, second = MemorySink(), MemorySink()
    logs = capture(files.as_runtime(), tmp_path / "logs", first)
    await logs.start()
    logs.follow("c1", "acme", "shop")
    append(path, k8s("stdout", "F", "one") + k8s("stdout", "F", "two"))
    await until_lines(first, 2)
    await logs.stop()
    # Same size or larger, but another file: not to be read from the old offset.
    rotated = tmp_path / "ctr.log.new"
    rotated.write_bytes(k8s("stdout", "F", "three", 1) + k8s("stdout", "F", "four", 1))
    os.replace(rotated, path)

    logs = capture(files.as_runtime(), tmp_path / "logs", second)
    await logs.start()
    try:
        logs.follow("c1", "acme", "shop")
        await until_lines(second, 2)
        await asyncio.sleep(0.3)
    finally:
        await logs.stop()
    assert second.lines() == [b"three", b"four"]


# -- podman ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_lab("podman", "runc")
    base = tmp_path_factory.mktemp("podman-logs")
    runtime = PodmanRuntime(*podman_dirs(base))
    try:
        asyncio.run(ensure_busybox_image(runtime, base))
        yield base
    finally:
        asyncio.run(runtime.purge())


@pytest.mark.lab
@pytest.mark.timeout(600)
async def test_podman_container_logs(podman_base: Path, tmp_path: Path) -> None:
    rt = PodmanRuntime(*podman_dirs(podman_base))
    script = (
        "echo out1; echo err1 >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; "
        "printf 'par'; sleep 1; echo tial; echo $V; sleep 600"
    )
    first = InstanceSpec("pod.main", BUSYBOX_IMAGE_REF, ("sh", "-c", script), env={"V": "v1"})
    sink, again = MemorySink(), MemorySink()
    logs = capture(rt, tmp_path / "logs", sink)
    await logs.start()
    before = time.time()
    try:
        await rt.start(first)
        logs.follow("pod.main", "acme", "shop")
        await until_lines(sink, 5)
        await logs.stop()
        # A changed spec replaces the container; podman appends to the same file.
        logs = capture(rt, tmp_path / "logs", again)
        await logs.start()
        logs.follow("pod.main", "acme", "shop")
        await rt.start(InstanceSpec(first.instance_id, first.image, first.command, env={"V": "v2"}))
        await until_lines(again, 5)
        await asyncio.sleep(0.5)
    finally:
        await logs.stop()
        await rt.remove("pod.main")
    long = b"x" * (16 * 1024) + f" …[truncated {20000 - 16 * 1024} bytes]".encode()
    assert sink.lines(level=6) == [b"out1", long, b"partial", b"v1"]
    assert sink.lines(level=3) == [b"err1"]
    assert again.lines(level=6) == [b"out1", long, b"partial", b"v2"]
    assert again.lines(level=3) == [b"err1"]
    assert all(before - 5 <= e.time_s <= time.time() + 5 for e in sink.events())
    assert not rt.log_files("pod.main")[0].path.exists()  # removed with the container
