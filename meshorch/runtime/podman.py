"""A runtime of podman containers (``podman --runtime runc``).

Every call is ``podman --root R --runroot RR --tmpdir RR/libpod-tmp
--network-config-dir R/networks --runtime runc ...``: each runtime object (each
lab host) has storage and libpod state of its own, so images really have to be
replicated between hosts, and nothing leaks into the machine's default podman
storage. ``--tmpdir`` and ``--network-config-dir`` are private too because
``podman system reset`` (used by :meth:`PodmanRuntime.purge`) deletes them.

Containers are named ``meshorch-{id}`` and labelled ``meshorch.instance={id}``
and ``meshorch.spec={spec hash}``; :meth:`PodmanRuntime.list` sees only those, so
a new runtime object (agent restart) adopts the running containers of an earlier
one. They keep running when the agent stops: :meth:`PodmanRuntime.close` does
nothing.

Each container gets ``--ulimit nofile=1024:1024 --ulimit nproc=1024:1024``
(without them runc cannot set the rlimits on the lab hosts), ``--pull never``
(no registry: a missing image is an :class:`ImageError` at once, not a slow
pull), the ``k8s-file`` log driver (``podman logs`` works without journald) writing
to ``logs_dir/meshorch-{id}.log`` (default ``R/meshorch-logs``; a replaced container
appends to the same file, conmon rotates it at 10 MB by replacing it, :meth:`remove`
deletes it; :meth:`PodmanRuntime.log_files` names it for log capture),
``--memory`` with ``--memory-swap`` equal to it (the limit is hard, swap does not
extend it) and ``--cpus`` (clamped to the host's CPU count).

Network: ``isolated`` by default: every container gets a network namespace of its own
on a bridge of this runtime, one bridge per tenant uid (``--user``), named
:func:`bridge_name` (``mo-u{uid}``; ``mo-shared`` for containers without a user). The
runtime writes each network's CNI config itself, on the first container that needs it:
podman picks a free subnet (``podman network create``), the runtime then renames the
bridge so that packet filters can tell tenants apart by interface. The bridge
masquerades outgoing traffic, so other hosts see this host's address. The network backend
is CNI (``--network-backend cni``; Debian: ``containernetworking-plugins``). Ports are
published with ``-p HOST:CONTAINER`` on every address of the host (``host_port``
defaults to ``container_port``, so an instance is still reached at its host's address
and its container port, and at ``127.0.0.1`` from the host itself: probes). A container
cannot reach the host's loopback; it reaches the host's other addresses and other
hosts through the bridge, which ``meshorch.net.app_network`` filters (agent ports,
other tenants). ``network="host"`` keeps the host's network (ports cannot be
remapped: a ``host_port`` different from the ``container_port`` is rejected); another
name is an existing podman network, ports published with ``-p``. A container whose
network is not the one wanted is replaced (label ``meshorch.network``; none: an earlier
release's, on the host's network); one on the host's network where it should not be, or
the other way round, is listed with no spec hash, so the reconciler starts it again.
:meth:`PodmanRuntime.purge` deletes the bridges with the networks.

The spec's files are written under ``files_dir/meshorch-{id}/`` (default
``R/meshorch-files``) and bind-mounted read-only; the environment goes through a
mode-0600 ``--env-file`` so values do not appear on podman's command line.

Secrets (docs/secrets.md): ``secrets_dir`` (on tmpfs, written by the agent) is
bind-mounted read-only at ``/run/secrets``; ``secret_env`` goes through a second
env file written next to it on tmpfs, deleted as soon as ``podman run`` returns.
Podman itself records a container's environment in its container config under its
``--root``: secrets wanted at rest nowhere should be files, not ``env``.

``exec`` timeout: the podman client is killed; a process it started inside the
container may live on until it finishes by itself.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import ipaddress
import logging
import math
import os
import re
import shutil
import socket
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from meshorch.runtime._proc import CommandResult, CommandTimeout, run_command
from meshorch.runtime.base import (
    BRIDGE_PREFIX,
    LABEL_INSTANCE,
    LABEL_SPEC,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    LogFile,
    LogFormat,
    bridge_name,
    instance_name,
)
from meshorch.runtime.errors import (
    ExecTimeout,
    ImageError,
    InstanceError,
    InstanceNotFound,
    InvalidSpec,
    RuntimeBackendError,
    RuntimeUnavailable,
)

logger = logging.getLogger(__name__)

DEFAULT_ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
DEFAULT_LOG_MAX_SIZE = "10mb"

_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B  # linux/sockios.h
_CNI_ADDRESSES = Path("/var/lib/cni/networks")  # host-local IPAM: one directory per network
ISOLATED = "isolated"
LABEL_NETWORK = "meshorch.network"
_NETWORK_PREFIX = "meshorch-"
_RUNNING_STATES = frozenset({"running", "paused", "stopping"})
_ENV_FILE_MAX_LINE = 60_000  # podman reads env files with a 64 KiB line scanner
SECRETS_MOUNT = "/run/secrets"


def _write_secret_env(spec: InstanceSpec) -> Path | None:
    """The secret environment as an env file on tmpfs next to the secrets dir (0600)."""
    if not spec.secret_env:
        return None
    if spec.secrets_dir is None:
        raise InvalidSpec(f"{spec.instance_id}: secret_env needs a secrets_dir (on tmpfs)")
    lines = []
    for key, value in spec.secret_env.items():
        if "\n" in value or "\r" in value or len(key) + len(value) + 1 > _ENV_FILE_MAX_LINE:
            raise InvalidSpec(f"{spec.instance_id}: secret {key} cannot go in an env file")
        lines.append(f"{key}={value}")
    path = Path(spec.secrets_dir + ".env")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


_NO_SUCH_CONTAINER = "no such container"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _bridge_subnet(bridge: str) -> tuple[str, str] | None:
    """The IPv4 subnet and address of ``bridge`` in this network namespace, if it exists."""
    if not Path("/sys/class/net", bridge).exists():
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("256s", bridge.encode())
            address = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)[20:24]
            mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)[20:24]
        except OSError:
            return None
    gateway = ipaddress.IPv4Address(address)
    network = ipaddress.IPv4Network(f"{gateway}/{ipaddress.IPv4Address(mask)}", strict=False)
    return str(network), str(gateway)


def _forget_addresses(network: str) -> None:
    """Delete the CNI address book of ``network`` once no address in it is taken (it is
    shared by the runtimes of every namespace on the machine)."""
    book = _CNI_ADDRESSES / network
    with contextlib.suppress(OSError):
        if all(
            entry.name == "lock" or entry.name.startswith("last_reserved_ip")
            for entry in book.iterdir()
        ):
            shutil.rmtree(book)


def _rename_bridge(path: Path, bridge: str) -> None:
    """Give the bridge of a CNI config written by ``podman network create`` our name."""
    config = orjson.loads(path.read_bytes())
    plugins = [p for p in config.get("plugins", ()) if p.get("type") == "bridge"]
    if len(plugins) != 1:
        raise RuntimeBackendError(f"{path}: expected one bridge plugin, found {len(plugins)}")
    plugins[0]["bridge"] = bridge
    existing = _bridge_subnet(bridge)
    if existing is not None:
        # Another runtime in this network namespace (tests) made the bridge: its subnet,
        # or CNI refuses to give the bridge a second address.
        subnet, gateway = existing
        plugins[0]["ipam"]["ranges"] = [[{"subnet": subnet, "gateway": gateway}]]
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    partial.replace(path)


def _resolve_executable(name: str, what: str) -> str:
    if "/" in name:
        path = Path(name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise RuntimeUnavailable(f"{what} {name!r} is not an executable file")
    found = shutil.which(name)
    if found is None:
        raise RuntimeUnavailable(
            f"{what} {name!r} not found on PATH (Debian: apt-get install podman runc)"
        )
    return found


def _archive_kind(path: Path) -> str:
    """``docker-archive``, ``oci-archive``, ``oci-dir`` (an OCI image layout directory)
    or ``rootfs`` (a plain filesystem tarball)."""
    if path.is_dir():
        if (path / "oci-layout").is_file() and (path / "index.json").is_file():
            return "oci-dir"
        raise ImageError(str(path), f"{path} is a directory but not an OCI image layout")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(str(path), f"cannot read image archive {path}: {exc}") from exc
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    return "rootfs"


def _unix_time(value: Any) -> float | None:
    # podman reports "never" as Go's zero time, a large negative Unix time.
    if isinstance(value, int | float) and value > 0:
        return float(value)
    return None


def _mount_points_under(*dirs: Path) -> builtins.list[str]:
    roots = [str(d.resolve()) for d in dirs]
    points: builtins.list[str] = []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 2:
                continue
            # /proc/self/mounts escapes space, tab, newline and backslash as octal.
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
            if any(point == r or point.startswith(r + "/") for r in roots):
                points.append(point)
    # Deepest first, so nested mounts come off before their parents.
    return sorted(points, key=len, reverse=True)


class PodmanRuntime:
    """Runs instances as podman containers; see the module docstring."""

    name = "podman"

    def __init__(
        self,
        root: Path,
        runroot: Path,
        runtime: str = "runc",
        *,
        network: str = ISOLATED,
        files_dir: Path | None = None,
        logs_dir: Path | None = None,
        podman: str = "podman",
        ulimits: Sequence[str] = DEFAULT_ULIMITS,
        command_timeout_s: float = 120.0,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.runroot = Path(runroot)
        self.files_dir = Path(files_dir) if files_dir is not None else self.root / "meshorch-files"
        self.logs_dir = Path(logs_dir) if logs_dir is not None else self.root / "meshorch-logs"
        for path in (self.root, self.runroot, self.files_dir, self.logs_dir):
            # podman -v splits on ':' and --mount on ','.
            if not path.is_absolute() or ":" in str(path) or "," in str(path):
                raise RuntimeUnavailable(f"{path}: podman paths must be absolute, without : or ,")
        self.network = network
        self.ulimits = tuple(ulimits)
        self.command_timeout_s = command_timeout_s
        self.podman_path = _resolve_executable(podman, "podman")
        self.runtime_path = _resolve_executable(runtime, "OCI runtime")
        # Commands for another network namespace (a lab host's, from outside): CNI cleans
        # up a container's network where it made it.
        self.command_prefix = tuple(command_prefix)
        self._base = [
            *self.command_prefix,
            self.podman_path,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(self.runroot / "libpod-tmp"),
            "--network-config-dir",
            str(self.root / "networks"),
            "--runtime",
            self.runtime_path,
        ]
        if network == ISOLATED:
            # The network configs this runtime writes are CNI's (podman 4 picks netavark
            # when it is installed).
            at = len(self.command_prefix) + 1
            self._base[at:at] = ["--network-backend", "cni"]
        self._locks: dict[str, asyncio.Lock] = {}
        self._network_lock = asyncio.Lock()
        self._networks: set[str] = set()  # isolated networks known to exist

    # --- helpers --------------------------------------------------------------

    async def _podman(
        self,
        *args: str,
        timeout_s: float | None = None,
        merge_stderr: bool = False,
    ) -> CommandResult:
        argv = [*self._base, *args]
        logger.debug("podman %s", " ".join(args))
        self.runroot.mkdir(parents=True, exist_ok=True)
        try:
            return await run_command(
                argv,
                timeout_s=timeout_s if timeout_s is not None else self.command_timeout_s,
                merge_stderr=merge_stderr,
                # conmon inherits it and writes an "oom" marker there when a container
                # is OOM-killed: keep that in the runtime's own directory.
                cwd=self.runroot,
            )
        except FileNotFoundError as exc:
            raise RuntimeUnavailable(f"cannot run {self.podman_path}: {exc}") from exc

    async def _podman_ok(self, *args: str, timeout_s: float | None = None) -> CommandResult:
        try:
            result = await self._podman(*args, timeout_s=timeout_s)
        except CommandTimeout as exc:
            raise RuntimeBackendError(f"podman {args[0]}: {exc}") from exc
        if result.returncode != 0:
            raise RuntimeBackendError(f"podman {args[0]} failed: {result.stderr_text}")
        return result

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    async def _inspect(self, name: str) -> dict[str, Any] | None:
        result = await self._podman("container", "inspect", name)
        if result.returncode != 0:
            if _NO_SUCH_CONTAINER in result.stderr_text:
                return None
            raise RuntimeBackendError(f"podman inspect {name}: {result.stderr_text}")
        data = orjson.loads(result.stdout)
        if not isinstance(data, builtins.list) or not data:
            return None
        first: dict[str, Any] = data[0]
        return first

    async def inspect(self, instance_id: str) -> dict[str, Any]:
        """``podman container inspect`` of the instance (for diagnostics and tests)."""
        data = await self._inspect(instance_name(instance_id))
        if data is None:
            raise InstanceNotFound(instance_id, f"no container for {instance_id!r}")
        return data

    async def _rm(self, name: str, stop_timeout_s: float) -> None:
        result = await self._podman(
            "rm",
            "--force",
            "--time",
            str(math.ceil(stop_timeout_s)),
            name,
            timeout_s=stop_timeout_s + self.command_timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeBackendError(f"podman rm {name}: {result.stderr_text}")

    def network_of(self, spec: InstanceSpec) -> str:
        """The podman network ``spec`` runs on."""
        if self.network != ISOLATED:
            return self.network
        return _NETWORK_PREFIX + bridge_name(spec.user).removeprefix(BRIDGE_PREFIX)

    def _network_file(self, name: str) -> Path:
        return self.root / "networks" / f"{name}.conflist"

    async def _ensure_network(self, spec: InstanceSpec) -> None:
        """Create the isolated network of ``spec`` unless it exists (see the module doc)."""
        if self.network != ISOLATED:
            return
        name = self.network_of(spec)
        if name in self._networks:
            return
        async with self._network_lock:
            path = self._network_file(name)
            if not path.exists():
                bridge = bridge_name(spec.user)
                await self._podman_ok(
                    "network", "create", "--label", "meshorch=1", "--disable-dns", name
                )
                await asyncio.to_thread(_rename_bridge, path, bridge)
                logger.info("created network %s (bridge %s)", name, bridge)
            self._networks.add(name)

    def _check_spec(self, spec: InstanceSpec) -> None:
        if self.network == "host":
            for port in spec.ports:
                if port.host_port not in (None, port.container_port):
                    raise InvalidSpec(
                        f"{spec.instance_id}: with host networking port {port.container_port} "
                        f"cannot be published as {port.host_port}"
                    )
        for spec_file in spec.files:
            if ":" in spec_file.path or "," in spec_file.path:
                raise InvalidSpec(f"{spec.instance_id}: podman cannot mount {spec_file.path!r}")

    def _write_instance_dir(
        self, spec: InstanceSpec
    ) -> tuple[Path | None, builtins.list[str], builtins.list[tuple[Path, str]]]:
        """Write files and env-file; return (env file, env args, (host, container) mounts)."""
        directory = self.files_dir / spec.name
        shutil.rmtree(directory, ignore_errors=True)
        self.logs_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        (directory / "files").mkdir(parents=True, mode=0o700)
        mounts: builtins.list[tuple[Path, str]] = []
        # Stored by index: the host path then never needs escaping.
        for index, spec_file in enumerate(spec.files):
            host_path = directory / "files" / str(index)
            host_path.write_bytes(spec_file.content)
            host_path.chmod(0o644)
            mounts.append((host_path, spec_file.path))
        lines: builtins.list[str] = []
        env_args: builtins.list[str] = []
        for key, value in spec.env.items():
            line = f"{key}={value}"
            if "\n" in value or "\r" in value or len(line) > _ENV_FILE_MAX_LINE:
                env_args += ["--env", line]  # an env file cannot hold these
            else:
                lines.append(line)
        env_file: Path | None = None
        if lines:
            env_file = directory / "env"
            fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return env_file, env_args, mounts

    def _run_args(
        self,
        spec: InstanceSpec,
        spec_hash: str,
        env_file: Path | None,
        env_args: Sequence[str],
        mounts: Sequence[tuple[Path, str]],
        secret_env_file: Path | None = None,
    ) -> builtins.list[str]:
        args = [
            "run",
            "--detach",
            "--name",
            spec.name,
            "--label",
            f"{LABEL_INSTANCE}={spec.instance_id}",
            "--label",
            f"{LABEL_SPEC}={spec_hash}",
            "--pull",
            "never",
            "--log-driver",
            "k8s-file",
            "--log-opt",
            f"max-size={DEFAULT_LOG_MAX_SIZE}",
            "--log-opt",
            f"path={self._log_path(spec.instance_id)}",
            "--network",
            self.network_of(spec),
            "--label",
            f"{LABEL_NETWORK}={self.network_of(spec)}",
        ]
        for key, value in spec.labels.items():
            args += ["--label", f"{key}={value}"]
        if self.network != "host":
            for port in spec.ports:
                # The same port on the host by default: instances are found at their
                # host's address and their container port.
                host_port = port.container_port if port.host_port is None else port.host_port
                args += ["--publish", f"{host_port}:{port.container_port}/{port.protocol}"]
        for server in spec.dns_servers:
            args += ["--dns", server]
        for domain in spec.dns_search:
            args += ["--dns-search", domain]
        if spec.user is not None:
            args += ["--user", f"{spec.user}:{spec.user}"]
        for ulimit in self.ulimits:
            args += ["--ulimit", ulimit]
        if spec.memory_limit_bytes is not None:
            limit = str(spec.memory_limit_bytes)
            args += ["--memory", limit, "--memory-swap", limit]
        if spec.cpu_limit is not None:
            cpus = min(spec.cpu_limit, float(os.cpu_count() or 1))
            args += ["--cpus", f"{cpus:.3f}"]
        if env_file is not None:
            args += ["--env-file", str(env_file)]
        args += env_args
        for host_path, container_path in mounts:
            args += ["--volume", f"{host_path}:{container_path}:ro"]
        if spec.secrets_dir is not None:
            args += ["--volume", f"{spec.secrets_dir}:{SECRETS_MOUNT}:ro"]
        if secret_env_file is not None:
            args += ["--env-file", str(secret_env_file)]
        args.append(spec.image)
        args += spec.command
        return args

    # --- Runtime ----------------------------------------------------------------

    async def start(self, spec: InstanceSpec, stop_timeout_s: float = 10) -> None:
        """Run ``spec``; an exited container or one of another spec is replaced.

        ``stop_timeout_s`` bounds the graceful stop of a container being replaced.
        """
        self._check_spec(spec)
        spec_hash = spec.spec_hash
        async with self._lock(spec.instance_id):
            existing = await self._inspect(spec.name)
            if existing is not None:
                labels = (existing.get("Config") or {}).get("Labels") or {}
                status = (existing.get("State") or {}).get("Status")
                same = labels.get(LABEL_SPEC) == spec_hash
                same = same and labels.get(LABEL_NETWORK, "host") == self.network_of(spec)
                if status in _RUNNING_STATES and same:
                    return
                logger.info("replacing container %s (state %s)", spec.name, status)
                await self._rm(spec.name, stop_timeout_s)
            await self._ensure_network(spec)
            env_file, env_args, mounts = await asyncio.to_thread(self._write_instance_dir, spec)
            secret_env_file = await asyncio.to_thread(_write_secret_env, spec)
            args = self._run_args(spec, spec_hash, env_file, env_args, mounts, secret_env_file)
            try:
                result = await self._podman(*args)
            except CommandTimeout as exc:
                await self._rm(spec.name, 0)
                raise InstanceError(spec.instance_id, f"podman run: {exc}") from exc
            finally:
                if secret_env_file is not None:
                    secret_env_file.unlink(missing_ok=True)
            if result.returncode != 0:
                # A failed run can leave a created container behind; start clean next time.
                await self._rm(spec.name, 0)
                message = f"podman run {spec.name} failed: {result.stderr_text}"
                if "image not known" in result.stderr_text:
                    raise ImageError(spec.image, message)
                raise InstanceError(spec.instance_id, message)
            logger.info("started container %s (%s)", spec.name, spec.image)

    async def stop(self, instance_id: str, timeout_s: float = 10) -> None:
        name = instance_name(instance_id)
        async with self._lock(instance_id):
            try:
                result = await self._podman(
                    "stop",
                    "--time",
                    str(math.ceil(timeout_s)),
                    name,
                    timeout_s=timeout_s + self.command_timeout_s,
                )
            except CommandTimeout as exc:
                raise InstanceError(instance_id, f"podman stop: {exc}") from exc
            if result.returncode != 0 and _NO_SUCH_CONTAINER not in result.stderr_text:
                raise InstanceError(instance_id, f"podman stop {name}: {result.stderr_text}")

    async def remove(self, instance_id: str) -> None:
        name = instance_name(instance_id)
        async with self._lock(instance_id):
            await self._rm(name, 0)
            await asyncio.to_thread(shutil.rmtree, self.files_dir / name, ignore_errors=True)
            # podman rm leaves a log file at an explicit path behind.
            self._log_path(instance_id).unlink(missing_ok=True)

    async def list(self) -> builtins.list[InstanceStatus]:
        result = await self._podman_ok(
            "ps", "--all", "--filter", f"label={LABEL_INSTANCE}", "--format", "json"
        )
        containers = orjson.loads(result.stdout) if result.stdout.strip() else []
        statuses: builtins.list[InstanceStatus] = []
        for c in containers:
            labels = c.get("Labels") or {}
            instance_id = labels.get(LABEL_INSTANCE)
            names = c.get("Names") or []
            # Only what we created: the label and the name must agree.
            if not instance_id or instance_name(instance_id) not in names:
                continue
            state = str(c.get("State", ""))
            if state == "removing":
                continue
            running = state in _RUNNING_STATES
            exited = state in ("exited", "stopped")
            pid = c.get("Pid")
            spec_hash = labels.get(LABEL_SPEC)
            if (labels.get(LABEL_NETWORK, "host") == "host") != (self.network == "host"):
                # On the host's network and should not be, or the other way round (an
                # earlier release's has no label): a spec unknown to the reconciler, which
                # starts it again, so :meth:`start` replaces it.
                spec_hash = None
            statuses.append(
                InstanceStatus(
                    instance_id=instance_id,
                    state=InstanceState.RUNNING if running else InstanceState.EXITED,
                    spec_hash=spec_hash,
                    image=c.get("Image"),
                    exit_code=int(c.get("ExitCode", 0)) if exited else None,
                    started_at=_unix_time(c.get("StartedAt")),
                    finished_at=None if running else _unix_time(c.get("ExitedAt")),
                    pid=pid if running and isinstance(pid, int) and pid > 0 else None,
                )
            )
        return statuses

    async def exec(self, instance_id: str, argv: Sequence[str], timeout_s: float) -> int:
        if not argv:
            raise InvalidSpec("exec needs a command")
        try:
            result = await self._podman(
                "exec", instance_name(instance_id), *argv, timeout_s=timeout_s
            )
        except CommandTimeout as exc:
            raise ExecTimeout(instance_id, f"exec in {instance_id}: {exc}") from exc
        # 125 is podman's own failure; the command's 125 would come without "Error:".
        if result.returncode == 125 and result.stderr_text.startswith("Error:"):
            if _NO_SUCH_CONTAINER in result.stderr_text:
                raise InstanceNotFound(instance_id, f"no container for {instance_id!r}")
            raise InstanceError(instance_id, f"podman exec: {result.stderr_text}")
        return result.returncode

    async def logs(self, instance_id: str, tail: int) -> str:
        if tail <= 0:
            return ""
        try:
            result = await self._podman(
                "logs", "--tail", str(tail), instance_name(instance_id), merge_stderr=True
            )
        except CommandTimeout as exc:
            raise InstanceError(instance_id, f"podman logs: {exc}") from exc
        text = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            if _NO_SUCH_CONTAINER in text:
                raise InstanceNotFound(instance_id, f"no container for {instance_id!r}")
            raise InstanceError(instance_id, f"podman logs: {text.strip()}")
        return text

    def _log_path(self, instance_id: str) -> Path:
        return self.logs_dir / f"{instance_name(instance_id)}.log"

    def log_files(self, instance_id: str) -> builtins.list[LogFile]:
        return [LogFile(self._log_path(instance_id), LogFormat.K8S_FILE)]

    async def has_image(self, ref: str) -> bool:
        result = await self._podman("image", "exists", ref)
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise ImageError(ref, f"podman image exists {ref}: {result.stderr_text}")

    async def image_names(self) -> builtins.list[str]:
        result = await self._podman("images", "--noheading", "--format", "{{.Repository}}:{{.Tag}}")
        if result.returncode != 0:
            raise ImageError("", f"podman images: {result.stderr_text}")
        return [n for n in result.stdout.decode().split() if not n.endswith(":<none>")]

    async def remove_image(self, ref: str) -> bool:
        """``podman rmi`` without force: an image a container uses is kept (False)."""
        result = await self._podman("rmi", ref)
        if result.returncode == 0 or "image not known" in result.stderr_text:
            return True
        if "image is in use" in result.stderr_text or "in use by" in result.stderr_text:
            return False
        raise ImageError(ref, f"podman rmi {ref}: {result.stderr_text}")

    async def load_image(self, archive_path: Path, ref: str) -> None:
        """Load ``ref`` from a docker/OCI archive (``podman save``), an OCI image layout
        directory or a rootfs tarball."""
        archive_path = Path(archive_path)
        kind = await asyncio.to_thread(_archive_kind, archive_path)
        if kind == "rootfs":
            await self.import_rootfs(archive_path, ref)
            return
        try:
            result = await self._podman("load", "--input", str(archive_path))
        except CommandTimeout as exc:
            raise ImageError(ref, f"podman load {archive_path}: {exc}") from exc
        if result.returncode != 0:
            raise ImageError(ref, f"podman load {archive_path}: {result.stderr_text}")
        loaded: builtins.list[str] = []
        for line in result.stdout.decode(errors="replace").splitlines():
            if line.startswith("Loaded image"):
                loaded += [n.strip() for n in line.split(":", 1)[1].split(",") if n.strip()]
        if not loaded:
            raise ImageError(ref, f"podman load {archive_path} reported no image")
        if ref not in loaded:
            tag = await self._podman("tag", loaded[0], ref)
            if tag.returncode != 0:
                raise ImageError(ref, f"podman tag {loaded[0]} {ref}: {tag.stderr_text}")
        logger.info("loaded image %s from %s (%s)", ref, archive_path, kind)

    async def import_rootfs(self, tar_path: Path, ref: str) -> str:
        """Create image ``ref`` from a filesystem tarball; returns the image id."""
        try:
            result = await self._podman("import", "--quiet", str(tar_path), ref)
        except CommandTimeout as exc:
            raise ImageError(ref, f"podman import {tar_path}: {exc}") from exc
        if result.returncode != 0:
            raise ImageError(ref, f"podman import {tar_path}: {result.stderr_text}")
        image_id = result.stdout.decode().strip().splitlines()[-1]
        logger.info("imported %s as %s (%s)", tar_path, ref, image_id)
        return image_id

    async def save_image(self, ref: str, archive_path: Path) -> None:
        """Write ``ref`` as a docker-archive (what :meth:`load_image` reads on a peer)."""
        archive_path = Path(archive_path)
        partial = archive_path.with_name(archive_path.name + ".partial")
        partial.unlink(missing_ok=True)
        try:
            result = await self._podman(
                "save", "--format", "docker-archive", "--output", str(partial), ref
            )
        except CommandTimeout as exc:
            raise ImageError(ref, f"podman save {ref}: {exc}") from exc
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageError(ref, f"podman save {ref}: {result.stderr_text}")
        # Readers never see a half-written archive.
        partial.replace(archive_path)

    def _bridges(self) -> builtins.list[str]:
        """The bridges of this runtime's isolated networks."""
        found = []
        for path in sorted((self.root / "networks").glob(f"{_NETWORK_PREFIX}*.conflist")):
            try:
                config = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            for plugin in config.get("plugins", ()):
                bridge = plugin.get("bridge") if isinstance(plugin, dict) else None
                if isinstance(bridge, str) and bridge.startswith(BRIDGE_PREFIX):
                    found.append(bridge)
        return found

    async def close(self) -> None:
        """Nothing to release: containers outlive the agent and are adopted by label."""

    async def purge(self) -> None:
        """Destroy everything of this runtime: containers, images, storage directories.

        For tests and lab teardown. ``podman system reset`` unmounts what the
        storage driver mounted; anything left under the directories is unmounted
        before they are deleted.
        """
        bridges = await asyncio.to_thread(self._bridges)
        if self.root.exists():
            await self._podman("rm", "--all", "--force", "--time", "0")
            reset = await self._podman("system", "reset", "--force")
            if reset.returncode != 0:
                logger.warning("podman system reset: %s", reset.stderr_text)
        for bridge in bridges:  # CNI leaves a bridge behind when its last container goes
            # Here, only when no other runtime's container is on it (tests); in another
            # namespace (a lab host's) this runtime is its only one.
            ports = Path("/sys/class/net", bridge, "brif")
            unused = ports.is_dir() and not any(ports.iterdir())
            if self.command_prefix or unused:
                await run_command(
                    [*self.command_prefix, "ip", "link", "delete", bridge], timeout_s=30
                )
            await asyncio.to_thread(
                _forget_addresses, _NETWORK_PREFIX + bridge.removeprefix(BRIDGE_PREFIX)
            )
        self._networks.clear()
        for point in await asyncio.to_thread(_mount_points_under, self.root, self.runroot):
            result = await run_command(["umount", "--lazy", point], timeout_s=30)
            if result.returncode != 0:
                logger.warning("umount %s: %s", point, result.stderr_text)
        for path in (self.files_dir, self.logs_dir, self.root, self.runroot):
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
