"""meshorch releases as wheels: inspect, install side by side, build test releases.

A release is a pure-Python wheel of the ``meshorch`` distribution. It is installed
with pip into ``<releases_dir>/<version>-<digest[:12]>/lib`` (``--target``, no
dependencies: they come from the running environment), and an agent runs it with
``PYTHONPATH=<lib>`` in front, so the release's packages shadow the installed ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath
from typing import Any

from meshorch.errors import MeshorchError

DIST_NAME = "meshorch"
# The top-level packages of the distribution (pyproject's packages.find include).
RELEASE_PACKAGES = ("meshorch", "raft", "gossip", "netmesh", "central_hub")
RELEASE_FILE = "release.json"
# A version is part of a directory name and of a wheel file name: keep it plain.
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}")
_MAX_UNPACKED = 256 << 20  # a release is a few MB of Python
_MAX_METADATA = 1 << 20
_PIP_TIMEOUT_S = 300.0
_VERIFY_TIMEOUT_S = 60.0
# Temporary install dirs older than this are left over from a crash.
_STALE_TMP_S = 3600.0
# Fixed timestamp so that building the same tree twice gives the same digest.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ReleaseError(MeshorchError):
    """A wheel that is not a usable meshorch release, or an install that failed."""


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    digest: str  # sha256 of the wheel file, hex
    size: int
    tag: str = "py3-none-any"  # first tag of the wheel's WHEEL file

    @property
    def key(self) -> str:
        """Directory name of the installed release."""
        return f"{self.version}-{self.digest[:12]}"

    @property
    def wheel_name(self) -> str:
        return f"{DIST_NAME}-{self.version}-{self.tag}.whl"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _check_entry(name: str) -> None:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or ".." in path.parts
        or ":" in path.parts[0]
    ):
        raise ReleaseError(f"unsafe entry {name!r} in the wheel")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_small(archive: zipfile.ZipFile, name: str) -> str:
    if archive.getinfo(name).file_size > _MAX_METADATA:
        raise ReleaseError(f"{name} is larger than {_MAX_METADATA} bytes")
    return archive.read(name).decode("utf-8")


def wheel_metadata(path: Path) -> ReleaseInfo:
    """Version, digest and size of a meshorch wheel; ReleaseError for anything else."""
    try:
        size = path.stat().st_size
        digest = _sha256_file(path)
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                _check_entry(name)
            # pip extracts everything: refuse a zip bomb before it does.
            unpacked = sum(item.file_size for item in archive.infolist())
            if unpacked > _MAX_UNPACKED:
                raise ReleaseError(f"{path.name} unpacks to {unpacked} bytes, too many")
            dist_infos = {
                name.split("/", 1)[0]
                for name in names
                if name.split("/", 1)[0].endswith(".dist-info")
            }
            if len(dist_infos) != 1:
                raise ReleaseError(
                    f"{path.name}: expected one .dist-info directory, found {len(dist_infos)}"
                )
            dist_info = dist_infos.pop()
            try:
                metadata_text = _read_small(archive, f"{dist_info}/METADATA")
                wheel_text = _read_small(archive, f"{dist_info}/WHEEL")
            except KeyError as error:
                raise ReleaseError(f"{path.name}: {dist_info} lacks {error}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError) as error:
        raise ReleaseError(f"{path.name} is not a valid wheel: {error}") from None
    except OSError as error:
        raise ReleaseError(f"cannot read the wheel {path}: {error}") from None

    metadata = HeaderParser().parsestr(metadata_text)
    dist_name: str | None = metadata.get("Name")
    if dist_name is None or _canonical(dist_name) != DIST_NAME:
        raise ReleaseError(f"{path.name} is the wheel of {dist_name!r}, not of {DIST_NAME!r}")
    version = str(metadata.get("Version") or "").strip()
    if not _VERSION.fullmatch(version):
        raise ReleaseError(f"{path.name}: unusable version {version!r}")
    # A release must not bring other top-level modules: they would shadow the
    # environment's dependencies for the agent.
    allowed = {*RELEASE_PACKAGES, dist_info, f"{DIST_NAME}-{version}.data"}
    foreign = sorted({n.split("/", 1)[0] for n in names} - allowed)
    if foreign:
        raise ReleaseError(f"{path.name}: unexpected top-level entries {foreign}")
    if f"{DIST_NAME}/__init__.py" not in names:
        raise ReleaseError(f"{path.name} does not contain the meshorch package")
    tags = HeaderParser().parsestr(wheel_text).get_all("Tag") or []
    tag = tags[0].strip() if tags else ""
    if not re.fullmatch(r"[\w.]+-[\w.]+-[\w.]+", tag):
        raise ReleaseError(f"{path.name}: unusable wheel tag {tag!r}")
    return ReleaseInfo(version=version, digest=digest, size=size, tag=tag)


def release_env(lib: Path | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that runs the release in ``lib`` (None: the installed version)."""
    env = dict(os.environ if base is None else base)
    if lib is not None:
        rest = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(lib), *([rest] if rest else [])])
        # `python -m` puts the working directory before PYTHONPATH; a source checkout
        # there would shadow the release.
        env["PYTHONSAFEPATH"] = "1"
    return env


def _run(
    command: list[str],
    what: str,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
        )
    except subprocess.TimeoutExpired:
        raise ReleaseError(f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ReleaseError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return str(done.stdout)


def verify_release(lib: Path, expected_version: str, *, python: str = sys.executable) -> None:
    """Check that ``lib`` in front of PYTHONPATH imports its own meshorch of that version."""
    lib = lib.resolve()
    # The agent's modules too: a release that needs a dependency this environment lacks
    # fails here rather than when the agent restarts.
    probe = (
        "import json, meshorch, meshorch.cli.main, meshorch.site.agent; "
        "print(json.dumps([meshorch.__version__, meshorch.__file__]))"
    )
    # The lib in front of whatever else the environment has, as an agent would run it.
    env = release_env(lib)
    out = _run(
        [python, "-c", probe],
        f"importing the release in {lib} in this environment",
        _VERIFY_TIMEOUT_S,
        env=env,
        cwd=lib,
    )
    try:
        version, file = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ReleaseError(f"unexpected output of the release check: {out!r}") from None
    if not Path(file).resolve().is_relative_to(lib.resolve()):
        raise ReleaseError(f"the release in {lib} is shadowed: meshorch came from {file}")
    if version != expected_version:
        raise ReleaseError(
            f"the release in {lib} reports version {version!r}, the wheel says {expected_version!r}"
        )


def install_release(wheel: Path, releases_dir: Path, *, python: str = sys.executable) -> Path:
    """Install ``wheel`` under ``releases_dir`` (atomic, idempotent); return its lib dir."""
    # Absolute: the lib dir goes into PYTHONPATH of processes with other working dirs.
    releases_dir = releases_dir.resolve()
    releases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=releases_dir))
    try:
        # Inspect and install the same bytes: a copy under a name pip accepts,
        # whatever the uploaded file was called.
        staged = tmp / "upload.whl"
        shutil.copyfile(wheel, staged)
        info = wheel_metadata(staged)
        final = releases_dir / info.key
        if (final / RELEASE_FILE).is_file():
            return final / "lib"
        kept = tmp / info.wheel_name
        staged.rename(kept)
        lib = tmp / "lib"
        _run(
            [
                python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-input",
                "--disable-pip-version-check", "--no-warn-script-location",
                "--target", str(lib), str(kept),
            ],
            f"pip install of {wheel.name}",
            _PIP_TIMEOUT_S,
        )  # fmt: skip
        verify_release(lib, info.version, python=python)
        record = {
            "version": info.version,
            "digest": info.digest,
            "size": info.size,
            "wheel": info.wheel_name,
            "installed_at": time.time(),
        }
        (tmp / RELEASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            # Someone else installed it meanwhile (a rename onto a non-empty dir fails).
            if (final / RELEASE_FILE).is_file():
                return final / "lib"
            raise
        _fsync_dir(releases_dir)
        return final / "lib"
    except OSError as error:
        raise ReleaseError(f"cannot install {wheel} into {releases_dir}: {error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_releases(releases_dir: Path, keep: set[Path]) -> list[Path]:
    """Remove installed releases except those in ``keep`` (release or lib dirs); return
    the removed dirs. Also removes temporary dirs of installs that crashed long ago."""
    if not releases_dir.is_dir():
        return []
    kept = {path.resolve() for path in keep}
    removed: list[Path] = []
    now = time.time()
    for entry in sorted(releases_dir.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith("."):
            if now - entry.stat().st_mtime < _STALE_TMP_S:
                continue  # possibly an install in progress
        elif entry.resolve() in kept or (entry / "lib").resolve() in kept:
            continue
        elif not (entry / RELEASE_FILE).is_file():
            continue  # not ours
        shutil.rmtree(entry)
        removed.append(entry)
    return removed


# --- test releases ------------------------------------------------------------------

_BROKEN_MAIN = '''\
"""A deliberately broken test release: the agent refuses to start."""

import sys

if "agent" in sys.argv[1:]:
    raise SystemExit("broken test release")

from meshorch.cli.main import main

raise SystemExit(main())
'''


def build_test_release(source: Path, out_dir: Path, version: str, *, broken: bool = False) -> Path:
    """Build a meshorch wheel of ``version`` from the project at ``source``; with
    ``broken``, ``python -m meshorch agent`` exits at once. For tests and demos.

    The wheel is written directly (pure Python, deterministic): pip's builder needs
    setuptools>=68 and ``wheel``, which an offline environment may lack."""
    if not _VERSION.fullmatch(version):
        raise ReleaseError(f"unusable version {version!r}")
    with tempfile.TemporaryDirectory(prefix="meshorch-release-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for package in RELEASE_PACKAGES:
            shutil.copytree(source / package, copy / package, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copyfile(source / name, copy / name)
        _set_version(copy, version)
        if broken:
            (copy / "meshorch" / "__main__.py").write_text(_BROKEN_MAIN)
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write_wheel(copy, out_dir)


def _set_version(project: Path, version: str) -> None:
    pyproject = project / "pyproject.toml"
    text, count = re.subn(
        r'^version = "[^"]*"', f'version = "{version}"', pyproject.read_text(), count=1, flags=re.M
    )
    init = project / "meshorch" / "__init__.py"
    init_text, init_count = re.subn(
        r'^__version__ = "[^"]*"',
        f'__version__ = "{version}"',
        init.read_text(),
        count=1,
        flags=re.M,
    )
    if count != 1 or init_count != 1:
        raise ReleaseError(f"cannot find the version in {pyproject} or {init}")
    pyproject.write_text(text)
    init.write_text(init_text)


def _record_hash(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={raw.decode()}"


def _package_files(project: Path, pyproject: dict[str, Any]) -> list[Path]:
    """The modules of the release packages and their package data, as setuptools would
    pick them: ``[tool.setuptools.package-data]`` globs, "*" for every package."""
    package_data: dict[str, list[str]] = (
        pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {})
    )
    found: set[Path] = set()
    for top in RELEASE_PACKAGES:
        for directory in [project / top, *sorted((project / top).rglob("*"))]:
            if not directory.is_dir() or directory.name == "__pycache__":
                continue
            found.update(directory.glob("*.py"))
            dotted = directory.relative_to(project).as_posix().replace("/", ".")
            for pattern in [*package_data.get("*", []), *package_data.get(dotted, [])]:
                found.update(path for path in directory.glob(pattern) if path.is_file())
    return sorted(path for path in found if "__pycache__" not in path.parts)


def _write_wheel(project: Path, out_dir: Path) -> Path:
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    name, version = meta["name"], meta["version"]
    dist_info = f"{name}-{version}.dist-info"
    files = [
        (path.relative_to(project).as_posix(), path.read_bytes())
        for path in _package_files(project, pyproject)
    ]
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {meta.get('description', '')}",
        f"Requires-Python: {meta.get('requires-python', '')}",
        *(f"Requires-Dist: {dep}" for dep in meta.get("dependencies", [])),
    ]
    scripts = meta.get("scripts", {})
    dist_files = [
        ("METADATA", "\n".join(lines) + "\n"),
        ("WHEEL", "Wheel-Version: 1.0\nGenerator: meshorch.releases.wheels\n"
         "Root-Is-Purelib: true\nTag: py3-none-any\n"),
        ("top_level.txt", "".join(f"{p}\n" for p in RELEASE_PACKAGES)),
    ]  # fmt: skip
    if scripts:
        entry = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
        dist_files.append(("entry_points.txt", entry))
    files += [(f"{dist_info}/{n}", text.encode()) for n, text in dist_files]
    record = "".join(f"{n},{_record_hash(data)},{len(data)}\n" for n, data in files)
    record += f"{dist_info}/RECORD,,\n"
    files.append((f"{dist_info}/RECORD", record.encode()))

    target = out_dir / f"{name}-{version}-py3-none-any.whl"
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in files:
            item = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(item, data)
    partial.replace(target)
    return target
