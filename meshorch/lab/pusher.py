"""Images built with podman in a storage of their own and pushed to a lab registry.

:class:`Pusher` runs ``podman --root --runroot --runtime runc`` on a directory of its own,
inside the registry's namespace when the registry has one (a registry on the lab's WAN
is reachable there only): it imports a rootfs as a base image, builds images of a base
and files (one layer per file), pushes them and returns their manifest digests, and
``reset`` removes the storage again. Used by the registry tests and the benchmarks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import orjson

from meshorch.apps.settings import podman_dirs
from meshorch.lab.errors import LabCommandError

PODMAN_TIMEOUT_S = 600.0  # a build or push of a few hundred MB on a slow machine


class Pusher:
    """``podman`` on ``work/podman``; ``netns``: run there (the registry's);
    ``credentials``: (user, password) for pushes."""

    def __init__(
        self,
        work: Path,
        netns: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.work = Path(work)
        self.netns = netns
        self.credentials = credentials

    @property
    def argv(self) -> list[str]:
        """``podman`` and its storage flags (and ``ip netns exec`` before them)."""
        root, runroot = podman_dirs(self.work)
        podman = ["podman", "--root", str(root), "--runroot", str(runroot), "--runtime", "runc"]
        return podman if self.netns is None else ["ip", "netns", "exec", self.netns, *podman]

    def run(self, *args: str) -> str:
        """``podman ARGS``; its stdout. Raises :class:`LabCommandError` when it fails."""
        argv = [*self.argv, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PODMAN_TIMEOUT_S)
        if done.returncode != 0:
            raise LabCommandError(argv, done.returncode, done.stderr[-2000:])
        return done.stdout

    def import_rootfs(self, rootfs: Path, name: str) -> None:
        """A rootfs tarball as the one-layer image ``name`` (``localhost/base:1``)."""
        self.run("import", "-q", str(rootfs), name)

    def build(
        self, name: str, base: str, context: Path, files: Sequence[str], cmd: Sequence[str] = ()
    ) -> None:
        """``name``: ``base`` with each of ``files`` (in ``context``) copied to ``/``, one
        layer each, and ``cmd`` as its command when given."""
        lines = [f"FROM {base}", *(f"COPY {file} /{file}" for file in files)]
        if cmd:
            lines.append("CMD " + orjson.dumps(list(cmd)).decode())
        (context / "Containerfile").write_text("\n".join(lines) + "\n")
        self.run("build", "-q", "--pull=never", "-t", name, str(context))

    def push(self, local: str, target: str) -> str:
        """Push ``local`` (``localhost/app:1``) to ``target`` (``host:port/lab/app:1``,
        plain HTTP); return the manifest digest the registry has."""
        self.work.mkdir(parents=True, exist_ok=True)
        digest_file = self.work / "pushed.digest"
        flags = ["--tls-verify=false", "--digestfile", str(digest_file)]
        if self.credentials is not None:
            flags += ["--creds", ":".join(self.credentials)]
        self.run("push", *flags, local, target)
        return digest_file.read_text().strip()

    def reset(self) -> None:
        """Remove every image and the storage (never raises: used in ``finally``)."""
        subprocess.run(
            [*self.argv, "system", "reset", "--force"],
            capture_output=True,
            check=False,
            timeout=PODMAN_TIMEOUT_S,
        )
