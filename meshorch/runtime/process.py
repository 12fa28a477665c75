"""A runtime of plain subprocesses, for hosts without podman and for fast tests.

Each instance is one command run in its own session (``setsid``), with a
directory ``{state_dir}/meshorch-{id}/`` holding:

- ``files/``: the spec's files, at their absolute path below this directory
  (``/etc/app.conf`` becomes ``files/etc/app.conf``). It is also the working
  directory, so the command should use relative paths or ``$MESHORCH_FILES_DIR``;
  there is no chroot and no mount namespace.
- ``stdout.log`` and ``stderr.log``: the instance's output as written, one file per
  stream (so log capture can tell them apart); not rotated. A replaced instance
  starts new files.
- ``state.json``: pid, boot id and process start time, to recognise the process
  after an agent restart.

What is and is not isolated:

- **Image**: ignored (recorded in the status only); the command runs with the
  host's binaries, looked up on ``PATH``. :meth:`has_image` is always true and
  :meth:`load_image` only checks that the archive exists. So one spec can run on
  a podman host and, for tests, on a process host.
- **Environment**: not inherited from the agent (it may hold secrets); the
  instance gets a default ``PATH``, ``MESHORCH_INSTANCE_ID``,
  ``MESHORCH_FILES_DIR``, the spec's ``env`` and ``secret_env``, and
  ``MESHORCH_SECRETS_DIR`` (the instance's secret files, outside ``state_dir``) when
  it has secrets.
- **Memory**: ``memory_limit_bytes`` becomes ``RLIMIT_AS`` set in a
  ``preexec_fn``. It limits *virtual address space per process*, not resident
  memory and not the sum over the instance's processes (every child gets its own
  limit); allocation beyond it fails (``malloc`` returns NULL, the program
  usually exits with an error) rather than being OOM-killed; runtimes that
  reserve large address ranges (JVM, Go, ASan) may not start at all under a
  small limit. Commands run with ``exec`` get no limit.
- **CPU**: ``cpu_limit`` is *not enforced*: ``RLIMIT_CPU`` is a lifetime
  budget of CPU seconds (the process is killed when it is used up), not a rate,
  and ``nice`` only changes priority relative to other processes. Use podman
  (cgroups) where CPU limits matter.
- **Ports**: no network namespace, the process binds host ports itself: a
  ``host_port`` different from ``container_port`` is rejected.
- **User and network**: the process runs as the agent's user (root when the agent
  is root) on the host's network: it reaches whatever the agent reaches (its API,
  Raft and WireGuard ports, its socket and data directory), and neither tenant
  isolation nor the site DNS applies. **Trusted workloads only**; podman is the
  runtime for anything else.

Restart of the agent: the runtime does **not** adopt instances started by an
earlier agent process (it could not reap them or get their exit code). On
:meth:`open` (run implicitly by the first call) it kills every process still
running from a directory in ``state_dir`` (checked against boot id and start
time, so a reused pid is never killed) and deletes those directories. The
reconciler then starts what should run. :meth:`close` stops all instances.

When an instance's main process exits, what remains of its session is killed,
as the kernel does for a container whose PID 1 exits. Exit codes follow the
shell convention: killed by signal N reports ``128 + N``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from meshorch.runtime._proc import (
    CommandTimeout,
    boot_id,
    kill_session,
    read_proc_stat,
    run_command,
    session_members,
)
from meshorch.runtime.base import (
    NAME_PREFIX,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    LogFile,
    LogFormat,
    instance_name,
)
from meshorch.runtime.errors import (
    ExecTimeout,
    ImageError,
    InstanceError,
    InstanceNotFound,
    InvalidSpec,
)

logger = logging.getLogger(__name__)

PROCESS_IMAGE = "process"
"""Conventional image name for specs meant only for the process runtime."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STATE_FILE = "state.json"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
FILES_DIR = "files"
STATE_VERSION = 1

_POLL_INTERVAL_S = 0.05


def _exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; podman and shells say 128 + N.
    return returncode if returncode >= 0 else 128 - returncode


def _memory_preexec(limit_bytes: int) -> Callable[[], None]:
    # Runs in the forked child before exec: only async-signal-safe-ish work here.
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _tail_lines(path: Path, tail: int) -> str:
    if tail <= 0:
        return ""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return ""
    with f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        # Read backwards in blocks until we hold more newlines than wanted lines.
        while pos > 0 and data.count(b"\n") <= tail:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    return b"".join(data.splitlines(keepends=True)[-tail:]).decode(errors="replace")


def _tail_both(directory: Path, tail: int) -> str:
    if tail <= 0:
        return ""
    stdout = _tail_lines(directory / STDOUT_FILE, tail).splitlines(keepends=True)
    stderr = _tail_lines(directory / STDERR_FILE, tail).splitlines(keepends=True)
    if stdout and stderr and not stdout[-1].endswith("\n"):
        stdout[-1] += "\n"  # an unterminated stdout line must not swallow stderr's first
    return "".join((stdout + stderr)[-tail:])


@dataclass
class _Instance:
    spec: InstanceSpec
    spec_hash: str
    directory: Path
    proc: subprocess.Popen[bytes]
    started_at: float
    exit_code: int | None = None
    finished_at: float | None = None

    @property
    def files_dir(self) -> Path:
        return self.directory / FILES_DIR

    @property
    def running(self) -> bool:
        return self.exit_code is None


class ProcessRuntime:
    """Plain-subprocess runtime; see the module docstring for its limits."""

    name = "process"

    def __init__(
        self,
        state_dir: Path,
        *,
        close_timeout_s: float = 10.0,
        stale_grace_s: float = 5.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.close_timeout_s = close_timeout_s
        self.stale_grace_s = stale_grace_s
        self._instances: dict[str, _Instance] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()
        self._opened = False

    # --- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the state dir and kill instances left by an earlier agent process."""
        async with self._open_lock:
            if self._opened:
                return
            await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True)
            for directory in sorted(self.state_dir.glob(NAME_PREFIX + "*")):
                if directory.is_dir():
                    await self._kill_stale(directory)
            self._opened = True

    async def close(self) -> None:
        """Stop every instance (SIGTERM, then SIGKILL after ``close_timeout_s``)."""
        ids = builtins.list(self._instances)
        await asyncio.gather(*(self.stop(i, self.close_timeout_s) for i in ids))

    async def _kill_stale(self, directory: Path) -> None:
        try:
            state: dict[str, Any] = orjson.loads(
                await asyncio.to_thread((directory / STATE_FILE).read_bytes)
            )
            pid = int(state["pid"])
            start_ticks = int(state["start_ticks"])
            same_boot = state.get("boot_id") == boot_id()
        except (OSError, ValueError, KeyError, TypeError):
            pid, start_ticks, same_boot = 0, 0, False
        if same_boot and pid > 0:
            leader = read_proc_stat(pid)
            if leader is not None and leader.start_ticks != start_ticks:
                # The pid now belongs to someone else: nothing of ours can be left.
                logger.info("stale instance %s: pid %d was reused", directory.name, pid)
            else:
                await self._kill_stale_session(directory.name, pid)
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    async def _kill_stale_session(self, name: str, session: int) -> None:
        # Not our children: we cannot wait() for them, so watch /proc instead.
        if kill_session(session, signal.SIGTERM):
            logger.warning("killing stale instance %s (session %d)", name, session)
        deadline = time.monotonic() + self.stale_grace_s
        while time.monotonic() < deadline:
            if not session_members(session):
                break
            await asyncio.sleep(_POLL_INTERVAL_S)
        kill_session(session, signal.SIGKILL)

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    # --- process bookkeeping ----------------------------------------------------

    def _poll(self, inst: _Instance) -> None:
        if inst.exit_code is not None:
            return
        # WNOWAIT leaves the leader a zombie, so its pid (= session id) cannot be
        # reused while we kill what is left of the session.
        try:
            if os.waitid(os.P_PID, inst.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return
        except ChildProcessError:
            pass  # reaped by someone else: Popen.wait() below reports it as exited
        kill_session(inst.proc.pid, signal.SIGKILL)
        returncode = inst.proc.wait()
        inst.exit_code = _exit_code(returncode)
        inst.finished_at = time.time()
        logger.info("instance %s exited with %d", inst.spec.instance_id, inst.exit_code)

    async def _wait_exit(self, inst: _Instance, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._poll(inst)
            if not inst.running:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_INTERVAL_S)

    async def _terminate(self, inst: _Instance, timeout_s: float) -> None:
        self._poll(inst)
        if not inst.running:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inst.proc.pid, signal.SIGTERM)
        if await self._wait_exit(inst, timeout_s):
            return
        logger.warning(
            "instance %s ignored SIGTERM for %g s, killing", inst.spec.instance_id, timeout_s
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inst.proc.pid, signal.SIGKILL)
        if not await self._wait_exit(inst, 30.0):
            raise InstanceError(inst.spec.instance_id, "process survived SIGKILL for 30 s")

    def _get(self, instance_id: str) -> _Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise InstanceNotFound(instance_id, f"no instance {instance_id!r}")
        return inst

    def _env(self, spec: InstanceSpec, files_dir: Path) -> dict[str, str]:
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": str(files_dir),
            "MESHORCH_INSTANCE_ID": spec.instance_id,
            "MESHORCH_FILES_DIR": str(files_dir),
        }
        if spec.secrets_dir is not None:
            env["MESHORCH_SECRETS_DIR"] = spec.secrets_dir
        env.update(spec.env)
        env.update(spec.secret_env)  # passed to the process only, never written here
        return env

    # --- Runtime ------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> None:
        if not spec.command:
            raise InvalidSpec(f"{spec.instance_id}: the process runtime needs a command")
        for port in spec.ports:
            if port.host_port not in (None, port.container_port):
                raise InvalidSpec(
                    f"{spec.instance_id}: the process runtime cannot map port "
                    f"{port.host_port} to {port.container_port}"
                )
        await self.open()
        spec_hash = spec.spec_hash
        async with self._lock(spec.instance_id):
            old = self._instances.get(spec.instance_id)
            if old is not None:
                self._poll(old)
                if old.running and old.spec_hash == spec_hash:
                    return
                logger.info("replacing instance %s", spec.instance_id)
                await self._terminate(old, self.close_timeout_s)
                del self._instances[spec.instance_id]
            inst = await asyncio.to_thread(self._spawn, spec, spec_hash)
            self._instances[spec.instance_id] = inst
            logger.info("started instance %s (pid %d)", spec.instance_id, inst.proc.pid)

    def _spawn(self, spec: InstanceSpec, spec_hash: str) -> _Instance:
        directory = self.state_dir / spec.name
        shutil.rmtree(directory, ignore_errors=True)
        files_dir = directory / FILES_DIR
        files_dir.mkdir(parents=True, mode=0o700)
        for spec_file in spec.files:
            target = files_dir / spec_file.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(spec_file.content)
        preexec = (
            _memory_preexec(spec.memory_limit_bytes)
            if spec.memory_limit_bytes is not None
            else None
        )
        with (
            (directory / STDOUT_FILE).open("ab") as stdout,
            (directory / STDERR_FILE).open("ab") as stderr,
        ):
            try:
                # preexec_fn is unsafe with threads in general; ours only calls
                # setrlimit, which takes no lock the child could inherit held.
                proc = subprocess.Popen(
                    builtins.list(spec.command),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=files_dir,
                    env=self._env(spec, files_dir),
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except OSError as exc:
                shutil.rmtree(directory, ignore_errors=True)
                raise InstanceError(
                    spec.instance_id, f"cannot run {spec.command[0]!r}: {exc}"
                ) from exc
        stat = read_proc_stat(proc.pid)
        state = {
            "v": STATE_VERSION,
            "instance_id": spec.instance_id,
            "spec_hash": spec_hash,
            "image": spec.image,
            "pid": proc.pid,
            "start_ticks": stat.start_ticks if stat is not None else 0,
            "boot_id": boot_id(),
        }
        (directory / STATE_FILE).write_bytes(orjson.dumps(state))
        return _Instance(spec, spec_hash, directory, proc, started_at=time.time())

    async def stop(self, instance_id: str, timeout_s: float = 10) -> None:
        await self.open()
        async with self._lock(instance_id):
            inst = self._instances.get(instance_id)
            if inst is None:
                return
            await self._terminate(inst, timeout_s)

    async def remove(self, instance_id: str) -> None:
        await self.open()
        async with self._lock(instance_id):
            inst = self._instances.pop(instance_id, None)
            if inst is not None:
                await self._terminate(inst, 0)
            await asyncio.to_thread(
                shutil.rmtree, self.state_dir / (NAME_PREFIX + instance_id), ignore_errors=True
            )

    async def list(self) -> builtins.list[InstanceStatus]:
        await self.open()
        statuses: builtins.list[InstanceStatus] = []
        for inst in self._instances.values():
            self._poll(inst)
            statuses.append(
                InstanceStatus(
                    instance_id=inst.spec.instance_id,
                    state=InstanceState.RUNNING if inst.running else InstanceState.EXITED,
                    spec_hash=inst.spec_hash,
                    image=inst.spec.image,
                    exit_code=inst.exit_code,
                    started_at=inst.started_at,
                    finished_at=inst.finished_at,
                    pid=inst.proc.pid if inst.running else None,
                )
            )
        return statuses

    async def exec(self, instance_id: str, argv: Sequence[str], timeout_s: float) -> int:
        """Run ``argv`` on the host in the instance's directory and environment.

        A missing executable gives 127 and a non-executable one 126, as in a shell.
        """
        await self.open()
        if not argv:
            raise InvalidSpec("exec needs a command")
        inst = self._get(instance_id)
        self._poll(inst)
        if not inst.running:
            raise InstanceError(instance_id, f"instance {instance_id!r} is not running")
        try:
            result = await run_command(
                argv,
                timeout_s=timeout_s,
                env=self._env(inst.spec, inst.files_dir),
                cwd=inst.files_dir,
            )
        except CommandTimeout as exc:
            raise ExecTimeout(instance_id, f"exec in {instance_id}: {exc}") from exc
        except FileNotFoundError:
            return 127
        except PermissionError:
            return 126
        return _exit_code(result.returncode)

    async def logs(self, instance_id: str, tail: int) -> str:
        """The last ``tail`` lines: stdout's, then stderr's (their interleaving is unknown)."""
        await self.open()
        inst = self._get(instance_id)
        return await asyncio.to_thread(_tail_both, inst.directory, tail)

    def log_files(self, instance_id: str) -> builtins.list[LogFile]:
        directory = self.state_dir / instance_name(instance_id)
        return [
            LogFile(directory / STDOUT_FILE, LogFormat.RAW, "stdout"),
            LogFile(directory / STDERR_FILE, LogFormat.RAW, "stderr"),
        ]

    async def has_image(self, ref: str) -> bool:
        return True

    async def image_names(self) -> builtins.list[str]:
        return []

    async def remove_image(self, ref: str) -> bool:
        return True  # nothing was kept

    async def load_image(self, archive_path: Path, ref: str) -> None:
        if not await asyncio.to_thread(Path(archive_path).is_file):
            raise ImageError(ref, f"image archive {archive_path} not found")
        logger.debug("process runtime ignores image %s (%s)", ref, archive_path)
