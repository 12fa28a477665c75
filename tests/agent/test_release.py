"""Release wheels: inspection, side-by-side install, test releases (real wheels, real pip)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from meshorch.releases import wheels as release
from meshorch.releases.wheels import (
    RELEASE_FILE,
    ReleaseError,
    build_test_release,
    install_release,
    prune_releases,
    release_env,
    wheel_metadata,
)

SOURCE = Path(__file__).resolve().parents[2]
GOOD = "0.9.1"
BROKEN = "0.9.2"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    started = time.monotonic()
    good = build_test_release(SOURCE, out / "good", GOOD)
    broken = build_test_release(SOURCE, out / "broken", BROKEN, broken=True)
    print(f"built two test wheels in {time.monotonic() - started:.2f} s")
    return {"good": good, "broken": broken}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path]) -> Path:
    return tmp_path_factory.mktemp("releases")


@pytest.fixture(scope="module")
def good_lib(wheels: dict[str, Path], releases: Path) -> Path:
    started = time.monotonic()
    lib = install_release(wheels["good"], releases)
    print(f"installed {GOOD} in {time.monotonic() - started:.2f} s")
    return lib


@pytest.fixture(scope="module")
def broken_lib(wheels: dict[str, Path], releases: Path) -> Path:
    return install_release(wheels["broken"], releases)


def meshorch_cli(lib: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = release_env(lib) if lib is not None else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "meshorch", *args],
        env=env,
        cwd=SOURCE,  # a source checkout in the working dir must not shadow the release
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_zip(path: Path, entries: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in entries.items():
            archive.writestr(name, text)
    return path


def meshorch_entries(**extra: str) -> dict[str, str]:
    return {
        "meshorch/__init__.py": '__version__ = "1.0"\n',
        "meshorch-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: meshorch\nVersion: 1.0\n",
        "meshorch-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nTag: py3-none-any\n",
        **extra,
    }


def test_metadata_of_a_built_wheel(wheels: dict[str, Path]) -> None:
    wheel = wheels["good"]
    info = wheel_metadata(wheel)
    assert info.version == GOOD
    assert info.digest == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert info.size == wheel.stat().st_size
    assert info.key == f"{GOOD}-{info.digest[:12]}"
    assert wheel.name == info.wheel_name == f"meshorch-{GOOD}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for package in ("meshorch", "raft", "gossip", "netmesh", "central_hub"):
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    assert not any("__pycache__" in name for name in names)
    # Package data ([tool.setuptools.package-data]) ships too.
    for asset in (SOURCE / "central_hub" / "dashboard").glob("*"):
        assert asset.relative_to(SOURCE).as_posix() in names


def test_test_release_builds_are_reproducible(wheels: dict[str, Path], tmp_path: Path) -> None:
    again = build_test_release(SOURCE, tmp_path, GOOD)
    assert wheel_metadata(again).digest == wheel_metadata(wheels["good"]).digest
    assert wheel_metadata(wheels["broken"]).digest != wheel_metadata(wheels["good"]).digest


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {
                "foo/__init__.py": "",
                "foo-1.0.dist-info/METADATA": "Name: foo\nVersion: 1.0\n",
                "foo-1.0.dist-info/WHEEL": "Tag: py3-none-any\n",
            },
            "wheel of 'foo'",
        ),
        (meshorch_entries(**{"../evil.py": ""}), "unsafe entry '../evil.py'"),
        (meshorch_entries(**{"/etc/cron.d/x": ""}), "unsafe entry"),
        (meshorch_entries(**{"meshorch/..\\..\\x.py": ""}), "unsafe entry"),
        (meshorch_entries(**{"aiohttp/__init__.py": ""}), "unexpected top-level entries"),
        (meshorch_entries(**{"other-1.0.dist-info/METADATA": ""}), "one .dist-info"),
        ({"meshorch/__init__.py": ""}, "one .dist-info"),
        (
            {k: v for k, v in meshorch_entries().items() if not k.endswith("WHEEL")},
            "lacks",
        ),
        (
            {k: v for k, v in meshorch_entries().items() if k != "meshorch/__init__.py"},
            "does not contain the meshorch package",
        ),
        (
            meshorch_entries(
                **{"meshorch-1.0.dist-info/METADATA": "Name: meshorch\nVersion: ../1\n"}
            ),
            "unusable version",
        ),
    ],
)
def test_refuses_what_is_not_a_meshorch_release(
    tmp_path: Path, entries: dict[str, str], message: str
) -> None:
    with pytest.raises(ReleaseError, match=re.escape(message)):
        wheel_metadata(write_zip(tmp_path / "x.whl", entries))


def test_refuses_a_zip_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "_MAX_UNPACKED", 100_000)  # 256 MB for real
    path = tmp_path / "bomb.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in meshorch_entries().items():
            archive.writestr(name, text)
        archive.writestr("meshorch/zeros.py", bytes(200_000))
    assert path.stat().st_size < 10_000
    with pytest.raises(ReleaseError, match="too many"):
        wheel_metadata(path)


def test_refuses_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "meshorch-1.0-py3-none-any.whl"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ReleaseError, match="not a valid wheel"):
        wheel_metadata(path)
    with pytest.raises(ReleaseError, match="cannot read"):
        wheel_metadata(tmp_path / "missing.whl")


def test_install_runs_the_release_version(good_lib: Path, releases: Path) -> None:
    info = wheel_metadata(good_lib.parent / f"meshorch-{GOOD}-py3-none-any.whl")
    assert good_lib == releases.resolve() / info.key / "lib"
    assert (good_lib.parent / RELEASE_FILE).is_file()
    done = meshorch_cli(good_lib, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"meshorch {GOOD}"
    assert meshorch_cli(good_lib, "agent", "--help").returncode == 0
    # Without the lib the environment's own version runs.
    assert meshorch_cli(None, "--version").stdout.strip() != f"meshorch {GOOD}"
    # No temporary dirs left behind.
    assert [p.name for p in releases.iterdir() if p.name.startswith(".")] == []


def test_a_release_knows_its_lib(good_lib: Path) -> None:
    probe = "from meshorch.releases.launcher import current_lib; print(current_lib())"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=release_env(good_lib),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == str(good_lib)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "None"  # the installed (here: editable) version


def test_install_is_idempotent(good_lib: Path, wheels: dict[str, Path], releases: Path) -> None:
    marker = good_lib.parent / RELEASE_FILE
    before = marker.stat().st_mtime_ns
    started = time.monotonic()
    # Any file name: the release is identified by its contents.
    renamed = releases.parent / "upload.bin"
    renamed.write_bytes(wheels["good"].read_bytes())
    assert install_release(renamed, releases) == good_lib
    assert time.monotonic() - started < 1.0  # no pip run
    assert marker.stat().st_mtime_ns == before


def test_broken_release_agent_fails_at_once(broken_lib: Path) -> None:
    done = meshorch_cli(broken_lib, "agent", "--help")
    assert done.returncode == 1
    assert "broken test release" in done.stderr
    # The rest of its command line works and reports its version.
    assert meshorch_cli(broken_lib, "--version").stdout.strip() == f"meshorch {BROKEN}"


def test_failed_install_leaves_nothing(wheels: dict[str, Path], tmp_path: Path) -> None:
    # The metadata says one version, the code another: the import check catches it.
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheels["good"]) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "meshorch/__init__.py":
                data = data.replace(GOOD.encode(), b"9.9.9")
            target.writestr(item, data)
    releases = tmp_path / "releases"
    with pytest.raises(ReleaseError, match=re.escape("reports version '9.9.9'")):
        install_release(bad, releases)
    assert list(releases.iterdir()) == []


def test_prune_keeps_what_is_asked(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    libs = []
    for key in ("1.0-aaaaaaaaaaaa", "1.1-bbbbbbbbbbbb", "1.2-cccccccccccc"):
        (releases / key / "lib").mkdir(parents=True)
        (releases / key / RELEASE_FILE).write_text("{}")
        libs.append(releases / key / "lib")
    foreign = releases / "not-a-release"
    foreign.mkdir()
    fresh_tmp = releases / ".install-fresh"
    fresh_tmp.mkdir()
    stale_tmp = releases / ".install-stale"
    stale_tmp.mkdir()
    os.utime(stale_tmp, (time.time() - 7200, time.time() - 7200))

    # Either the lib or the release dir names a release to keep.
    removed = prune_releases(releases, keep={libs[0], libs[2].parent})
    assert sorted(removed) == sorted([libs[1].parent, stale_tmp])
    assert libs[0].is_dir() and libs[2].is_dir() and foreign.is_dir() and fresh_tmp.is_dir()
    assert prune_releases(tmp_path / "none", keep=set()) == []
