"""A minimal busybox image, built locally: the lab, the demo and the tests use it.

No registry is reachable from the lab, so the image is made here: a rootfs
tarball holding the host's ``/bin/busybox`` plus one symlink per applet, then
``podman import`` (through :meth:`Runtime.load_image`). The busybox binary must
be **statically linked** (Debian package ``busybox-static``), since the rootfs
has no C library; :func:`build_busybox_rootfs` checks this.

The tarball is reproducible: fixed order, owners and timestamps, so the same
busybox gives byte-identical tarballs (and image layers).
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from meshorch.runtime.base import Runtime
from meshorch.runtime.errors import RuntimeUnavailable

logger = logging.getLogger(__name__)

BUSYBOX_IMAGE_REF = "localhost/meshorch-busybox:1"
DEFAULT_BUSYBOX = Path("/bin/busybox")

BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh", "ash", "sleep", "httpd", "nc", "wget", "cat", "echo", "printf", "ls", "ps",
    "dd", "head", "tail", "true", "false", "kill", "env", "mkdir", "rm", "cp", "mv",
    "ln", "sed", "grep", "awk", "wc", "test", "[", "id", "hostname", "date", "uname",
    "free", "top", "yes", "seq", "sync", "touch", "chmod", "tee", "timeout", "ping",
    "ip", "ifconfig", "nslookup", "telnet", "find", "xargs", "sort", "uniq", "tr",
    "cut", "stat", "df", "du", "mount", "pidof", "pwd", "basename", "dirname",
    "readlink", "md5sum", "sha256sum", "gzip", "gunzip", "tar", "vi", "less", "more",
    "expr", "usleep", "watch", "nohup", "setsid", "uptime", "whoami",
)  # fmt: skip

_ETC_FILES: dict[str, bytes] = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": b"127.0.0.1 localhost\n::1 localhost\n",
    "etc/nsswitch.conf": b"hosts: files dns\n",
}
_DIRS: dict[str, int] = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "proc": 0o755,
    "root": 0o700,
    "sys": 0o755,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "www": 0o755,
}
_MTIME = 946684800  # 2000-01-01: a fixed time keeps the tarball reproducible

_PT_INTERP = 3


def is_static_elf(data: bytes) -> bool:
    """True when ``data`` is an ELF executable without a program interpreter."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return False
    is_64 = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    if is_64:
        phoff, phentsize, phnum = (
            struct.unpack_from(endian + "Q", data, 0x20)[0],
            *struct.unpack_from(endian + "HH", data, 0x36),
        )
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(endian + "I", data, 0x1C)[0],
            *struct.unpack_from(endian + "HH", data, 0x2A),
        )
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + 4 > len(data):
            return False
        (p_type,) = struct.unpack_from(endian + "I", data, offset)
        if p_type == _PT_INTERP:
            return False
    return True


def _info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo("./" + name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = target
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build_busybox_rootfs(
    dest_tar: Path,
    busybox: Path = DEFAULT_BUSYBOX,
    applets: Iterable[str] = BUSYBOX_APPLETS,
) -> Path:
    """Write a minimal rootfs tarball around a static busybox; returns ``dest_tar``.

    Raises :class:`RuntimeUnavailable` if ``busybox`` is missing or dynamically
    linked (install Debian's ``busybox-static``).
    """
    try:
        binary = Path(busybox).read_bytes()
    except OSError as exc:
        raise RuntimeUnavailable(
            f"cannot read {busybox}: {exc} (Debian: apt-get install busybox-static)"
        ) from exc
    if not is_static_elf(binary):
        raise RuntimeUnavailable(
            f"{busybox} is not a static ELF executable (Debian: apt-get install busybox-static)"
        )
    dest_tar = Path(dest_tar)
    dest_tar.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the destination, then rename: no half-written tarball is ever seen.
    with tempfile.NamedTemporaryFile(dir=dest_tar.parent, delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with tarfile.open(fileobj=tmp, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, mode in sorted(_DIRS.items()):
                    tar.addfile(_info(name, tarfile.DIRTYPE, mode))
                tar.addfile(
                    _info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), io.BytesIO(binary)
                )
                for applet in sorted(set(applets) - {"busybox"}):
                    tar.addfile(_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, target="busybox"))
                for name, content in sorted(_ETC_FILES.items()):
                    tar.addfile(
                        _info(name, tarfile.REGTYPE, 0o644, len(content)), io.BytesIO(content)
                    )
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    tmp_path.chmod(0o644)
    tmp_path.replace(dest_tar)
    return dest_tar


async def ensure_busybox_image(
    runtime: Runtime,
    work_dir: Path,
    ref: str = BUSYBOX_IMAGE_REF,
    busybox: Path = DEFAULT_BUSYBOX,
) -> str:
    """Make ``ref`` available in ``runtime`` (build and import the rootfs if missing)."""
    if await runtime.has_image(ref):
        return ref
    tar_path = Path(work_dir) / "meshorch-busybox-rootfs.tar"
    await asyncio.to_thread(build_busybox_rootfs, tar_path, busybox)
    await runtime.load_image(tar_path, ref)
    logger.info("busybox image %s ready", ref)
    return ref
