"""One process per data directory: an exclusive ``flock`` on ``DATA_DIR/LOCK``.

An agent's data dir holds its Raft journal and LMDB view, a hub's its LMDB store and
delta log; two processes on one directory would each write their own history into it (two
hubs both serve and each issues its own delta version 1). The agent and the hub take the
lock before anything else in the directory is opened, and hold it for as long as they run::

    lock = hold(data_dir, "meshorch hub")  # DataDirBusy if another process holds it
    ...
    lock.release()  # or let the process end

The kernel drops the lock when its holder's file is closed, at exit included, kill -9
too: a stale lock file never blocks a restart. The file stays (unlinking it would let two
processes lock two different files of one name); it names its last holder (``PID WHAT``),
for the message the next one prints. The descriptor is close-on-exec, so neither a
workload nor the upgrade launcher ``exec``'d in its place inherits the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from meshorch.errors import ConfigurationError

LOCK_FILE = "LOCK"
_HOLDER_MAX_BYTES = 256


class DataDirBusy(ConfigurationError):
    """Another process holds the data dir's lock; ``pid`` is its pid when it is known."""

    def __init__(self, data_dir: Path, pid: int | None, what: str | None) -> None:
        known = f"pid {pid}" if pid is not None else "pid unknown"
        if what:
            known = f"{what}, {known}"
        super().__init__(
            f"data dir {data_dir} is in use by another meshorch process ({known}), which "
            f"holds the lock on {data_dir / LOCK_FILE}. Two processes on one data dir would "
            "corrupt it: stop that process first, or give this one another --data-dir"
        )
        self.data_dir = data_dir
        self.pid = pid
        self.what = what


class DataDirLock:
    """The held lock of one data dir (see the module docstring); ``release`` is idempotent."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @property
    def path(self) -> Path:
        return self.data_dir / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def hold(data_dir: Path, what: str) -> DataDirLock:
    """Lock ``data_dir`` (created 0700 if missing) for this process, or raise
    ``DataDirBusy`` at once, naming the holder. ``what`` names this process in the lock
    file (``"meshorch agent"``); other failures raise ``ConfigurationError``."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigurationError(f"--data-dir {data_dir} is not a directory") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create --data-dir {data_dir}: {exc}") from exc
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, holder = _read_holder(fd)
        os.close(fd)
        raise DataDirBusy(data_dir, pid, holder) from None
    except OSError as exc:
        os.close(fd)
        raise ConfigurationError(f"cannot lock {path}: {exc}") from exc
    try:
        record = f"{os.getpid()} {what}\n".encode()
        os.pwrite(fd, record, 0)  # then cut: a reader never finds the file empty
        os.ftruncate(fd, len(record))
    except OSError as exc:
        os.close(fd)
        raise ConfigurationError(f"cannot write the lock file {path}: {exc}") from exc
    return DataDirLock(data_dir, fd)


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    try:
        text = os.pread(fd, _HOLDER_MAX_BYTES, 0).decode(errors="replace")
    except OSError:
        return None, None
    first, _, rest = text.partition("\n")[0].partition(" ")
    if not first.isdigit():
        return None, None
    return int(first), rest.strip() or None
