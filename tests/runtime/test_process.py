"""ProcessRuntime, for real: subprocesses, signals, rlimits, logs."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from meshorch.runtime import (
    ExecTimeout,
    InstanceError,
    InstanceNotFound,
    InstanceSpec,
    InstanceState,
    InvalidSpec,
    PortMapping,
    ProcessRuntime,
    Runtime,
    SpecFile,
)
from meshorch.runtime._proc import boot_id, read_proc_stat
from tests.runtime.helpers import eventually, status_of, wait_exited

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

# sh with a TERM trap; sleeps briefly so the trap runs soon after the signal.
# Tests that expect the trap to run wait for "ready": a TERM before it kills sh.
TRAP = "trap 'echo bye; exit 0' TERM; "
LOOP = TRAP + "echo ready; while true; do sleep 0.1; done"


def spec(instance_id: str, script: str, **kwargs: object) -> InstanceSpec:
    return InstanceSpec(instance_id, "process", ("sh", "-c", script), **kwargs)  # type: ignore[arg-type]


def dead(pid: int) -> bool:
    stat = read_proc_stat(pid)
    return stat is None or stat.state == "Z"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    async with ProcessRuntime(tmp_path / "state", close_timeout_s=5) as rt:
        yield rt


async def test_is_a_runtime(runtime: ProcessRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.name == "process"
    assert await runtime.has_image("anything:1")


async def test_start_list_logs_stop(runtime: ProcessRuntime) -> None:
    before = time.time()
    await runtime.start(spec("web", TRAP + "echo hello; echo oops >&2; " + LOOP))
    [status] = await runtime.list()
    assert status.instance_id == "web"
    assert status.state is InstanceState.RUNNING
    assert status.pid is not None and status.pid > 0
    assert status.started_at is not None and status.started_at >= before - 1
    assert status.exit_code is None
    assert status.image == "process"

    async def logged() -> bool:
        text = await runtime.logs("web", 10)
        return "hello" in text and "oops" in text

    await eventually(logged, 10, "output in the log")

    await runtime.stop("web", timeout_s=10)
    [status] = await runtime.list()
    assert status.state is InstanceState.EXITED
    assert status.exit_code == 0  # the trap ran and exited cleanly
    assert status.pid is None
    assert status.finished_at is not None
    assert "bye" in await runtime.logs("web", 10)


async def test_start_is_idempotent_and_replaces_on_change(runtime: ProcessRuntime) -> None:
    first = spec("app", LOOP, env={"A": "1"})
    await runtime.start(first)
    [s1] = await runtime.list()
    await runtime.start(InstanceSpec("app", "process", first.command, env={"A": "1"}))
    [s2] = await runtime.list()
    assert s2.pid == s1.pid
    assert s2.spec_hash == first.spec_hash

    changed = spec("app", LOOP, env={"A": "2"})
    await runtime.start(changed)
    [s3] = await runtime.list()
    assert s3.pid != s1.pid
    assert s3.spec_hash == changed.spec_hash
    assert s1.pid is not None and dead(s1.pid)

    # An exited instance is restarted by start, even with the same spec.
    await runtime.stop("app")
    await runtime.start(changed)
    [s4] = await runtime.list()
    assert s4.running and s4.pid != s3.pid


async def test_stop_and_remove_are_idempotent(runtime: ProcessRuntime, tmp_path: Path) -> None:
    await runtime.stop("never-started")
    await runtime.remove("never-started")
    await runtime.start(spec("x", LOOP))
    await runtime.stop("x")
    await runtime.stop("x")
    assert (tmp_path / "state" / "meshorch-x").is_dir()
    await runtime.remove("x")
    await runtime.remove("x")
    assert await runtime.list() == []
    assert not (tmp_path / "state" / "meshorch-x").exists()
    with pytest.raises(InstanceNotFound):
        await runtime.logs("x", 10)


async def test_stop_kills_after_timeout(runtime: ProcessRuntime) -> None:
    # Ignored signals stay ignored across exec, so the sleeps ignore TERM too.
    await runtime.start(
        spec("stubborn", "trap '' TERM; echo ready; while true; do sleep 0.1; done")
    )

    async def trapped() -> bool:  # a TERM before the trap would just kill it
        return "ready" in await runtime.logs("stubborn", 5)

    await eventually(trapped, 10, "the TERM trap")
    started = time.monotonic()
    await runtime.stop("stubborn", timeout_s=0.5)
    assert time.monotonic() - started < 20
    status = await status_of(runtime, "stubborn")
    assert status is not None and status.exit_code == 137  # 128 + SIGKILL


async def test_exit_code_and_session_cleanup(runtime: ProcessRuntime, tmp_path: Path) -> None:
    # The main process exits, leaving a background child: like a container's
    # PID 1 exiting, the rest of the session goes too.
    await runtime.start(spec("crash", "sleep 300 & echo $! > bg.pid; exit 3"))
    status = await wait_exited(runtime, "crash", 30)
    assert status.exit_code == 3
    bg_pid = int((tmp_path / "state" / "meshorch-crash" / "files" / "bg.pid").read_text())

    async def bg_dead() -> bool:
        return dead(bg_pid)

    await eventually(bg_dead, 10, "background child to be killed")


async def test_files_env_and_exec(runtime: ProcessRuntime) -> None:
    await runtime.start(
        spec(
            "cfg",
            'cat etc/app.conf; echo; echo "greeting=$GREETING id=$MESHORCH_INSTANCE_ID"; ' + LOOP,
            env={"GREETING": "hi there"},
            files=(SpecFile("/etc/app.conf", b"answer=42"),),
        )
    )

    async def logged() -> bool:
        return "greeting=hi there id=cfg" in await runtime.logs("cfg", 10)

    await eventually(logged, 10, "env in the log")
    assert "answer=42" in await runtime.logs("cfg", 10)
    # The agent's own environment is not passed on.
    assert await runtime.exec("cfg", ["sh", "-c", 'test -z "$PYTEST_CURRENT_TEST"'], 10) == 0
    assert await runtime.exec("cfg", ["sh", "-c", 'test "$GREETING" = "hi there"'], 10) == 0
    assert await runtime.exec("cfg", ["test", "-f", "etc/app.conf"], 10) == 0
    assert await runtime.exec("cfg", ["false"], 10) == 1
    assert await runtime.exec("cfg", ["sh", "-c", "exit 7"], 10) == 7
    assert await runtime.exec("cfg", ["/no/such/binary"], 10) == 127
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        await runtime.exec("cfg", ["sleep", "30"], 0.5)
    assert time.monotonic() - started < 15
    with pytest.raises(InstanceNotFound):
        await runtime.exec("nope", ["true"], 10)
    await runtime.stop("cfg")
    with pytest.raises(InstanceError):
        await runtime.exec("cfg", ["true"], 10)


async def test_logs_tail(runtime: ProcessRuntime) -> None:
    await runtime.start(
        spec("chatty", "i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); done")
    )
    await wait_exited(runtime, "chatty", 30)
    assert (await runtime.logs("chatty", 3)).splitlines() == ["line97", "line98", "line99"]
    assert len((await runtime.logs("chatty", 1000)).splitlines()) == 100
    assert await runtime.logs("chatty", 0) == ""


@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox (its dd allocates at once)")
async def test_memory_limit_stops_hog_not_neighbour(runtime: ProcessRuntime) -> None:
    limit = 64 * 1024 * 1024
    await runtime.start(spec("neighbour", LOOP, memory_limit_bytes=limit))
    # busybox dd allocates its block at once: 256 MiB is over the limit, 8 MiB is not.
    await runtime.start(
        InstanceSpec(
            "hog",
            "process",
            (BUSYBOX, "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"),
            memory_limit_bytes=limit,
        )
    )
    await runtime.start(
        InstanceSpec(
            "modest",
            "process",
            (BUSYBOX, "dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=4"),
            memory_limit_bytes=limit,
        )
    )
    hog = await wait_exited(runtime, "hog", 30)
    assert hog.exit_code not in (None, 0)
    assert "memory" in (await runtime.logs("hog", 10)).lower()
    modest = await wait_exited(runtime, "modest", 30)
    assert modest.exit_code == 0
    neighbour = await status_of(runtime, "neighbour")
    assert neighbour is not None and neighbour.running
    assert await runtime.exec("neighbour", ["true"], 10) == 0


async def test_invalid_specs(runtime: ProcessRuntime) -> None:
    with pytest.raises(InvalidSpec):
        await runtime.start(InstanceSpec("empty", "process"))
    with pytest.raises(InvalidSpec):
        await runtime.start(spec("mapped", LOOP, ports=(PortMapping(8080, 80),)))
    await runtime.start(spec("same-port", LOOP, ports=(PortMapping(8080, 8080), (None, 81, "udp"))))
    with pytest.raises(InstanceError):
        await runtime.start(InstanceSpec("missing", "process", ("/no/such/binary",)))
    assert [s.instance_id for s in await runtime.list()] == ["same-port"]


async def test_restart_kills_stale_instances(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = ProcessRuntime(state)
    await old.start(spec("orphan", LOOP))
    [status] = await old.list()
    assert status.pid is not None
    # A new agent process (here: a new runtime object) does not adopt it: it kills it.
    async with ProcessRuntime(state, stale_grace_s=5) as new:
        assert await new.list() == []
        assert dead(status.pid)
        assert not (state / "meshorch-orphan").exists()
        await new.start(spec("orphan", LOOP))
        assert [s.instance_id for s in await new.list()] == ["orphan"]
    await old.close()  # reaps its (already dead) child


async def test_stale_state_with_reused_pid_is_dropped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    directory = state / "meshorch-ghost"
    directory.mkdir(parents=True)
    # Our own pid with a wrong start time: it must be left alone.
    (directory / "state.json").write_text(
        f'{{"v":1,"pid":{os.getpid()},"start_ticks":1,"boot_id":"{boot_id()}"}}'
    )
    (state / "meshorch-partial").mkdir()
    async with ProcessRuntime(state) as rt:
        assert await rt.list() == []
    assert not directory.exists()
    assert not (state / "meshorch-partial").exists()


def test_runs_on_uvloop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ProcessRuntime(tmp_path / "state") as rt:
            await rt.start(spec("u", LOOP))
            assert await rt.exec("u", ["true"], 10) == 0

            async def ready() -> bool:
                return "ready" in await rt.logs("u", 5)

            await eventually(ready, 10, "the TERM trap")
            await rt.stop("u", timeout_s=10)
            [status] = await rt.list()
            assert status.exit_code == 0

    uvloop.run(asyncio.wait_for(scenario(), 60))
