"""The power-cut fault on its own: a real ext4 on a real loop device, cut and mounted again
(root). What was synced survives, what was not is gone, as after a real power cut."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.chaos.disks import DISK_TOOLS, LossyDisk, LossyDisks, mounted
from tests.labutil import require_lab

pytestmark = pytest.mark.lab


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LossyDisk]:
    require_lab(*DISK_TOOLS)
    disk = LossyDisk(tmp_path / "disk.img", tmp_path / "mnt", size_mb=64)
    try:
        disk.create()
        yield disk
    finally:
        disk.remove()
        assert not mounted(tmp_path / "mnt")


def _write(path: Path, data: bytes, *, sync: bool, append: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reboot(disk: LossyDisk) -> None:
    disk.power_cut()
    assert not mounted(disk.mount_point)
    disk.power_on()


def test_unsynced_writes_are_gone_after_a_power_cut(disk: LossyDisk) -> None:
    root = disk.mount_point
    _write(root / "log", b"synced\n", sync=True)
    _fsync_dir(root)
    _write(root / "log", b"not synced\n", sync=False, append=True)
    _write(root / "new", b"never synced", sync=False)
    _reboot(disk)
    assert (root / "log").read_bytes().startswith(b"synced\n")
    assert b"not synced" not in (root / "log").read_bytes()
    # A new file never synced: gone, or at most an empty name (its entry may be committed).
    assert not (root / "new").exists() or b"never" not in (root / "new").read_bytes()


def test_fdatasynced_writes_survive_a_power_cut(disk: LossyDisk) -> None:
    root = disk.mount_point
    _write(root / "journal", b"entry 1\n", sync=True)
    _fsync_dir(root)  # the file's name, not only its data
    _write(root / "journal", b"entry 2\n", sync=True, append=True)
    _reboot(disk)
    assert (root / "journal").read_bytes() == b"entry 1\nentry 2\n"


def test_a_rename_without_a_directory_fsync_is_lost(disk: LossyDisk) -> None:
    root = disk.mount_point
    _write(root / "vote", b"term 1", sync=True)
    _fsync_dir(root)
    _write(root / "vote.tmp", b"term 2", sync=True)  # the data synced, the rename not
    os.rename(root / "vote.tmp", root / "vote")
    _reboot(disk)
    assert (root / "vote").read_bytes() == b"term 1"

    _write(root / "vote.tmp", b"term 3", sync=True)
    os.rename(root / "vote.tmp", root / "vote")
    _fsync_dir(root)  # now the rename is durable too
    _reboot(disk)
    assert (root / "vote").read_bytes() == b"term 3"
    assert not (root / "vote.tmp").exists()


def test_kill_9_keeps_the_page_cache_the_power_cut_does_not(disk: LossyDisk) -> None:
    """The difference between the two faults: a SIGKILLed writer's unsynced data is still
    read back (the kernel has it); after the power cut it is not."""
    target = disk.mount_point / "data"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         f"import os, time; open({str(target)!r}, 'wb').write(b'x' * 4096); print(1, flush=True);"
         " time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"1"
    finally:
        writer.kill()
        writer.wait()
    assert target.read_bytes() == b"x" * 4096
    _reboot(disk)
    assert not target.exists() or target.read_bytes() != b"x" * 4096


def test_disks_are_removed_even_when_unpowered(tmp_path: Path) -> None:
    require_lab(*DISK_TOOLS)
    disks = LossyDisks(tmp_path / "images", size_mb=64)
    try:
        disks.create("h1", tmp_path / "h1")
        disks.create("h2", tmp_path / "h2")
        disks.power_cut("h1")
        assert disks.unpowered() == ["h1"]
    finally:
        disks.remove_all()
    assert not mounted(tmp_path / "h1") and not mounted(tmp_path / "h2")
    assert not list((tmp_path / "images").iterdir())
