"""Thin adapters over the system: run commands, list namespaces, start and kill processes.

Everything the lab decides is decided elsewhere; this module only does what it is told
and turns failures into ``LabCommandError`` with the command and its stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshorch.lab.commands import ip_netns_exec, nsenter_net
from meshorch.lab.errors import LabCommandError, LabPrivilegeError
from meshorch.lab.parse import parse_link_names, parse_netns_list, parse_pids, parse_proc_stat
from meshorch.lab.state import ProcessRecord

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 60.0  # generous: the machines running the lab are small and busy


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs one command to completion. ``check`` raises ``LabCommandError`` on failure."""

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout_s: float | None = None
    ) -> CommandResult: ...


class SubprocessRunner:
    def __init__(self, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout_s: float | None = None
    ) -> CommandResult:
        log.debug("run: %s", shlex.join(argv))
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=limit,
                check=False,
            )
        except FileNotFoundError:
            raise LabCommandError(argv, 127, f"{argv[0]}: not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise LabCommandError(argv, -1, f"timed out after {limit:g}s") from None
        result = CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise LabCommandError(argv, proc.returncode, proc.stderr)
        return result


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabPrivilegeError()


def list_netns(runner: Runner) -> list[str]:
    return parse_netns_list(runner.run(["ip", "netns", "list"]).stdout)


def netns_pids(runner: Runner, netns: str) -> list[int]:
    """Pids of processes in ``netns``; none if it is gone already."""
    result = runner.run(["ip", "netns", "pids", netns], check=False)
    return parse_pids(result.stdout) if result.returncode == 0 else []


def list_links(runner: Runner, netns: str | None = None) -> list[str]:
    argv = ["ip", "-o", "link", "show"] if netns is None else ["ip", "-n", netns, "-o", "link"]
    return parse_link_names(runner.run(argv).stdout)


def iptables_rules(runner: Runner, netns: str, table: str = "filter") -> str:
    """``iptables -S`` of one namespace; empty if it is gone."""
    result = runner.run(ip_netns_exec(netns, "iptables", "-w", "-t", table, "-S"), check=False)
    return result.stdout if result.returncode == 0 else ""


# --- processes -------------------------------------------------------------------------


def _reap(pid: int) -> None:
    # Our own children become zombies when they die; collect them so they vanish.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    stat = parse_proc_stat(text)
    return stat.state, stat.start_ticks


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, is the one started at that tick."""
    _reap(pid)
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_ticks is None or stat[1] == start_ticks


def process_alive(record: ProcessRecord) -> bool:
    return pid_alive(record.pid, record.start_ticks)


def start_process(node: str, netns: str, argv: Sequence[str], log_file: Path) -> ProcessRecord:
    """Start ``argv`` in ``netns``, detached, output appended to ``log_file``.

    ``nsenter`` execs the command in place, so the pid is the command's own. The
    process leads a new session, so killing its group takes its children too, and it
    outlives the CLI invocation that started it.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Only the network namespace: containers started by the process need the host's cgroups.
    full = nsenter_net(netns, *argv)
    with open(log_file, "a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(argv)}\n")
    # posix_spawn rather than Popen: no Popen object to warn about a child it never waited.
    try:
        pid = os.posix_spawnp(
            full[0],
            full,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (
                    os.POSIX_SPAWN_OPEN,
                    1,
                    str(log_file),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                    0o644,
                ),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise LabCommandError(full, 127, f"cannot start: {exc}") from exc
    stat = _stat(pid)
    record = ProcessRecord(
        node=node,
        netns=netns,
        argv=tuple(argv),
        log=str(log_file),
        pid=pid,
        start_ticks=stat[1] if stat else 0,
        started_at=time.time(),
    )
    log.debug("started %s in %s: pid %d: %s", node, netns, pid, shlex.join(argv))
    return record


def kill_pids(pids: Sequence[int], timeout_s: float) -> list[int]:
    """SIGKILL ``pids`` (each with its process group if it leads one); wait until gone.

    Returns the pids still alive after ``timeout_s``.
    """
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def kill_process(record: ProcessRecord, timeout_s: float) -> bool:
    """SIGKILL a recorded process if it is still ours; True if it was running."""
    if not process_alive(record):
        return False
    remaining = kill_pids([record.pid], timeout_s)
    if remaining:
        raise LabCommandError(
            ["kill", "-KILL", str(record.pid)], -1, f"still alive after {timeout_s:g}s"
        )
    return True
