"""The upgrade launcher: the pure decision, the trial file, and real processes standing in
for the new and the previous agent (a module ``fakeagent`` in two "release libs")."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from meshorch.demo.localsite import LocalSite
from meshorch.errors import ConfigurationError
from meshorch.releases.launcher import (
    Commit,
    Observation,
    Rollback,
    Trial,
    TrialError,
    Wait,
    agent_env,
    build_parser,
    decide,
    exit_status,
    launcher_argv,
    read_trial,
    run,
    settled_lib,
    start_trial,
    status_ready,
    status_url,
    trial_path,
    write_trial,
)
from meshorch.releases.wheels import build_test_release, install_release

SOURCE = Path(__file__).resolve().parents[2]
TRIAL = Trial(
    from_version="1.0",
    to_version="1.1",
    lib="/r/1.1/lib",
    previous_lib="/r/1.0/lib",
    started_at=0.0,
    deadline_s=30.0,
)

# --- pure core --------------------------------------------------------------------------


def test_decide() -> None:
    assert decide(TRIAL, Observation(elapsed_s=1, ready=False)) == Wait()
    assert decide(TRIAL, Observation(elapsed_s=1, ready=True)) == Commit()
    assert decide(TRIAL, Observation(elapsed_s=30, ready=False)) == Rollback(
        "the new agent was not ready within 30 s"
    )
    # The launcher's --timeout overrides the trial's deadline.
    assert decide(TRIAL, Observation(elapsed_s=5, ready=False), timeout_s=5) == Rollback(
        "the new agent was not ready within 5 s"
    )
    # An exit wins over a stale "ready".
    assert decide(TRIAL, Observation(elapsed_s=1, ready=True, exit_code=1)) == Rollback(
        "the new agent exited with code 1"
    )
    assert decide(TRIAL, Observation(elapsed_s=1, ready=False, exit_code=-9)) == Rollback(
        "the new agent exited with signal SIGKILL"
    )
    assert decide(
        TRIAL, Observation(elapsed_s=1, ready=False, signal_received=signal.SIGTERM)
    ) == Rollback("stopped by SIGTERM during the trial", restart_previous=False)


def test_settled_lib() -> None:
    assert settled_lib(None) is None
    committed = Trial(**{**TRIAL.__dict__, "state": "committed"})
    assert settled_lib(committed) == "/r/1.1/lib"
    rolled_back = Trial(**{**TRIAL.__dict__, "state": "rolled_back"})
    assert settled_lib(rolled_back) == "/r/1.0/lib"
    installed = Trial(**{**TRIAL.__dict__, "state": "rolled_back", "previous_lib": None})
    assert settled_lib(installed) is None


def test_agent_env() -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/r/1.0/lib:/extra"}
    env = agent_env(base, "/r/1.1/lib", drop=["/r/1.0/lib", "/r/1.1/lib"])
    assert env == {"PATH": "/bin", "PYTHONPATH": "/r/1.1/lib:/extra", "PYTHONSAFEPATH": "1"}
    assert agent_env(base, None, drop=["/r/1.0/lib/"]) == {"PATH": "/bin", "PYTHONPATH": "/extra"}
    assert agent_env({"PYTHONPATH": "/r/1.0/lib"}, None, drop=["/r/1.0/lib"]) == {}
    assert base["PYTHONPATH"] == "/r/1.0/lib:/extra"  # not modified


def test_exit_status() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM


# --- trial file ---------------------------------------------------------------------------


def test_trial_file_round_trip(tmp_path: Path) -> None:
    assert read_trial(tmp_path) is None
    lib = tmp_path / "releases" / "1.1-abc" / "lib"
    trial = start_trial(
        tmp_path,
        from_version="1.0",
        to_version="1.1",
        lib=lib,
        previous_lib=None,
        deadline_s=60,
        now=1234.5,
    )
    assert trial.state == "trying" and trial.lib == str(lib.resolve())
    assert read_trial(tmp_path) == trial
    data = json.loads(trial_path(tmp_path).read_text())
    assert data == {
        "v": 1,
        "from_version": "1.0",
        "to_version": "1.1",
        "lib": str(lib.resolve()),
        "previous_lib": None,
        "started_at": 1234.5,
        "deadline_s": 60,
        "state": "trying",
        "reason": None,
        "finished_at": None,
    }
    assert sorted(p.name for p in trial_path(tmp_path).parent.iterdir()) == ["trial.json"]


def test_one_trial_at_a_time(tmp_path: Path) -> None:
    def start(force: bool = False) -> Trial:
        return start_trial(
            tmp_path,
            from_version="1.0",
            to_version="1.1",
            lib=None,
            previous_lib=None,
            deadline_s=60,
            force=force,
        )

    start()
    with pytest.raises(TrialError, match="already on trial"):
        start()
    assert start(force=True).state == "trying"
    write_trial(tmp_path, Trial(**{**TRIAL.__dict__, "state": "committed"}))
    assert start().state == "trying"


def test_status_url() -> None:
    assert status_url("0.0.0.0:7700") == "http://127.0.0.1:7700/v1/status"
    assert status_url("10.0.0.5:7700") == "http://10.0.0.5:7700/v1/status"
    assert status_url("[::]:7700") == "http://[::1]:7700/v1/status"
    assert status_url("[fd00::1]:80") == "http://[fd00::1]:80/v1/status"
    assert status_url(":7700") == "http://127.0.0.1:7700/v1/status"
    with pytest.raises(ConfigurationError):
        status_url("7700")


def test_launcher_argv(tmp_path: Path) -> None:
    agent = [sys.executable, "-m", "meshorch", "agent", "--site", "s", "--data-dir", "d"]
    argv = launcher_argv(tmp_path, "http://127.0.0.1:7700/v1/status", agent, timeout_s=90)
    assert argv[:3] == [sys.executable, "-m", "meshorch.releases.launcher"]
    options = build_parser().parse_args(argv[3:])
    assert options.data_dir == tmp_path.resolve()
    assert options.health_url == "http://127.0.0.1:7700/v1/status"
    assert options.timeout == 90
    assert options.agent == ["--", *agent]
    # By default the command line of this very process.
    assert launcher_argv(tmp_path, "u")[-len(sys.orig_argv) :] == sys.orig_argv


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"v": 2}',
        '{"v": 1, "from_version": "1"}',
        json.dumps({**TRIAL.to_json(), "state": "maybe"}),
        json.dumps({**TRIAL.to_json(), "deadline_s": 0}),
    ],
)
def test_unreadable_trials(tmp_path: Path, text: str) -> None:
    trial_path(tmp_path).parent.mkdir(parents=True)
    trial_path(tmp_path).write_text(text)
    with pytest.raises(TrialError):
        read_trial(tmp_path)


# --- run() without a trial in progress: straight exec, no processes ---------------------


class Execed(Exception):
    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        super().__init__("exec")
        self.argv, self.env = list(argv), dict(env)


def fake_exec(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    raise Execed(argv, env)


@pytest.mark.parametrize(
    ("trial_text", "expected_path"),
    [
        (None, "/r/1.0/lib"),  # no trial: unchanged
        ("garbage", "/r/1.0/lib"),  # unreadable: unchanged, never blocks the agent
        (json.dumps({**TRIAL.to_json(), "state": "committed"}), "/r/1.1/lib"),
        (json.dumps({**TRIAL.to_json(), "state": "rolled_back"}), "/r/1.0/lib"),
        (
            # Back to the installed version: the new release's lib leaves the path.
            json.dumps(
                {
                    **TRIAL.to_json(),
                    "state": "rolled_back",
                    "previous_lib": None,
                    "lib": "/r/1.0/lib",
                }
            ),
            None,
        ),
    ],
)
def test_without_a_trial_in_progress_execs_at_once(
    tmp_path: Path, trial_text: str | None, expected_path: str | None
) -> None:
    if trial_text is not None:
        trial_path(tmp_path).parent.mkdir(parents=True)
        trial_path(tmp_path).write_text(trial_text)
    with pytest.raises(Execed) as execed:
        run(
            tmp_path,
            "http://127.0.0.1:9/v1/status",
            ["agent", "--x"],
            base_env={"PYTHONPATH": "/r/1.0/lib"},
            exec_fn=fake_exec,
        )
    assert execed.value.argv == ["agent", "--x"]
    assert execed.value.env.get("PYTHONPATH") == expected_path


def test_other_release_libs_leave_the_path(tmp_path: Path) -> None:
    """A release lib on the path that the trial does not name (an older one) is dropped
    too; other entries stay."""
    older = tmp_path / "releases" / "0.9-abc" / "lib"
    older.mkdir(parents=True)
    (older.parent / "release.json").write_text("{}")
    trial_path(tmp_path).parent.mkdir(parents=True)
    trial_path(tmp_path).write_text(json.dumps({**TRIAL.to_json(), "state": "committed"}))
    with pytest.raises(Execed) as execed:
        run(
            tmp_path,
            "http://127.0.0.1:9/v1/status",
            ["agent"],
            base_env={"PYTHONPATH": f"{older}:/extra"},
            exec_fn=fake_exec,
        )
    assert execed.value.env["PYTHONPATH"] == "/r/1.1/lib:/extra"


# --- readiness probe ----------------------------------------------------------------------


@pytest.fixture
def status_server() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    answers: list[tuple[int, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/status", answers
    finally:
        server.shutdown()
        server.server_close()


def test_status_ready(status_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, answers = status_server
    answers += [
        (200, b'{"ready": true, "site": "s"}'),
        (200, b'{"ready": false}'),
        (200, b'{"ready": "yes"}'),
        (503, b'{"ready": true}'),
        (200, b"<html>"),
    ]
    assert [status_ready(url) for _ in range(5)] == [True, False, False, False, False]
    assert status_ready(f"http://127.0.0.1:{free_port()}/v1/status") is False


# --- real processes -----------------------------------------------------------------------

# The new agent: behaviour chosen by its first argument; it reports its PYTHONPATH.
NEW_AGENT = r"""
import http.server, json, os, signal, subprocess, sys, time
mode, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def note(name, **data):
    with open(os.path.join(out, name), "w") as f:
        json.dump({"pid": os.getpid(), "pythonpath": os.environ.get("PYTHONPATH"), **data}, f)
if mode == "crash":
    print("starting", file=sys.stderr, flush=True)
    print("error: cannot bind the API port", file=sys.stderr, flush=True)
    raise SystemExit(1)
helper = subprocess.Popen(["sleep", "120"])  # a helper in its process group
note("new.json", helper=helper.pid)
ready = mode == "serve"
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ready": ready}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body); self.wfile.flush()
        if self.path == "/quit":
            helper.kill()
            os._exit(7)
        if self.path == "/handover":
            from pathlib import Path
            from meshorch.releases.launcher import EXIT_UPGRADE, start_trial, supervised
            assert supervised()
            start_trial(Path(os.environ["FAKE_DATA_DIR"]), from_version="1.1",
                        to_version="1.2", lib=Path(os.environ["FAKE_NEXT_LIB"]),
                        previous_lib=Path(os.environ["PYTHONPATH"]), deadline_s=30)
            helper.kill()
            os._exit(EXIT_UPGRADE)
    def log_message(self, *args):
        pass
def on_term(signum, frame):
    note("term.json", signal=signum)
    helper.kill()
    os._exit(5)
signal.signal(signal.SIGTERM, on_term)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

# The previous agent: records that it ran, and how, then exits 0.
PREVIOUS_AGENT = r"""
import json, os, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
with open(os.path.join(sys.argv[2], "previous.json"), "w") as f:
    json.dump({"pid": os.getpid(), "pythonpath": os.environ.get("PYTHONPATH"),
               "argv": sys.argv[1:], "fds": fds}, f)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Running, not a zombie left for a non-reaping init."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Setup:
    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        self.out = root / "out"
        self.out.mkdir()
        self.new_lib = root / "releases" / "1.1" / "lib"
        self.next_lib = root / "releases" / "1.2" / "lib"
        self.previous_lib = root / "releases" / "1.0" / "lib"
        for lib, code in (
            (self.new_lib, NEW_AGENT),
            (self.next_lib, NEW_AGENT),
            (self.previous_lib, PREVIOUS_AGENT),
        ):
            lib.mkdir(parents=True)
            (lib / "fakeagent.py").write_text(code)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/status"

    def launch(
        self, mode: str, timeout: float = 30.0, trial: bool = True, pass_fds: Sequence[int] = ()
    ) -> subprocess.Popen[str]:
        if trial:
            start_trial(
                self.data_dir,
                from_version="1.0",
                to_version="1.1",
                lib=self.new_lib,
                previous_lib=self.previous_lib,
                deadline_s=60,
            )
        agent = [sys.executable, "-m", "fakeagent", mode, str(self.out), str(self.port)]
        # The launcher runs in the old agent's environment: the previous lib in front.
        env = {
            **os.environ,
            "PYTHONPATH": str(self.previous_lib),
            "FAKE_DATA_DIR": str(self.data_dir),
            "FAKE_NEXT_LIB": str(self.next_lib),
        }
        argv = launcher_argv(self.data_dir, self.url, agent, timeout_s=timeout)
        return subprocess.Popen(
            argv, env=env, cwd=self.out, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds
        )

    def note(self, name: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.out / name).read_text())
        return data

    def trial(self) -> Trial:
        trial = read_trial(self.data_dir)
        assert trial is not None
        return trial


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    yield Setup(tmp_path)


def test_ready_agent_is_committed_and_supervised(setup: Setup) -> None:
    launcher = setup.launch("serve")
    try:
        wait_for(lambda: setup.trial().state == "committed")
        new = setup.note("new.json")
        assert new["pythonpath"] == str(setup.new_lib.resolve())
        assert launcher.poll() is None
        # The launcher forwards SIGTERM and exits with the agent's code.
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
    assert launcher.returncode == 5, stderr
    assert setup.note("term.json")["signal"] == signal.SIGTERM
    assert not (setup.out / "previous.json").exists()
    trial = setup.trial()
    assert trial.state == "committed" and trial.finished_at is not None
    assert "upgrade committed" in stderr


def test_after_the_commit_the_agent_s_exit_is_the_launcher_s(setup: Setup) -> None:
    launcher = setup.launch("serve")
    try:
        wait_for(lambda: setup.trial().state == "committed")
        with urllib.request.urlopen(setup.url.replace("/v1/status", "/quit"), timeout=5):
            pass
        _, stderr = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
    assert launcher.returncode == 7, stderr
    # An exit after the commit is not a failed upgrade: no rollback, no previous agent.
    assert setup.trial().state == "committed"
    assert not (setup.out / "previous.json").exists()


def test_a_supervised_agent_hands_over_to_the_next_trial(setup: Setup) -> None:
    """The committed agent writes a new trial and exits with EXIT_UPGRADE: the same
    launcher process (re-exec'd) runs the next trial, no nested launchers."""
    launcher = setup.launch("serve")
    try:
        wait_for(lambda: setup.trial().state == "committed")
        first = setup.note("new.json")
        with urllib.request.urlopen(setup.url.replace("/v1/status", "/handover"), timeout=5):
            pass
        wait_for(lambda: setup.trial().to_version == "1.2" and setup.trial().state == "committed")
        second = setup.note("new.json")
        assert second["pid"] != first["pid"]
        assert second["pythonpath"] == str(setup.next_lib.resolve())
        assert child_pids(launcher.pid) == [second["pid"]]  # the launcher is its parent
        assert pythonpath_of(launcher.pid) == str(setup.new_lib.resolve())  # relaunched
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
    assert launcher.returncode == 5, stderr
    assert "hands over to a new upgrade" in stderr
    trial = setup.trial()
    assert (trial.from_version, trial.previous_lib) == ("1.1", str(setup.new_lib.resolve()))


def test_agent_that_exits_is_rolled_back(setup: Setup) -> None:
    launcher = setup.launch("crash")
    _, stderr = launcher.communicate(timeout=20)
    assert launcher.returncode == 0, stderr  # the previous agent's code
    previous = setup.note("previous.json")
    # The previous agent replaced the launcher (same pid), with the previous lib and argv.
    assert previous["pid"] == launcher.pid
    assert previous["pythonpath"] == str(setup.previous_lib.resolve())
    assert previous["argv"] == ["crash", str(setup.out), str(setup.port)]
    trial = setup.trial()
    assert trial.state == "rolled_back"
    assert trial.reason is not None
    assert trial.reason.startswith("the new agent exited with code 1")
    assert "error: cannot bind the API port" in trial.reason
    # The child's stderr still reached ours.
    assert "error: cannot bind the API port" in stderr


def test_agent_never_ready_is_killed_and_rolled_back(setup: Setup) -> None:
    started = time.monotonic()
    launcher = setup.launch("hang", timeout=4)
    _, stderr = launcher.communicate(timeout=60)
    elapsed = time.monotonic() - started
    assert launcher.returncode == 0, stderr
    assert 4 <= elapsed < 40
    new = setup.note("new.json")
    assert isinstance(new["pid"], int) and isinstance(new["helper"], int)
    assert not alive(new["pid"]) and not alive(new["helper"])  # the whole group
    assert setup.note("previous.json")["pythonpath"] == str(setup.previous_lib.resolve())
    trial = setup.trial()
    assert trial.state == "rolled_back"
    assert trial.reason == "the new agent was not ready within 4 s"


def test_without_a_trial_the_launcher_is_the_agent(setup: Setup) -> None:
    # A descriptor leaked by the agent that exec'd the launcher (inheritable).
    leaked = os.open(setup.out, os.O_RDONLY)
    try:
        launcher = setup.launch("crash", trial=False, pass_fds=[leaked])
        _, stderr = launcher.communicate(timeout=30)
    finally:
        os.close(leaked)
    assert launcher.returncode == 0, stderr
    previous = setup.note("previous.json")
    assert previous["pid"] == launcher.pid
    assert leaked not in previous["fds"]  # type: ignore[operator]
    assert previous["pythonpath"] == str(setup.previous_lib)  # the environment, unchanged
    assert stderr == ""


def test_stop_during_the_trial_rolls_back_without_restarting(setup: Setup) -> None:
    launcher = setup.launch("hang", timeout=30)
    try:
        wait_for(lambda: (setup.out / "new.json").exists())
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
    assert launcher.returncode == 5, stderr
    assert not (setup.out / "previous.json").exists()
    trial = setup.trial()
    assert trial.state == "rolled_back"
    assert trial.reason == "stopped by SIGTERM during the trial"
    # The next start runs the previous release.
    assert settled_lib(trial) == str(setup.previous_lib.resolve())


@pytest.fixture(scope="module")
def real_releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-releases")
    good = build_test_release(SOURCE, root / "wheels", "0.9.4")
    broken = build_test_release(SOURCE, root / "wheels", "0.9.3", broken=True)
    return {
        "good": install_release(good, root / "releases"),
        "broken": install_release(broken, root / "releases"),
    }


def test_broken_release_rolls_back_to_the_installed_agent(
    tmp_path: Path, real_releases: dict[str, Path]
) -> None:
    """A real broken release: `meshorch agent` exits at once, the installed one runs."""
    lib = real_releases["broken"]
    data_dir = tmp_path / "data"
    start_trial(
        data_dir,
        from_version="0.1.0",
        to_version="0.9.3",
        lib=lib,
        previous_lib=None,
        deadline_s=30,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable, "-m", "meshorch.releases.launcher", "--data-dir", str(data_dir),
            "--health-url", f"http://127.0.0.1:{free_port()}/v1/status",
            "--", sys.executable, "-m", "meshorch", "agent", "--help",
        ],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # `agent --help` of the installed version ran in the launcher's place.
    assert done.returncode == 0, done.stderr
    assert "Run the agent of one host" in done.stdout
    trial = read_trial(data_dir)
    assert trial is not None and trial.state == "rolled_back"
    assert trial.reason is not None and "broken test release" in trial.reason


def test_write_trial_replaces_atomically(tmp_path: Path) -> None:
    write_trial(tmp_path, TRIAL)
    write_trial(tmp_path, Trial(**{**TRIAL.__dict__, "state": "committed"}))
    trial = read_trial(tmp_path)
    assert trial is not None and trial.state == "committed"
    assert sorted(p.name for p in trial_path(tmp_path).parent.iterdir()) == ["trial.json"]


# --- a real agent: a one-host site on 127.0.0.1 -------------------------------------------


def real_agent(root: Path) -> tuple[list[str], Path, str]:
    """Command line, data dir and status URL of the only agent of a one-host site."""
    site = LocalSite(hosts=1, site="up", root=root / "site")
    host = site.members[0]
    command = [
        sys.executable, "-m", "meshorch", "agent", "--site", "up", "--host-id", host.host_id,
        "--data-dir", str(host.data_dir), "--api", host.api, "--raft", host.raft,
        "--cluster-password-file", str(site.password_file), "--preset", "local",
        "--runtime", "process",
    ]  # fmt: skip
    return command, host.data_dir, status_url(host.api)


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def pythonpath_of(pid: int) -> str | None:
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"PYTHONPATH="):
            return entry.split(b"=", 1)[1].decode()
    return None


@pytest.mark.parametrize("release", ["good", "broken"])
def test_real_agent_upgrade(tmp_path: Path, real_releases: dict[str, Path], release: str) -> None:
    """good: the new release comes up and is committed; broken: the installed agent takes
    the launcher's place and becomes ready. Either way SIGTERM stops it cleanly."""
    command, data_dir, url = real_agent(tmp_path)
    lib = real_releases[release]
    start_trial(
        data_dir, from_version="0.1.0", to_version="0.9.x", lib=lib, previous_lib=None,
        deadline_s=60,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            launcher_argv(data_dir, url, command), env=env, stdout=out, stderr=out, cwd=tmp_path
        )
    try:
        wait_for(lambda: setup_state(data_dir) != "trying", timeout=60)
        wait_for(lambda: status_ready(url), timeout=60)
        trial = read_trial(data_dir)
        assert trial is not None
        if release == "good":
            assert trial.state == "committed", log.read_text()
            (agent,) = child_pids(launcher.pid)
            assert pythonpath_of(agent) == str(lib)
        else:
            assert trial.state == "rolled_back", log.read_text()
            assert trial.reason is not None and "broken test release" in trial.reason
            assert pythonpath_of(launcher.pid) is None  # the installed agent, in its place
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0, log.read_text()[-3000:]
    finally:
        launcher.kill()
        launcher.wait()


def setup_state(data_dir: Path) -> str | None:
    trial = read_trial(data_dir)
    return None if trial is None else trial.state
