"""InstanceSpec validation and hashing; the busybox rootfs builder; construction errors."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from meshorch.errors import MeshorchError
from meshorch.runtime import (
    InstanceSpec,
    InvalidSpec,
    PodmanRuntime,
    PortMapping,
    RuntimeBackendError,
    RuntimeUnavailable,
    SpecFile,
    build_busybox_rootfs,
)
from meshorch.runtime.images import is_static_elf


def full_spec(**overrides: object) -> InstanceSpec:
    fields: dict[str, object] = {
        "instance_id": "web-1",
        "image": "localhost/meshorch-busybox:1",
        "command": ("httpd", "-f", "-p", "8080"),
        "env": {"A": "1", "B": "2"},
        "ports": ((None, 8080, "tcp"),),
        "files": (("/www/index.html", b"hi"),),
        "cpu_limit": 0.5,
        "memory_limit_bytes": 64 << 20,
        "labels": {"app": "web"},
    }
    fields.update(overrides)
    return InstanceSpec(**fields)  # type: ignore[arg-type]


def test_error_tree() -> None:
    assert issubclass(RuntimeBackendError, MeshorchError)
    assert issubclass(InvalidSpec, RuntimeBackendError)


def test_spec_normalises_and_is_immutable() -> None:
    spec = full_spec()
    assert spec.ports == (PortMapping(None, 8080, "tcp"),)
    assert spec.files == (SpecFile("/www/index.html", b"hi"),)
    assert spec.name == "meshorch-web-1"
    with pytest.raises(TypeError):
        spec.env["A"] = "x"  # type: ignore[index]
    hash(spec)


def test_spec_hash_is_stable() -> None:
    a = full_spec()
    b = full_spec(env={"B": "2", "A": "1"}, labels={"app": "web"})
    assert a == b
    assert a.spec_hash == b.spec_hash
    assert len(a.spec_hash) == 64
    changes: list[dict[str, object]] = [
        {"env": {"A": "1"}},
        {"files": (("/www/index.html", b"bye"),)},
        {"memory_limit_bytes": 32 << 20},
        {"cpu_limit": 1.0},
        {"command": ("httpd",)},
        {"ports": ((8080, 8080, "tcp"),)},
        {"labels": {}},
        {"image": "other:1"},
    ]
    for change in changes:
        assert full_spec(**change).spec_hash != a.spec_hash, change
    # Another interpreter (other hash seed) computes the same digest.
    code = "from tests.runtime.test_spec_and_images import full_spec; print(full_spec().spec_hash)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == a.spec_hash


@pytest.mark.parametrize(
    "overrides",
    [
        {"instance_id": "../etc"},
        {"instance_id": ""},
        {"instance_id": "a/b"},
        {"image": ""},
        {"env": {"BAD=NAME": "x"}},
        {"env": {"A": "nul\0"}},
        {"ports": ((None, 0, "tcp"),)},
        {"ports": ((None, 80, "sctp"),)},
        {"ports": ((None, 80, "tcp"), (81, 80, "tcp"))},
        {"files": (("relative/path", b""),)},
        {"files": (("/a/../b", b""),)},
        {"files": (("/", b""),)},
        {"files": (("/a", b""), ("/a", b"x"))},
        {"files": (("/a", "text"),)},
        {"cpu_limit": 0.0},
        {"cpu_limit": float("inf")},
        {"memory_limit_bytes": 0},
        {"labels": {"meshorch.instance": "x"}},
    ],
)
def test_invalid_spec(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidSpec):
        full_spec(**overrides)


def test_podman_runtime_reports_missing_tools(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="no-such-podman"):
        PodmanRuntime(tmp_path / "r", tmp_path / "rr", podman="no-such-podman")
    with pytest.raises(RuntimeUnavailable):
        PodmanRuntime(tmp_path / "r", tmp_path / "rr", podman="/bin/sh", runtime="/no/runc")
    with pytest.raises(RuntimeUnavailable):
        PodmanRuntime(Path("relative"), tmp_path / "rr", podman="/bin/sh", runtime="/bin/sh")


BUSYBOX = Path("/bin/busybox")
needs_static_busybox = pytest.mark.skipif(
    not (BUSYBOX.is_file() and is_static_elf(BUSYBOX.read_bytes())),
    reason="needs Debian's busybox-static at /bin/busybox",
)


@needs_static_busybox
def test_busybox_rootfs(tmp_path: Path) -> None:
    tar_path = build_busybox_rootfs(tmp_path / "out" / "rootfs.tar")
    with tarfile.open(tar_path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode & 0o111
    for applet in ("sh", "sleep", "httpd", "nc", "wget", "cat", "echo", "dd"):
        assert members[f"bin/{applet}"].issym()
        assert members[f"bin/{applet}"].linkname == "busybox"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["etc/passwd"].isfile()
    # Reproducible: the same input gives the same bytes.
    again = build_busybox_rootfs(tmp_path / "again.tar")
    assert again.read_bytes() == tar_path.read_bytes()
    assert list(tmp_path.glob("out/tmp*")) == []


def test_rootfs_refuses_dynamic_busybox(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="busybox-static"):
        build_busybox_rootfs(tmp_path / "x.tar", busybox=Path(sys.executable))
    with pytest.raises(RuntimeUnavailable, match="busybox-static"):
        build_busybox_rootfs(tmp_path / "x.tar", busybox=tmp_path / "missing")
    assert not (tmp_path / "x.tar").exists()
