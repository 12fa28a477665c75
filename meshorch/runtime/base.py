"""The interface every runtime implements, and the types it speaks.

A runtime runs *instances*: one process tree (a container, or a plain process
group) per :class:`InstanceSpec`. Runtimes are driven by the agent's reconciler,
so every mutating call is idempotent:

- ``start(spec)`` with an instance already running the same spec (same
  :attr:`InstanceSpec.spec_hash`) does nothing; one running a different spec, or
  one that has exited, is replaced.
- ``stop(id)`` of an unknown or exited instance does nothing. A stopped instance
  stays listed (state ``exited``, with its exit code and logs) until ``remove``.
- ``remove(id)`` of an unknown instance does nothing.

A runtime only ever sees and touches instances it created: their names start
with :data:`NAME_PREFIX`.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import math
import posixpath
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import orjson

from meshorch.runtime.errors import InvalidSpec

NAME_PREFIX = "meshorch-"
"""Prefix of every container/directory name a runtime manages."""

LABEL_INSTANCE = "meshorch.instance"
LABEL_SPEC = "meshorch.spec"
RESERVED_LABEL_PREFIX = "meshorch."

SPEC_HASH_VERSION = 1

_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DOMAIN_RE = re.compile(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

PortProtocol = Literal["tcp", "udp"]


class PortMapping(NamedTuple):
    """A port the instance listens on; ``host_port`` None lets the runtime choose."""

    host_port: int | None
    container_port: int
    protocol: PortProtocol = "tcp"


class SpecFile(NamedTuple):
    """A file made available read-only inside the instance at absolute ``path``."""

    path: str
    content: bytes


def instance_name(instance_id: str) -> str:
    """The name a runtime gives the instance (container name, directory name)."""
    return NAME_PREFIX + instance_id


# The bridges of the podman runtime's isolated networks (here, not in
# meshorch.runtime.podman: the app network names them on hosts running processes too).
BRIDGE_PREFIX = "mo-"


def bridge_name(user: int | None) -> str:
    """The bridge of an isolated runtime's containers running as ``user`` (at most 15
    characters, an interface name's limit)."""
    return f"{BRIDGE_PREFIX}shared" if user is None else f"{BRIDGE_PREFIX}u{user}"


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to run one instance.

    ``image`` is a container image reference (ignored by the process runtime);
    ``command`` the argv (empty: the image's default, podman only);
    ``cpu_limit`` in cores; ``memory_limit_bytes`` a hard limit. Construction
    validates and raises :class:`InvalidSpec`; plain tuples are accepted for
    ``ports`` and ``files`` and normalised to :class:`PortMapping`/:class:`SpecFile`.

    Secrets (docs/secrets.md): ``secrets_dir`` is a host directory (on tmpfs) holding the
    instance's secret files, mounted read-only at ``/run/secrets`` by podman and named by
    ``$MESHORCH_SECRETS_DIR`` for a process; ``secret_env`` are environment variables
    whose values are secret. Neither value enters :attr:`spec_hash` (only the variable
    names and ``secrets_tag``, an opaque label of the secrets' versions), and a runtime
    never writes ``secret_env`` below its state directory.
    """

    instance_id: str
    image: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    ports: tuple[PortMapping, ...] = ()
    files: tuple[SpecFile, ...] = ()
    cpu_limit: float | None = None
    memory_limit_bytes: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    secrets_dir: str | None = None
    secret_env: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    secrets_tag: str = ""
    # Site networking (podman): the site DNS servers and search domain, and the uid
    # the instance runs as (its tenant's: tenant isolation matches on it).
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    user: int | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ so callers may
        # pass lists, dicts and plain tuples but the spec stays immutable.
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", _frozen_mapping(self.env))
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        object.__setattr__(self, "secret_env", _frozen_mapping(self.secret_env))
        object.__setattr__(self, "ports", tuple(PortMapping(*p) for p in self.ports))
        object.__setattr__(self, "files", tuple(SpecFile(*f) for f in self.files))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidSpec` unless every field is usable by a runtime."""
        if not _INSTANCE_ID_RE.fullmatch(self.instance_id):
            raise InvalidSpec(
                f"instance id {self.instance_id!r} must match {_INSTANCE_ID_RE.pattern}"
            )
        if not self.image or any(c.isspace() for c in self.image):
            raise InvalidSpec(f"{self.instance_id}: bad image reference {self.image!r}")
        for arg in self.command:
            if not isinstance(arg, str) or "\0" in arg:
                raise InvalidSpec(f"{self.instance_id}: bad command argument {arg!r}")
        for key, value in self.env.items():
            if not _ENV_NAME_RE.fullmatch(key) or "\0" in value:
                raise InvalidSpec(f"{self.instance_id}: bad environment variable {key!r}")
        for key, value in self.secret_env.items():
            if not _ENV_NAME_RE.fullmatch(key) or "\0" in value or key in self.env:
                raise InvalidSpec(f"{self.instance_id}: bad secret environment variable {key!r}")
        if self.secrets_dir is not None and (
            not self.secrets_dir.startswith("/")
            or posixpath.normpath(self.secrets_dir) != self.secrets_dir
            or any(c in self.secrets_dir for c in ":,\0")
        ):
            raise InvalidSpec(f"{self.instance_id}: bad secrets directory {self.secrets_dir!r}")
        seen_ports: set[tuple[int, str]] = set()
        for port in self.ports:
            if port.protocol not in ("tcp", "udp"):
                raise InvalidSpec(f"{self.instance_id}: bad protocol {port.protocol!r}")
            for number in (port.container_port, port.host_port):
                if number is not None and not (isinstance(number, int) and 1 <= number <= 65535):
                    raise InvalidSpec(f"{self.instance_id}: bad port {number!r}")
            port_key = (port.container_port, port.protocol)
            if port_key in seen_ports:
                raise InvalidSpec(f"{self.instance_id}: port {port_key} given twice")
            seen_ports.add(port_key)
        seen_paths: set[str] = set()
        for spec_file in self.files:
            path = spec_file.path
            if (
                not path.startswith("/")
                or posixpath.normpath(path) != path
                or path == "/"
                or "\0" in path
            ):
                raise InvalidSpec(f"{self.instance_id}: file path {path!r} must be absolute")
            if not isinstance(spec_file.content, bytes):
                raise InvalidSpec(f"{self.instance_id}: content of {path} must be bytes")
            if path in seen_paths:
                raise InvalidSpec(f"{self.instance_id}: file {path} given twice")
            seen_paths.add(path)
        if self.cpu_limit is not None and not (
            math.isfinite(self.cpu_limit) and self.cpu_limit > 0
        ):
            raise InvalidSpec(f"{self.instance_id}: cpu_limit must be > 0")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes <= 0:
            raise InvalidSpec(f"{self.instance_id}: memory_limit_bytes must be > 0")
        for key in self.labels:
            if not key or key.startswith(RESERVED_LABEL_PREFIX) or "=" in key:
                raise InvalidSpec(f"{self.instance_id}: bad or reserved label {key!r}")
        for server in self.dns_servers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise InvalidSpec(f"{self.instance_id}: DNS server {server!r} is no IP") from None
        for domain in self.dns_search:
            if not _DOMAIN_RE.fullmatch(domain):
                raise InvalidSpec(f"{self.instance_id}: bad DNS search domain {domain!r}")
        if self.user is not None and not (isinstance(self.user, int) and 0 < self.user < 2**31):
            raise InvalidSpec(f"{self.instance_id}: user must be a uid > 0, got {self.user!r}")

    @property
    def name(self) -> str:
        """The runtime-level name: ``meshorch-{instance_id}``."""
        return instance_name(self.instance_id)

    @property
    def spec_hash(self) -> str:
        """A stable hex digest of the spec: equal specs hash equal across processes."""
        canonical = {
            "v": SPEC_HASH_VERSION,
            "instance_id": self.instance_id,
            "image": self.image,
            "command": list(self.command),
            "env": dict(self.env),
            "ports": [[p.host_port, p.container_port, p.protocol] for p in self.ports],
            "files": [[f.path, hashlib.sha256(f.content).hexdigest()] for f in self.files],
            "cpu_limit": self.cpu_limit,
            "memory_limit_bytes": self.memory_limit_bytes,
            "labels": dict(self.labels),
        }
        if self.secrets_dir is not None or self.secret_env or self.secrets_tag:
            canonical["secrets"] = [self.secrets_dir, sorted(self.secret_env), self.secrets_tag]
        if self.dns_servers or self.dns_search or self.user is not None:
            # Only when set: instances without site networking keep their hash.
            canonical["network"] = [list(self.dns_servers), list(self.dns_search), self.user]
        encoded = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(encoded).hexdigest()


class LogFormat(StrEnum):
    """How a runtime writes an instance's output file."""

    RAW = "raw"
    """The bytes exactly as the instance wrote them, one stream per file."""
    K8S_FILE = "k8s-file"
    """Podman's k8s-file driver: ``<RFC3339Nano time> stdout|stderr F|P <text>`` per
    record; ``P`` is a chunk of a line continued by the next record of that stream."""


LogStream = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class LogFile:
    """A file an instance's output goes to; ``stream`` is set for :attr:`LogFormat.RAW`."""

    path: Path
    format: LogFormat
    stream: LogStream | None = None


@runtime_checkable
class LogFileSource(Protocol):
    """A runtime whose instances' output can be followed in files (log capture).

    A file is only appended to, except that it may be replaced by a new file at the
    same path (rotation, an instance replaced) or removed with the instance.
    """

    def log_files(self, instance_id: str) -> builtins.list[LogFile]:
        """Where the instance's output goes; computed, the files need not exist yet."""
        ...


class InstanceState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """What a runtime knows about one of its instances. Times are Unix seconds."""

    instance_id: str
    state: InstanceState
    spec_hash: str | None = None
    image: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None

    @property
    def running(self) -> bool:
        return self.state is InstanceState.RUNNING


@runtime_checkable
class Runtime(Protocol):
    """What the agent needs from a container or process runtime.

    Implementations: :class:`~meshorch.runtime.podman.PodmanRuntime`,
    :class:`~meshorch.runtime.process.ProcessRuntime`.
    """

    name: str

    async def start(self, spec: InstanceSpec) -> None:
        """Run ``spec``; a no-op if it already runs with the same spec hash."""
        ...

    async def stop(self, instance_id: str, timeout_s: float = 10) -> None:
        """Stop gracefully (SIGTERM), killing after ``timeout_s``; idempotent."""
        ...

    async def remove(self, instance_id: str) -> None:
        """Kill if needed and forget the instance, its files and logs; idempotent."""
        ...

    async def list(self) -> builtins.list[InstanceStatus]:
        """All instances this runtime manages, running or exited."""
        ...

    async def exec(self, instance_id: str, argv: Sequence[str], timeout_s: float) -> int:
        """Run ``argv`` inside a running instance; its exit code.

        Raises :class:`~meshorch.runtime.errors.ExecTimeout` after ``timeout_s``.
        """
        ...

    async def logs(self, instance_id: str, tail: int) -> str:
        """The last ``tail`` lines of the instance's combined stdout and stderr."""
        ...

    async def has_image(self, ref: str) -> bool: ...

    async def load_image(self, archive_path: Path, ref: str) -> None:
        """Make image ``ref`` available from an image archive or a rootfs tarball."""
        ...

    async def image_names(self) -> builtins.list[str]:
        """The names of the images the runtime keeps (``name:tag``)."""
        ...

    async def remove_image(self, ref: str) -> bool:
        """Forget image ``ref``; False while an instance still uses it (kept then)."""
        ...

    async def close(self) -> None:
        """Release the runtime (see each implementation for what happens to instances)."""
        ...
