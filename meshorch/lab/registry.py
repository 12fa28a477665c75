"""A real OCI registry for the lab and the tests: Debian's ``docker-registry``.

``docker-registry`` is the CNCF distribution registry. :class:`LabRegistry` writes its
configuration (storage in a directory of its own, htpasswd users, Basic auth, plain
HTTP on one address), starts ``docker-registry serve`` (inside a lab namespace when
given one: :meth:`LabRegistry.on_wan` puts it beside the hub) and waits until ``/v2/``
answers. The htpasswd
file is made by ``htpasswd -B`` (Debian: ``apache2-utils``), as the registry wants
bcrypt. The configuration is JSON, which is YAML too.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import orjson

from meshorch.lab.errors import LabError
from meshorch.lab.plan import LabPlan

logger = logging.getLogger(__name__)

REGISTRY_BINARY = "docker-registry"
REGISTRY_PORT = 5000  # on the hub's WAN address, in a lab
HTPASSWD_BINARY = "htpasswd"
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TokenAuth:
    """Bearer tokens instead of htpasswd: the registry sends clients to ``realm`` for a
    token, which it accepts when issued by ``issuer`` for ``service`` and signed by a key
    whose certificate chains to ``root_cert`` (PEM)."""

    realm: str
    service: str
    issuer: str
    root_cert: Path


def registry_config(
    storage_dir: Path, listen: str, htpasswd: Path | None, token: TokenAuth | None = None
) -> dict[str, object]:
    """The registry's configuration: filesystem storage, Basic or token auth, or none
    (``htpasswd`` None: anyone pulls and pushes, as from a public registry) (pure)."""
    auth: dict[str, object] = (
        {} if htpasswd is None else {"htpasswd": {"realm": "meshorch-lab", "path": str(htpasswd)}}
    )
    if token is not None:
        auth = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.root_cert),
            }
        }
    document: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
        },
        "http": {"addr": listen, "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if auth:
        document["auth"] = auth
    return document


class LabRegistry:
    """``docker-registry serve`` on ``listen`` (``host:port``), users from ``users`` (Basic
    auth), or ``token`` auth; with neither, anonymous. ``storage`` defaults to
    ``work_dir/storage``; two registries may serve one storage (one with each kind of auth)."""

    def __init__(
        self,
        work_dir: Path,
        listen: str,
        users: Mapping[str, str],
        *,
        netns: str | None = None,
        token: TokenAuth | None = None,
        storage: Path | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.listen = listen
        self.users = dict(users)
        self.netns = netns
        self.token = token
        self.storage = storage if storage is not None else self.work_dir / "storage"
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def on_wan(
        cls, plan: LabPlan, work_dir: Path, users: Mapping[str, str], port: int = REGISTRY_PORT
    ) -> LabRegistry:
        """A registry beside the hub, on the WAN: sites reach it through their NAT router,
        as they would a registry on the internet."""
        return cls(work_dir, f"{plan.hub_ip}:{port}", users, netns=plan.hub_netns)

    @property
    def host(self) -> str:
        """``host:port``, as image references name it."""
        return self.listen

    @property
    def log_path(self) -> Path:
        return self.work_dir / "registry.log"

    def start(self) -> None:
        for tool in (REGISTRY_BINARY, HTPASSWD_BINARY):
            if shutil.which(tool) is None:
                raise LabError(
                    f"{tool} not found (Debian: apt-get install docker-registry apache2-utils)"
                )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        htpasswd = self.work_dir / "htpasswd"
        htpasswd.write_bytes(b"".join(_htpasswd_line(u, p) for u, p in self.users.items()))
        config = self.work_dir / "config.yml"
        anonymous = not self.users and self.token is None
        document = registry_config(
            self.storage, self.listen, None if anonymous else htpasswd, self.token
        )
        config.write_bytes(orjson.dumps(document))
        argv: Sequence[str] = [REGISTRY_BINARY, "serve", str(config)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_answering()
        except BaseException:
            self.stop()
            raise
        logger.info("registry serving on %s (pid %d)", self.listen, self._process.pid)

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                break
            if self._answers():
                return
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise LabError(f"docker-registry did not answer on {self.listen}; its log:\n{tail}")

    def _answers(self) -> bool:
        if self.netns is not None:
            return _probe_ns(self.netns, self.listen)
        try:
            urllib.request.urlopen(f"http://{self.listen}/v2/", timeout=1).close()
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, and asking for credentials
        except OSError:
            return False
        return True

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _htpasswd_line(user: str, password: str) -> bytes:
    """``user:bcrypt`` from ``htpasswd -nbB`` (the password on argv: lab users only)."""
    result = subprocess.run(
        [HTPASSWD_BINARY, "-nbB", user, password], capture_output=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise LabError(f"htpasswd failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.strip() + b"\n"


_PROBE = """
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1).close()
except urllib.error.HTTPError as exc:
    sys.exit(0 if exc.code == 401 else 1)
except OSError:
    sys.exit(1)
"""


def _probe_ns(netns: str, listen: str) -> bool:
    """Whether ``/v2/`` answers inside ``netns`` (200, or 401 asking for credentials)."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", _PROBE, f"http://{listen}/v2/"]
    return subprocess.run(argv, capture_output=True, check=False, timeout=10).returncode == 0
