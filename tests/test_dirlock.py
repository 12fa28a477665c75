"""meshorch.dirlock: one process per data dir, refused at once with a clear message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.dirlock import LOCK_FILE, DataDirBusy, hold
from meshorch.errors import ConfigurationError

HOLD_AND_WAIT = """
import sys, time
from pathlib import Path
from meshorch.dirlock import hold
lock = hold(Path(sys.argv[1]), "test holder")
print("held", flush=True)
time.sleep(60)
"""

TRY_HOLD = """
import sys
from pathlib import Path
from meshorch.dirlock import DataDirBusy, hold
try:
    hold(Path(sys.argv[1]), "second")
except DataDirBusy as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``tmp_path / "data"``."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_hold_creates_the_directory_and_records_the_holder(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "data"
    with hold(data_dir, "meshorch hub") as lock:
        assert lock.held and lock.path == data_dir / LOCK_FILE
        assert data_dir.stat().st_mode & 0o777 == 0o700
        assert (data_dir / LOCK_FILE).stat().st_mode & 0o777 == 0o600
        assert (data_dir / LOCK_FILE).read_text() == f"{os.getpid()} meshorch hub\n"
    assert not lock.held
    lock.release()  # idempotent


def test_another_process_is_refused_with_the_holders_pid(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(DataDirBusy) as caught:
        hold(data_dir, "meshorch agent")
    message = str(caught.value)
    assert str(data_dir) in message
    assert f"test holder, pid {holder.pid}" in message
    assert "another --data-dir" in message and "stop that process" in message
    assert caught.value.pid == holder.pid
    assert isinstance(caught.value, ConfigurationError)  # the CLIs print it, exit non-zero
    # the refused one did not overwrite the record
    assert (data_dir / LOCK_FILE).read_text() == f"{holder.pid} test holder\n"
    second = subprocess.run(
        [sys.executable, "-c", TRY_HOLD, str(data_dir)], capture_output=True, text=True
    )
    assert second.returncode == 3 and f"pid {holder.pid}" in second.stdout


def test_kill_9_frees_the_directory(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with hold(tmp_path / "data", "next") as lock:
        assert lock.held
        assert (tmp_path / "data" / LOCK_FILE).read_text() == f"{os.getpid()} next\n"


def test_a_second_hold_in_one_process_is_refused_until_released(tmp_path: Path) -> None:
    first = hold(tmp_path, "first")
    with pytest.raises(DataDirBusy, match=f"first, pid {os.getpid()}"):
        hold(tmp_path, "second")
    first.release()
    hold(tmp_path, "second").release()


def test_children_do_not_inherit_the_lock(tmp_path: Path) -> None:
    lock = hold(tmp_path, "parent")
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        lock.release()
        hold(tmp_path, "again").release()  # the child does not hold it on our behalf
    finally:
        child.kill()
        child.wait(timeout=10)


def test_an_unreadable_record_leaves_the_pid_unknown(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("")
    with hold(tmp_path, "holder"):
        (tmp_path / LOCK_FILE).write_text("garbage\n")
        with pytest.raises(DataDirBusy, match=r"\(pid unknown\)") as caught:
            hold(tmp_path, "second")
        assert caught.value.pid is None


def test_a_file_is_not_a_data_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        hold(tmp_path / "file", "meshorch hub")


def test_a_refusal_is_immediate(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    started = time.monotonic()
    with pytest.raises(DataDirBusy):
        hold(tmp_path / "data", "impatient")
    assert time.monotonic() - started < 1.0
