"""Start an agent on trial after an upgrade; fall back to the previous release by itself.

The agent being upgraded writes a trial (``start_trial``) and execs this launcher in
its own process, from its own (old) environment::

    python -m meshorch.releases.launcher --data-dir D --health-url URL [--timeout S] \\
        -- python -m meshorch agent ...

With a trial in state "trying", the launcher starts the agent argv as a child with
``PYTHONPATH=<trial lib>`` and polls ``URL`` (``GET /v1/status``) until it answers 200
with ``"ready": true``. Ready: the trial is committed and the launcher stays as a thin
supervisor (forwards SIGTERM/SIGINT/SIGHUP, exits with the agent's code). Not ready in time,
or exited: the child's process group is killed, the trial is rolled back with the
reason, and the launcher execs the same argv in the previous environment.

Without a trial in state "trying" it execs the agent straight away in the environment
the last trial settled on (committed: the new release, rolled back: the previous one,
no trial: unchanged), so it can stay in front of the agent in a service unit.

An agent supervised by a launcher (``supervised()``) hands over to a new trial by
exiting with ``EXIT_UPGRADE`` instead of exec-ing a launcher of its own: the launcher
then re-execs itself from that agent's release, so launchers never nest.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Literal, NoReturn

from meshorch.errors import ConfigurationError

TRIAL_VERSION = 1
TrialState = Literal["trying", "committed", "rolled_back"]
_STATES: tuple[TrialState, ...] = ("trying", "committed", "rolled_back")
POLL_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 2.0
KILL_GRACE_S = 10.0  # a new agent that failed: TERM, then KILL after this
STOP_GRACE_S = 60.0  # an agent asked to stop during its trial shuts down properly
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STDERR_TAIL_LINES = 20
# The supervised agent's exit status for "a new trial is written, run it" (EX_TEMPFAIL).
EXIT_UPGRADE = 75
# Set for the supervised agent: the launcher's pid.
LAUNCHER_ENV = "MESHORCH_UPGRADE_LAUNCHER"
STDERR_LINE_MAX = 500  # bytes of each line kept for the trial's reason


class TrialError(ConfigurationError):
    """A trial file that cannot be read or used."""


@dataclass(frozen=True)
class Trial:
    from_version: str
    to_version: str
    lib: str | None  # release lib dir of the new agent; None: the installed version
    previous_lib: str | None  # same for the agent that started the trial
    started_at: float
    deadline_s: float
    state: TrialState = "trying"
    reason: str | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"v": TRIAL_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: object) -> Trial:
        if not isinstance(data, dict) or data.get("v") != TRIAL_VERSION:
            raise TrialError(f"unsupported trial record: {data!r:.200}")
        try:
            trial = cls(
                from_version=str(data["from_version"]),
                to_version=str(data["to_version"]),
                lib=_optional_str(data.get("lib")),
                previous_lib=_optional_str(data.get("previous_lib")),
                started_at=float(data["started_at"]),
                deadline_s=float(data["deadline_s"]),
                state=data["state"],
                reason=_optional_str(data.get("reason")),
                finished_at=None if data.get("finished_at") is None else float(data["finished_at"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise TrialError(f"malformed trial record ({error}): {data!r:.200}") from None
        if trial.state not in _STATES:
            raise TrialError(f"unknown trial state {trial.state!r}")
        if trial.deadline_s <= 0:
            raise TrialError(f"trial deadline must be positive, not {trial.deadline_s}")
        return trial


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


# --- trial file -----------------------------------------------------------------------


def trial_path(data_dir: Path) -> Path:
    return data_dir / "upgrade" / "trial.json"


def write_trial(data_dir: Path, trial: Trial) -> None:
    """Replace the trial file atomically (temp file, fsync, rename, fsync dir)."""
    path = trial_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as stream:
        json.dump(trial.to_json(), stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trial(data_dir: Path) -> Trial | None:
    """The current trial, None when there has been none; TrialError when unreadable."""
    path = trial_path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise TrialError(f"cannot read {path}: {error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise TrialError(f"{path} is not JSON: {error}") from None
    return Trial.from_json(data)


def start_trial(
    data_dir: Path,
    *,
    from_version: str,
    to_version: str,
    lib: Path | None,
    previous_lib: Path | None,
    deadline_s: float,
    now: float | None = None,
    force: bool = False,
) -> Trial:
    """Record that the next launcher start tries ``lib``; the caller then execs the
    launcher. ``previous_lib`` is the release the caller runs (None: installed).

    Refuses while a trial is in progress (the caller may be the agent on trial), unless
    ``force``: a trial left "trying" by a launcher that was killed is re-run by the next
    launcher start, so forcing is only for an agent started without the launcher."""
    if deadline_s <= 0:
        raise TrialError(f"trial deadline must be positive, not {deadline_s}")
    if not force:
        current = read_trial(data_dir)
        if current is not None and current.state == "trying":
            raise TrialError(
                f"an upgrade to {current.to_version} is already on trial "
                f"(started at {current.started_at:.0f})"
            )
    trial = Trial(
        from_version=from_version,
        to_version=to_version,
        lib=None if lib is None else str(lib.resolve()),
        previous_lib=None if previous_lib is None else str(previous_lib.resolve()),
        started_at=time.time() if now is None else now,
        deadline_s=deadline_s,
    )
    write_trial(data_dir, trial)
    return trial


def status_url(api_address: str) -> str:
    """The local ``/v1/status`` URL of an agent listening on ``api_address`` (HOST:PORT;
    a wildcard host is reached on loopback)."""
    host, sep, port = api_address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"expected HOST:PORT, not {api_address!r}")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/status"


def launcher_argv(
    data_dir: Path,
    health_url: str,
    agent_argv: Sequence[str] | None = None,
    *,
    timeout_s: float | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line an agent execs to hand over to the launcher; ``agent_argv``
    defaults to the command line of this process (``sys.orig_argv``)."""
    agent = list(sys.orig_argv if agent_argv is None else agent_argv)
    if not agent:
        raise ConfigurationError("no agent command line to restart")
    timeout = [] if timeout_s is None else ["--timeout", f"{timeout_s:g}"]
    return [
        python, "-m", "meshorch.releases.launcher",
        "--data-dir", str(data_dir.resolve()), "--health-url", health_url,
        *timeout, "--", *agent,
    ]  # fmt: skip


def supervised() -> bool:
    """True when this process is an agent run by a launcher that waits for it: it then
    hands over to a new trial by exiting with EXIT_UPGRADE, not by exec-ing a launcher."""
    return os.environ.get(LAUNCHER_ENV) == str(os.getppid())


def current_lib() -> Path | None:
    """The release lib this process runs from, None for the installed version: the
    directory holding the imported meshorch package when it is a release's lib."""
    import meshorch  # the package itself, wherever it came from

    lib = Path(meshorch.__file__).resolve().parent.parent
    return lib if (lib.parent / "release.json").is_file() else None


# --- pure core ------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    elapsed_s: float  # since the child started
    ready: bool
    exit_code: int | None = None  # the child has exited (negative: killed by a signal)
    signal_received: int | None = None  # the launcher was asked to stop


@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class Rollback:
    reason: str
    restart_previous: bool = True  # False when the launcher was told to stop


Action = Wait | Commit | Rollback


def decide(trial: Trial, observation: Observation, timeout_s: float | None = None) -> Action:
    """What to do with a child on trial, given what was observed of it."""
    deadline = trial.deadline_s if timeout_s is None else timeout_s
    if observation.signal_received is not None:
        # Stopping during a trial: do not start the previous agent behind the back of
        # whoever stops us, but make the next start use it.
        name = signal.Signals(observation.signal_received).name
        return Rollback(f"stopped by {name} during the trial", restart_previous=False)
    if observation.exit_code is not None:
        return Rollback(f"the new agent exited with {describe_exit(observation.exit_code)}")
    if observation.ready:
        return Commit()
    if observation.elapsed_s >= deadline:
        return Rollback(f"the new agent was not ready within {deadline:g} s")
    return Wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def settled_lib(trial: Trial | None) -> str | None:
    """Release lib to run when no trial is in progress."""
    if trial is None:
        return None
    return trial.lib if trial.state == "committed" else trial.previous_lib


def agent_env(base: Mapping[str, str], lib: str | None, drop: Iterable[str]) -> dict[str, str]:
    """``base`` with the release libs in ``drop`` taken out of PYTHONPATH and ``lib``
    (None: the installed version) put in front."""
    dropped = {os.path.normpath(path) for path in drop}
    entries = [
        entry
        for entry in base.get("PYTHONPATH", "").split(os.pathsep)
        if entry and os.path.normpath(entry) not in dropped
    ]
    env = dict(base)
    env.pop(LAUNCHER_ENV, None)  # only the child of a supervising launcher gets it
    if lib is not None:
        entries.insert(0, lib)
        # `python -m` puts the working directory before PYTHONPATH; a source checkout
        # there would shadow the release.
        env["PYTHONSAFEPATH"] = "1"
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    else:
        env.pop("PYTHONPATH", None)
    return env


def release_libs_in(pythonpath: str) -> list[str]:
    """The entries of ``pythonpath`` that are installed releases' lib dirs: whichever
    release runs, no other one may stay behind it on the path."""
    return [
        entry
        for entry in pythonpath.split(os.pathsep)
        if entry and (Path(entry).parent / "release.json").is_file()
    ]


def exit_status(code: int) -> int:
    """Shell-style status of a child's return code."""
    return 128 - code if code < 0 else code


# --- readiness ------------------------------------------------------------------------


def status_ready(url: str) -> bool:
    """True when ``url`` answers 200 with a JSON object whose "ready" is true."""
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            if response.status != 200:
                return False
            body = json.loads(response.read(1 << 20))
    except (OSError, ValueError):
        return False  # not listening yet, refused, timed out, garbage
    return isinstance(body, dict) and body.get("ready") is True


# --- process handling -----------------------------------------------------------------


class _StderrTail:
    """Copies the child's stderr to ours and keeps its last lines for the reason."""

    def __init__(self, source: IO[bytes], sink: Callable[[bytes], object]) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._source, self._sink = source, sink
        self._thread = threading.Thread(target=self._pump, name="stderr-tail", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in iter(self._source.readline, b""):
            self._lines.append(line[:STDERR_LINE_MAX])
            with contextlib.suppress(OSError):
                self._sink(line)

    def text(self, wait_s: float = 2.0) -> str:
        self._thread.join(wait_s)
        return b"".join(self._lines).decode("utf-8", "replace").strip()


def kill_group(process: subprocess.Popen[bytes], grace_s: float = KILL_GRACE_S) -> None:
    """Stop the child and everything in its process group: TERM, then KILL."""
    pgid = process.pid  # the child leads its own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_s)
    # KILL in any case: descendants may outlive the leader and hold its ports.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait()


@dataclass
class _Signals:
    received: int | None = None
    child: subprocess.Popen[bytes] | None = None

    def handle(self, signum: int, _frame: types.FrameType | None) -> None:
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signum)


def _exec(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as error:
        raise SystemExit(f"upgrade launcher: cannot run {argv[0]!r}: {error}") from None


def _log(message: str) -> None:
    print(f"upgrade launcher: {message}", file=sys.stderr, flush=True)


def run(
    data_dir: Path,
    health_url: str,
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    is_ready: Callable[[str], bool] = status_ready,
    base_env: Mapping[str, str] | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
    exec_fn: Callable[[Sequence[str], Mapping[str, str]], NoReturn] = _exec,
    relaunch_argv: Sequence[str] | None = None,
) -> int:
    """The launcher: returns the exit status, or execs the agent and does not return.
    ``relaunch_argv`` is this launcher's command line, for an agent that hands over to
    a new trial (EXIT_UPGRADE); without it such an exit ends the launcher."""
    if not argv:
        raise ConfigurationError("no agent command given (put it after --)")
    env = dict(os.environ if base_env is None else base_env)
    try:
        trial = read_trial(data_dir)
    except TrialError as error:
        # Never keep an agent from starting: run it as we were asked to.
        _log(f"ignoring the trial: {error}")
        exec_fn(argv, env)
    drop = release_libs_in(env.get("PYTHONPATH", ""))
    if trial is not None:
        drop += [lib for lib in (trial.lib, trial.previous_lib) if lib]
    if trial is None or trial.state != "trying":
        exec_fn(argv, agent_env(env, settled_lib(trial), drop))

    _log(f"trying {trial.to_version} (from {trial.from_version})")
    signals = _Signals()
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signals.handle)
    child = subprocess.Popen(
        list(argv),
        env={**agent_env(env, trial.lib, drop), LAUNCHER_ENV: str(os.getpid())},
        stderr=subprocess.PIPE,
        process_group=0,  # its own group: a rollback kills its helpers too
    )
    signals.child = child
    assert child.stderr is not None
    tail = _StderrTail(child.stderr, lambda line: os.write(2, line))
    if signals.received is not None:  # arrived before the child existed
        signals.handle(signals.received, None)

    try:
        action = _supervise(trial, child, health_url, signals, timeout_s, is_ready, poll_interval_s)
    except BaseException:
        kill_group(child)  # never leave an agent behind that nobody supervises
        raise
    if isinstance(action, Commit):
        _record(data_dir, replace(trial, state="committed", finished_at=time.time()))
        _log(f"{trial.to_version} is ready: upgrade committed")
        code = child.wait()  # signals are forwarded by the handler meanwhile
        tail.text()
        if code == EXIT_UPGRADE and relaunch_argv and _state(data_dir) == "trying":
            # The agent handed over to a new trial: run it with the launcher of the
            # release that agent ran.
            _log("the agent hands over to a new upgrade")
            exec_fn(relaunch_argv, agent_env(env, trial.lib, drop))
        return exit_status(code)

    kill_group(child, STOP_GRACE_S if not action.restart_previous else KILL_GRACE_S)
    reason = action.reason
    if action.restart_previous:
        last = tail.text()
        if last:
            reason += f"; last stderr lines:\n{last}"
    _record(data_dir, replace(trial, state="rolled_back", reason=reason, finished_at=time.time()))
    _log(f"rolled back to {trial.from_version}: {action.reason}")
    if not action.restart_previous:
        return exit_status(child.returncode)
    exec_fn(argv, agent_env(env, trial.previous_lib, drop))


def _state(data_dir: Path) -> TrialState | None:
    try:
        trial = read_trial(data_dir)
    except TrialError as error:
        _log(str(error))
        return None
    return None if trial is None else trial.state


def _record(data_dir: Path, trial: Trial) -> None:
    """Write the outcome; failing to is logged, not fatal: the agent matters more."""
    try:
        write_trial(data_dir, trial)
    except OSError as error:
        _log(f"cannot record the trial's outcome ({trial.state}): {error}")


def _supervise(
    trial: Trial,
    child: subprocess.Popen[bytes],
    health_url: str,
    signals: _Signals,
    timeout_s: float | None,
    is_ready: Callable[[str], bool],
    poll_interval_s: float,
) -> Commit | Rollback:
    """Observe the child until the decision is no longer to wait."""
    started = time.monotonic()
    while True:
        exit_code = child.poll()
        ready = exit_code is None and signals.received is None and is_ready(health_url)
        observation = Observation(
            elapsed_s=time.monotonic() - started,
            ready=ready,
            exit_code=child.poll() if exit_code is None else exit_code,
            signal_received=signals.received,
        )
        action = decide(trial, observation, timeout_s)
        if not isinstance(action, Wait):
            return action
        time.sleep(poll_interval_s)


def close_inherited_fds() -> list[int]:
    """Close the inheritable descriptors above stderr; return them. An agent that execs
    the launcher leaks whatever its libraries opened without O_CLOEXEC (LMDB's data file,
    for one); the launcher would keep them open and hand them to the previous agent on
    a rollback. Python's own descriptors are never inheritable (PEP 446)."""
    if "LISTEN_FDS" in os.environ:
        return []  # socket activation: those descriptors are meant for the agent
    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                os.close(fd)
                closed.append(fd)
        except OSError:
            pass  # the listing's own descriptor, already gone
    return closed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meshorch.releases.launcher",
        description="Run an agent on trial after an upgrade and roll back if it does not "
        "become ready.",
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="the agent's data dir")
    parser.add_argument("--health-url", required=True, help="the new agent's GET /v1/status URL")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds the new agent has to become ready (default: the trial's deadline)",
    )
    parser.add_argument("agent", nargs=argparse.REMAINDER, help="-- agent command line")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    close_inherited_fds()
    options = build_parser().parse_args(args)
    argv = list(options.agent)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if options.timeout is not None and options.timeout <= 0:
        raise SystemExit("upgrade launcher: --timeout must be positive")
    try:
        return run(
            options.data_dir,
            options.health_url,
            argv,
            timeout_s=options.timeout,
            relaunch_argv=sys.orig_argv,
        )
    except ConfigurationError as error:
        raise SystemExit(f"upgrade launcher: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
