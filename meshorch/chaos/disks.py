"""Lossy data disks for the lab's hosts (I/O adapter: loop devices, ext4, mounts; root).

A ``kill -9`` leaves the page cache alone: whatever a process wrote reaches the disk in the
end, synced or not. A power cut does not. Each host's data directory is an ext4 filesystem
on a loop device over an image file; ``power_cut`` shuts that filesystem down with the
``EXT4_IOC_SHUTDOWN`` ioctl and ``NOLOGFLUSH`` (what xfstests' ``godown`` does to
simulate a crash): nothing more reaches the image, neither dirty pages nor the
uncommitted journal. ``power_on`` attaches the image to a fresh loop device and mounts
it: ext4 replays its journal, as after a reboot, and the host sees exactly what had
reached its "disk": what was fsync'd/fdatasync'd, plus whatever the kernel happened to
write back before the cut.

Why this and not dm-flakey, dm-log-writes or a FUSE filesystem (LazyFS): the machines
this runs on have no device-mapper driver and no way to load modules, while loop devices
and ext4 are there; and the kernel's own page cache and journal decide what survives,
rather than a model of them. What it does not model: torn or partial sector writes (the
image only ever gets whole blocks the filesystem wrote), a disk whose volatile write
cache lies about flushes (the image is the platters), reorderings that ext4's ordered
journal forbids (it is one real filesystem, not every filesystem's worst case), and loss
while the process keeps running (every process of the host dies with its disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# _IOR('X', 125, __u32): EXT4_IOC_SHUTDOWN (the same number as XFS_IOC_GOINGDOWN).
EXT4_IOC_SHUTDOWN = 0x8004587D
# Neither the dirty pages nor the journal are flushed: a crash, not a clean stop.
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
DEFAULT_SIZE_MB = 512
# Tools the disks need (util-linux: losetup, mount, umount; e2fsprogs: mkfs.ext4).
DISK_TOOLS = ("losetup", "mount", "umount", "mkfs.ext4")


class DiskError(Exception):
    """A lossy disk could not be created, cut or mounted."""


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise DiskError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def mounted(point: Path) -> bool:
    target = str(point.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


@dataclass(slots=True)
class LossyDisk:
    """One image file, mounted at ``mount_point`` through a loop device while powered."""

    image: Path
    mount_point: Path
    size_mb: int = DEFAULT_SIZE_MB
    device: str | None = None  # the loop device while attached
    powered: bool = False

    def create(self) -> None:
        """A new, empty ext4 image, mounted. The mount point must be empty."""
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.mount_point.mkdir(parents=True, exist_ok=True)
        if any(self.mount_point.iterdir()):
            raise DiskError(f"{self.mount_point} is not empty: it would be hidden by the disk")
        with open(self.image, "wb") as image:
            image.truncate(self.size_mb * 1024 * 1024)  # sparse
        # No lazy init: a background thread writing inode tables would only add noise.
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
              str(self.image)])  # fmt: skip
        self.power_on()

    def power_on(self) -> None:
        """Attach the image to a loop device and mount it (ext4 replays its journal).

        Always a fresh loop device: the old one may still hold the shut-down filesystem
        (a mount namespace elsewhere that has not let go of it yet), and mounting the same
        device again would hand back that dead superblock."""
        if self.powered:
            return
        self.device = _run(["losetup", "--find", "--show", str(self.image)])
        try:
            _run(["mount", "-t", "ext4", self.device, str(self.mount_point)])
        except DiskError:
            self._detach()
            raise
        self.powered = True

    def flush(self) -> None:
        """Everything written so far onto the image (``syncfs``), as a host that has been
        up for a while has it: what a later cut loses is then only what came after."""
        if self.powered:
            _run(["sync", "--file-system", str(self.mount_point)])

    def power_cut(self) -> None:
        """``cut`` then ``release``: for a disk whose processes are gone or frozen."""
        self.cut()
        self.release()

    def cut(self) -> None:
        """Drop everything not yet on the image. From here on the filesystem answers EIO;
        the processes that use it are to be stopped before (frozen at least) and killed
        after, then ``release`` unmounts it."""
        if not self.powered:
            return
        fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.powered = False

    def release(self) -> None:
        """Unmount a cut disk and detach its loop device (``power_on`` attaches anew)."""
        self._unmount()
        self._detach()

    def remove(self) -> None:
        """Unmount (cleanly: this is teardown, not a fault), detach, delete the image."""
        errors: list[DiskError] = []
        for step in (self._unmount, self._detach):
            try:
                step()
            except DiskError as exc:
                errors.append(exc)
        self.powered = False
        self.image.unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def _unmount(self) -> None:
        if not mounted(self.mount_point):
            return
        try:
            _run(["umount", str(self.mount_point)])
        except DiskError:
            # Still busy (a process not stopped): detach it now, it goes when they do.
            _run(["umount", "--lazy", str(self.mount_point)])

    def _detach(self) -> None:
        device, self.device = self.device, None
        if device is not None:
            # A device still in use is detached as soon as its last user lets go.
            with contextlib.suppress(DiskError):
                _run(["losetup", "--detach", device])


class LossyDisks:
    """The lossy disks of several hosts, by host name."""

    def __init__(self, images_dir: Path, size_mb: int = DEFAULT_SIZE_MB) -> None:
        self.images_dir = images_dir
        self.size_mb = size_mb
        self.disks: dict[str, LossyDisk] = {}

    def create(self, host: str, mount_point: Path) -> LossyDisk:
        disk = LossyDisk(self.images_dir / f"{host}.img", mount_point, self.size_mb)
        self.disks[host] = disk
        disk.create()
        return disk

    def __contains__(self, host: object) -> bool:
        return host in self.disks

    def power_cut(self, host: str) -> None:
        self.disks[host].power_cut()

    def power_on(self, host: str) -> None:
        self.disks[host].power_on()

    def flush_all(self) -> None:
        for disk in self.disks.values():
            disk.flush()

    def unpowered(self) -> list[str]:
        return sorted(h for h, d in self.disks.items() if not d.powered)

    def remove_all(self) -> None:
        """Every disk unmounted, detached and deleted; keeps going past errors."""
        first: DiskError | None = None
        for host, disk in list(self.disks.items()):
            try:
                disk.remove()
            except DiskError as exc:
                log.warning("removing %s's disk: %s", host, exc)
                first = first or exc
            del self.disks[host]
        if first is not None:
            raise first
