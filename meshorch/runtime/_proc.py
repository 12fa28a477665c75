"""Running commands and reading /proc for the runtimes.

Commands run in a worker thread with ``subprocess.Popen(close_fds=True)``, not
``asyncio.create_subprocess_exec``: the agent runs on uvloop, whose subprocess
support lets children inherit descriptors that are not close-on-exec (sockets,
the WireGuard tun, LMDB files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()


class CommandTimeout(Exception):
    """Internal: the command was killed after its timeout (callers translate it)."""

    def __init__(self, argv: Sequence[str], timeout_s: float) -> None:
        super().__init__(f"{argv[0]} did not finish within {timeout_s:g} s")
        self.argv = tuple(argv)
        self.timeout_s = timeout_s


def _run_blocking(
    argv: Sequence[str],
    timeout_s: float,
    input_data: bytes | None,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    merge_stderr: bool,
) -> CommandResult:
    # Own session so that a timeout kills the whole tree, not just the leader.
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        close_fds=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input_data, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CommandTimeout(argv, timeout_s) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return CommandResult(tuple(argv), proc.returncode, stdout or b"", stderr or b"")


async def run_command(
    argv: Sequence[str],
    *,
    timeout_s: float,
    input_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    merge_stderr: bool = False,
) -> CommandResult:
    """Run ``argv`` to completion; raises :class:`CommandTimeout` (after killing it).

    A missing executable raises ``FileNotFoundError``. Cancelling the caller does
    not stop the command early: it is bounded by ``timeout_s`` instead.
    """
    return await asyncio.to_thread(
        _run_blocking, argv, timeout_s, input_data, env, cwd, merge_stderr
    )


# --- /proc ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    state: str
    pgrp: int
    session: int
    start_ticks: int
    """Start time in clock ticks since boot: with the boot id, identifies a process."""


def read_proc_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None if the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=rest[0].decode(),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        start_ticks=int(rest[19]),
    )


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def session_members(session: int) -> list[ProcStat]:
    """Live (not zombie) processes whose session id is ``session``."""
    members: list[ProcStat] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = read_proc_stat(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        if stat is not None and stat.session == session and stat.state != "Z":
            members.append(stat)
    return members


def kill_session(session: int, sig: signal.Signals) -> int:
    """Send ``sig`` to every live process of ``session``; how many were signalled."""
    count = 0
    for member in session_members(session):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member.pid, sig)
            count += 1
    return count
