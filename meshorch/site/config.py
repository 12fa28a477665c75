"""Agent configuration: flags to a validated ``AgentConfig``, and the cluster password."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from meshorch.dirlock import DataDirLock, hold
from meshorch.errors import ConfigurationError, RemoteInputError
from meshorch.fleet.apply import LinkConfig, check_link_config
from meshorch.state.tables import validate_address, validate_host_id
from raft.config import MIN_PASSWORD_LENGTH
from raft.durable import write_durably

PASSWORD_ENV = "MESHORCH_CLUSTER_PASSWORD"
PASSWORD_FILE = "cluster.password"
IDENTITY_FILE = "agent.json"
SOCKET_FILE = "agent.sock"
MAX_SOCKET_PATH = 107  # sun_path, less its terminating NUL
PRESETS = ("lan", "local")


@dataclass(frozen=True)
class AgentConfig:
    site: str
    host_id: str
    data_dir: Path
    api_address: str
    raft_address: str | None = None  # None: mesh mode, Raft on the overlay address
    peers: tuple[str, ...] = ()
    password: str | None = None  # None: from the data dir (or the join answer)
    preset: str = "lan"
    durability: str = "power"  # raft.journal: "power" or "process"
    hub: str | None = None  # the fleet link: all of hub, fleet and fleet_key, or none
    fleet: str | None = None
    fleet_key: str | None = None
    enroll_token: str | None = None
    hub_fingerprint: str | None = None  # the hub's TLS certificate, pinned (SHA-256 hex)
    hub_ca: Path | None = None  # or the CA that signed it (PEM file)
    socket: Path | None = None  # the root-only operator socket; None: DATA_DIR/agent.sock
    operator_token_file: Path | None = None  # a bootstrap admin token (made if absent)

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.data_dir / SOCKET_FILE

    @property
    def api_host(self) -> str:
        return self.api_address.rpartition(":")[0]

    @property
    def api_port(self) -> int:
        return int(self.api_address.rpartition(":")[2])

    def validate(self) -> None:
        problems: list[str] = []
        checks: list[tuple[Callable[..., object], tuple[str, ...]]] = [
            (validate_host_id, (self.site,)),
            (validate_host_id, (self.host_id,)),
            (validate_address, ("--api", self.api_address)),
            *((validate_address, ("--peer", peer)) for peer in self.peers),
        ]
        if self.raft_address is not None:
            checks.append((validate_address, ("--raft", self.raft_address)))
        elif self.peers:
            problems.append("--peer: needs --raft (or use discovery: no --peer, no --raft)")
        for check, args in checks:
            try:
                check(*args)
            except RemoteInputError as exc:
                problems.append(str(exc).replace("host id", "name"))
        if self.raft_address in self.peers:
            problems.append("--peer: lists this agent's own --raft address")
        if self.password is not None and len(self.password) < MIN_PASSWORD_LENGTH:
            problems.append(f"cluster password: at least {MIN_PASSWORD_LENGTH} characters")
        if self.socket is not None and len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            problems.append(f"--socket: a path of at most {MAX_SOCKET_PATH} bytes")
        if self.durability not in ("power", "process"):
            problems.append("--durability: 'power' or 'process'")
        if self.preset not in PRESETS:
            problems.append(f"--preset: one of {', '.join(PRESETS)}")
        problems.extend(self._fleet_problems())
        if problems:
            raise ConfigurationError("invalid agent configuration:\n  " + "\n  ".join(problems))

    def _fleet_problems(self) -> list[str]:
        given = [self.hub is not None, self.fleet is not None, self.fleet_key is not None]
        if not any(given):
            if self.enroll_token is not None:
                return ["--enroll-token: needs --hub, --fleet and --fleet-key"]
            return []
        if not all(given):
            return ["--hub, --fleet and --fleet-key: give all three or none"]
        try:
            self.fleet_link()
        except RemoteInputError as exc:
            return [f"fleet link: {exc}"]
        return []

    def fleet_link(self) -> LinkConfig | None:
        """The fleet link asked for by the flags (None without ``--hub``)."""
        if self.hub is None or self.fleet is None or self.fleet_key is None:
            return None
        ca = None
        if self.hub_ca is not None:
            try:
                ca = self.hub_ca.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise RemoteInputError("bad_link", f"--hub-ca {self.hub_ca}: {exc}") from None
        return check_link_config(
            self.hub, self.fleet, self.fleet_key, self.enroll_token, self.hub_fingerprint, ca
        )


def resolve_password(data_dir: Path, password_file: Path | None, has_peers: bool) -> str:
    """Find the cluster password: --cluster-password-file, $MESHORCH_CLUSTER_PASSWORD,
    or the copy kept in the data dir. A lone first host generates one."""
    stored = data_dir / PASSWORD_FILE
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read --cluster-password-file: {exc}") from exc
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV].strip()
    elif stored.exists():
        password = stored.read_text().strip()
    elif not has_peers:
        password = secrets.token_urlsafe(32)
    else:
        raise ConfigurationError(
            "a cluster password is required to join peers: pass --cluster-password-file FILE "
            f"or set {PASSWORD_ENV} (the same on every host; Raft traffic is encrypted with it)"
        )
    store_password(data_dir, password)
    return password


def store_password(data_dir: Path, password: str) -> None:
    """Keep the cluster password in the data dir (0600) so restarts need no flag."""
    stored = data_dir / PASSWORD_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if stored.exists() and stored.read_text().strip() == password:
        return
    write_durably(stored, (password + "\n").encode())


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """The data dir is the agent's alone: no other process may use it (``meshorch.dirlock``:
    ``DataDirBusy`` if one does; the caller holds the returned lock while it runs), and no
    other user may read it (mode 0700): below it are the Raft journal and the LMDB view
    (the whole site state, the site's fleet key included), which their libraries create
    readable by anyone who can reach them."""
    lock = hold(data_dir, "meshorch agent")
    try:
        data_dir.chmod(0o700)
    except PermissionError as exc:
        lock.release()
        raise ConfigurationError(
            f"--data-dir {data_dir} must belong to the agent's user: {exc}"
        ) from exc
    return lock


def check_identity(config: AgentConfig, raft_address: str | None) -> None:
    """Refuse a data dir that belongs to another site or host; record ours in a new one.
    The caller holds the data dir's lock (``lock_data_dir``)."""
    path = config.data_dir / IDENTITY_FILE
    ours = {"site": config.site, "host_id": config.host_id, "raft": raft_address}
    if path.exists():
        try:
            recorded = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ConfigurationError(f"{path} is corrupt: {exc}") from exc
        for field in ("site", "host_id", "raft"):
            if recorded.get(field) != ours[field]:
                raise ConfigurationError(
                    f"data dir {config.data_dir} belongs to {field}={recorded.get(field)!r}, "
                    f"not {ours[field]!r}; use another --data-dir"
                )
        return
    write_durably(path, orjson.dumps(ours))  # a power cut must not leave it empty
