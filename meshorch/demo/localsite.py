"""A site of real agent processes on loopback, for the demo, tests and benchmarks.

Each host is a ``meshorch agent`` subprocess with its own data dir and ports.
Nothing here needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from meshorch.site.access import harness_token

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now, never one this process handed out before: the kernel may
    offer a just-released port again, and two hosts of one site must not get the same."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class LocalHost:
    host_id: str
    api_port: int
    raft_port: int
    data_dir: Path
    peers: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    @property
    def raft(self) -> str:
        return f"127.0.0.1:{self.raft_port}"

    @property
    def url(self) -> str:
        return f"http://{self.api}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class LocalSite:
    """``hosts`` agents of site ``site`` on 127.0.0.1, under ``root`` (a temp dir by default)."""

    hosts: int = 3
    site: str = "demo"
    root: Path | None = None
    log_level: str = "info"
    runtime: str = "process"
    extra_args: list[str] = field(default_factory=list)  # appended to every agent's command
    host_args: dict[str, list[str]] = field(default_factory=dict)  # host id -> more flags
    members: list[LocalHost] = field(default_factory=list)
    _own_root: bool = False

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="meshorch-site-"))
            self._own_root = True
        self.root.mkdir(parents=True, exist_ok=True)
        self.password_file = self.root / "cluster.password"
        self.password_file.write_text(secrets.token_urlsafe(32))
        self.password_file.chmod(0o600)
        # Every agent accepts this admin token on its API (--operator-token-file).
        self.token = harness_token()
        self.token_file = self.root / "operator.token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        for index in range(self.hosts):
            self.members.append(self._new_host(f"h{index + 1}"))
        for host in self.members:
            host.peers = [other.raft for other in self.members if other is not host]

    def _new_host(self, host_id: str) -> LocalHost:
        assert self.root is not None
        return LocalHost(host_id, free_port(), free_port(), self.root / host_id, [])

    @property
    def headers(self) -> dict[str, str]:
        """What a request to one of the agents carries: the admin token."""
        return {"Authorization": f"Bearer {self.token}"}

    def session(self, **options: Any) -> aiohttp.ClientSession:
        """A client session for the agents' APIs (the admin token on every request)."""
        return aiohttp.ClientSession(headers=self.headers, **options)

    def host(self, host_id: str) -> LocalHost:
        return next(h for h in self.members if h.host_id == host_id)

    def start_host(self, host: LocalHost) -> None:
        assert self.root is not None
        command = [
            sys.executable, "-m", "meshorch", "--log-level", self.log_level, "agent",
            "--site", self.site, "--host-id", host.host_id,
            "--data-dir", str(host.data_dir), "--api", host.api, "--raft", host.raft,
            "--cluster-password-file", str(self.password_file), "--preset", "local",
            "--runtime", self.runtime, "--operator-token-file", str(self.token_file),
        ]  # fmt: skip
        for peer in host.peers:
            command += ["--peer", peer]
        command += self.extra_args + self.host_args.get(host.host_id, [])
        host.log_path = self.root / f"{host.host_id}.log"
        log = open(host.log_path, "ab")  # noqa: SIM115 - the child owns it
        host.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def start(self) -> None:
        for host in self.members:
            self.start_host(host)

    def add_host(self) -> LocalHost:
        """A new host started with every current member as its partner (not yet a member)."""
        host = self._new_host(f"h{len(self.members) + 1}")
        host.peers = [other.raft for other in self.members]
        self.members.append(host)
        self.start_host(host)
        return host

    def signal(self, host: LocalHost, sig: signal.Signals) -> None:
        if host.process is not None and host.process.poll() is None:
            os.kill(host.process.pid, sig)

    def kill(self, host: LocalHost) -> None:
        """SIGKILL: no chance to flush or say goodbye."""
        self.signal(host, signal.SIGKILL)
        if host.process is not None:
            host.process.wait(timeout=10)

    def stop_host(self, host: LocalHost, timeout_s: float = 10.0) -> None:
        process = host.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a paused process cannot exit
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def stop(self) -> None:
        for host in self.members:
            self.stop_host(host)

    def cleanup(self) -> None:
        self.stop()
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        for host in self.members:
            if host.log_path and host.log_path.exists():
                tail = host.log_path.read_text(errors="replace").splitlines()[-30:]
                parts.append(f"--- {host.host_id} ---\n" + "\n".join(tail))
        return "\n".join(parts)


async def get_status(session: aiohttp.ClientSession, host: LocalHost) -> dict[str, Any] | None:
    try:
        async with session.get(f"{host.url}/v1/status", timeout=aiohttp.ClientTimeout(2)) as r:
            return dict(await r.json()) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_ready(
    session: aiohttp.ClientSession,
    hosts: list[LocalHost],
    timeout_s: float = 30.0,
    members: int | None = None,
    not_leader: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Wait until every host answers ready, agrees on one leader (other than
    ``not_leader``) and knows every member."""
    expected = members if members is not None else len(hosts)
    deadline = time.monotonic() + timeout_s
    last: dict[str, dict[str, Any] | None] = {}
    while time.monotonic() < deadline:
        last = {h.host_id: await get_status(session, h) for h in hosts}
        statuses = [s for s in last.values() if s is not None]
        if len(statuses) == len(hosts):
            leaders = {s["leader"] for s in statuses}
            complete = all(
                s["ready"]
                and len(s["members"]) == expected
                and all(m["host_id"] for m in s["members"])
                for s in statuses
            )
            if complete and len(leaders) == 1 and not leaders & {None, not_leader}:
                return {k: v for k, v in last.items() if v is not None}
        await asyncio.sleep(0.1)
    silent = [h for h in hosts if last.get(h.host_id) is None]
    raise TimeoutError(
        f"site not ready within {timeout_s}s; last statuses: {last}"
        + "".join(f"\n--- {h.host_id} (no answer) ---\n{_log_tail(h)}" for h in silent)
    )


def _log_tail(host: LocalHost, lines: int = 30) -> str:
    if host.log_path is None or not host.log_path.exists():
        return "(no log)"
    return "\n".join(host.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalHub:
    """A ``meshorch hub`` subprocess on loopback, with its data under ``data_dir``.

    With ``tls`` it serves its self-signed certificate: ``fingerprint`` (known once
    ``wait_ready`` returned) is what sites pin (``--hub-fingerprint``) and ``ssl`` what a
    client session passes to check it; without, it runs with ``--insecure-http``."""

    data_dir: Path
    fleet: str = "demo"
    port: int = 0
    log_level: str = "info"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    tls: bool = False
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.port == 0:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ssl(self) -> aiohttp.Fingerprint | bool:
        """The ``ssl`` argument of a request to this hub (its pinned fingerprint)."""
        if not self.tls:
            return True
        if self.fingerprint is None:
            self.fingerprint = self._read_fingerprint()
        return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint))

    def _read_fingerprint(self) -> str:
        pem = (self.data_dir / "tls.crt").read_text()
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def start(self) -> None:
        command = [
            sys.executable, "-m", "meshorch", "hub", "--data-dir", str(self.data_dir),
            "--listen", f"127.0.0.1:{self.port}", "--fleet", self.fleet,
            "--log-level", self.log_level, *self.extra_args,
        ]  # fmt: skip
        if not self.tls:
            command.append("--insecure-http")
        self.log_path = self.data_dir.parent / f"hub-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float = 30.0) -> str:
        """Wait for the hub to answer; returns the fleet root public key."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the hub exited: {self.logs()}")
            try:
                if self.tls and not (self.data_dir / "tls.crt").exists():
                    raise aiohttp.ClientError("no certificate yet")
                async with session.get(f"{self.url}/v1/fleet", ssl=self.ssl) as response:
                    if response.status == 200:
                        return str((await response.json())["root_key"])
            except (aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the hub did not answer within {timeout_s:g}s: {self.logs()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def logs(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
