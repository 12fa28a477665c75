"""Configuration of a Raft node, with presets and validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_PASSWORD_LENGTH = 16
# LMDB may need this many times the logical size of the state (half-full pages,
# values rounded up to pages, the pages an entry rewrites kept until it commits).
VIEW_HEADROOM = 4


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


@dataclass(frozen=True)
class RaftConfig:
    """Everything a ``RaftNode`` needs. Durations are in seconds.

    ``password`` is mandatory: pysyncobj unpickles what arrives on its port,
    so its traffic is always encrypted and authenticated with it.
    """

    self_address: str
    data_dir: Path
    password: str
    partners: tuple[str, ...] = ()
    tables: tuple[str, ...] = ("kv",)
    bind_address: str | None = None
    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 1.4
    heartbeat_interval_s: float = 0.1
    # A leader that hears from no majority for this long steps down, so a
    # minority partition stops claiming leadership.
    leader_fallback_s: float = 3.0
    connection_timeout_s: float = 3.5
    connection_retry_s: float = 1.0
    compaction_min_entries: int = 20_000
    compaction_min_interval_s: float = 600.0
    # Also compact once the entries applied since the last dump exceed this many
    # bytes and the size of the view: pysyncobj holds its whole log in memory.
    compaction_log_bytes: int = 2 << 20
    # Group commit: many client operations travel in one Raft entry. With one
    # entry in flight per node, the next batch fills up while one is committed.
    max_batch_ops: int = 512
    max_batch_bytes: int = 1 << 20
    max_batches_in_flight: int = 1
    # A proposal whose operations encode to more than this is refused before it is
    # proposed (the largest value is 1 MiB; the agent's are at most 512 KiB). It also
    # sizes the largest message accepted from an authenticated peer.
    max_entry_bytes: int = 8 << 20
    # The state budget: writes that would take the logical size of the state (keys,
    # values and 64 bytes a record, see raft.state_machine) past this are refused
    # with a "no_space" result. Every member must use the same value, like ``tables``.
    max_state_bytes: int = 4 << 30
    # The LMDB map starts at view_map_bytes and doubles as the view fills, up to
    # max_view_bytes (at least VIEW_HEADROOM times max_state_bytes). The file only
    # takes the disk space its data uses.
    view_map_bytes: int = 1 << 30
    max_view_bytes: int = 16 << 30
    proposal_timeout_s: float = 5.0
    # pysyncobj is ticked after every network event and proposal, and at least
    # this often, or every heartbeat_interval_s if shorter (heartbeats, election
    # and reconnection timers).
    tick_interval_s: float = 0.05
    view_sync_interval_s: float = 1.0
    # "power": the journal is fdatasync'd before anything it holds is acknowledged or
    # voted on (survives a power cut); "process": pysyncobj's own (survives the process's
    # death only). See raft.journal.
    durability: str = "power"

    def validate(self) -> None:
        if self.durability not in ("power", "process"):
            raise ConfigError("durability: must be 'power' or 'process'")
        if len(self.password) < MIN_PASSWORD_LENGTH:
            raise ConfigError(
                f"password: the cluster password must be at least {MIN_PASSWORD_LENGTH} characters"
            )
        for name in ("self_address", *(f"partner {p}" for p in self.partners)):
            address = self.self_address if name == "self_address" else name.split(" ", 1)[1]
            _check_address(name, address)
        if self.self_address in self.partners:
            raise ConfigError("partners: must not contain the node's own address")
        if not self.tables or any(not t or t.startswith("__") for t in self.tables):
            raise ConfigError("tables: need at least one name, none starting with '__'")
        if not 0 < self.heartbeat_interval_s * 3 < self.election_timeout_min_s:
            raise ConfigError("heartbeat_interval_s: must be under a third of the election timeout")
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            raise ConfigError("election_timeout_max_s: must exceed election_timeout_min_s")
        if self.connection_timeout_s < self.election_timeout_max_s:
            raise ConfigError("connection_timeout_s: must be at least election_timeout_max_s")
        if self.leader_fallback_s <= self.heartbeat_interval_s:
            raise ConfigError("leader_fallback_s: must exceed heartbeat_interval_s")
        if self.max_batch_ops < 1 or self.max_batches_in_flight < 1:
            raise ConfigError("max_batch_ops and max_batches_in_flight: must be >= 1")
        if self.tick_interval_s <= 0:
            raise ConfigError("tick_interval_s: must be positive")
        if self.compaction_log_bytes < 0:
            raise ConfigError("compaction_log_bytes: must be >= 0")
        if self.proposal_timeout_s <= 0:
            raise ConfigError("proposal_timeout_s: must be positive")
        if self.compaction_min_entries < 2:
            raise ConfigError("compaction_min_entries: must be >= 2")
        if not 1024 <= self.max_batch_bytes <= self.max_entry_bytes:
            raise ConfigError("max_entry_bytes: must be at least max_batch_bytes (>= 1024)")
        if self.max_state_bytes <= 0 or self.view_map_bytes <= 0:
            raise ConfigError("max_state_bytes and view_map_bytes: must be positive")
        if self.max_view_bytes < max(self.view_map_bytes, VIEW_HEADROOM * self.max_state_bytes):
            raise ConfigError(
                f"max_view_bytes: must be at least view_map_bytes and {VIEW_HEADROOM} "
                "times max_state_bytes"
            )


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {address!r} is not HOST:PORT")


def lan_preset(**overrides: object) -> dict[str, object]:
    """Timeouts for hosts on one LAN (the default)."""
    return dict(overrides)


def datacenter_preset(**overrides: object) -> dict[str, object]:
    """Timeouts for servers that also carry heavy request load (a replicated hub): a busy
    leader's event loop must not look like a dead one; fail-over takes a few seconds."""
    values: dict[str, object] = {
        "election_timeout_min_s": 2.0,
        "election_timeout_max_s": 4.0,
        "heartbeat_interval_s": 0.2,
        "leader_fallback_s": 8.0,
        "connection_timeout_s": 6.0,
        "connection_retry_s": 1.0,
    }
    values.update(overrides)
    return values


def local_preset(**overrides: object) -> dict[str, object]:
    """Faster elections for tests and demos on loopback."""
    values: dict[str, object] = {
        "election_timeout_min_s": 0.3,
        "election_timeout_max_s": 0.8,
        "heartbeat_interval_s": 0.05,
        "leader_fallback_s": 2.0,
        "connection_timeout_s": 1.5,
        "connection_retry_s": 0.3,
    }
    values.update(overrides)
    return values
