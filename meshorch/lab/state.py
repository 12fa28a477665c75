"""What a lab remembers between CLI invocations: a versioned JSON file per prefix.

The state file is written *before* ``up`` creates anything, so ``down`` can always find
a half-built lab; ``down`` also searches by prefix in case the file itself is lost.

Layout under the state dir (default ``/run/meshorch-lab``)::

    {prefix}.json          this state
    {prefix}.lock          serialises CLI invocations on one lab
    {prefix}/logs/NODE.log stdout+stderr of the node's process
    {prefix}/data/NODE/    the node's ``{data_dir}``
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from meshorch.lab.errors import LabStateError

STATE_VERSION = 1
DEFAULT_STATE_DIR = Path("/run/meshorch-lab")
STATE_DIR_ENV = "MESHORCH_LAB_STATE_DIR"

Phase = Literal["building", "up"]


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process the lab started in a node's namespace.

    ``start_ticks`` (field 22 of /proc/PID/stat) tells a recycled pid from ours.
    """

    node: str
    netns: str
    argv: tuple[str, ...]
    log: str
    pid: int
    start_ticks: int
    started_at: float  # wall clock, for humans


@dataclass(slots=True)
class LabState:
    prefix: str
    site_hosts: list[int]
    phase: Phase = "building"
    agent_cmd: str | None = None
    hub_cmd: str | None = None
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    partitions: list[tuple[str, str]] = field(default_factory=list)


def default_state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else DEFAULT_STATE_DIR


def encode_state(state: LabState) -> bytes:
    doc = {
        "version": STATE_VERSION,
        "prefix": state.prefix,
        "site_hosts": state.site_hosts,
        "phase": state.phase,
        "agent_cmd": state.agent_cmd,
        "hub_cmd": state.hub_cmd,
        "processes": {
            name: {
                "node": p.node,
                "netns": p.netns,
                "argv": list(p.argv),
                "log": p.log,
                "pid": p.pid,
                "start_ticks": p.start_ticks,
                "started_at": p.started_at,
            }
            for name, p in state.processes.items()
        },
        "partitions": [list(p) for p in state.partitions],
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def decode_state(data: bytes) -> LabState:
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        if doc.get("version") != STATE_VERSION:
            raise LabStateError(f"unsupported lab state version {doc.get('version')!r}")
        phase = doc["phase"]
        if phase not in ("building", "up"):
            raise ValueError(f"bad phase {phase!r}")
        return LabState(
            prefix=str(doc["prefix"]),
            site_hosts=[int(n) for n in doc["site_hosts"]],
            phase=phase,
            agent_cmd=_opt_str(doc.get("agent_cmd")),
            hub_cmd=_opt_str(doc.get("hub_cmd")),
            processes={str(k): _decode_process(v) for k, v in doc["processes"].items()},
            partitions=[(str(a), str(b)) for a, b in doc["partitions"]],
        )
    except LabStateError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LabStateError(f"unreadable lab state: {exc}") from exc


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _decode_process(doc: Any) -> ProcessRecord:
    return ProcessRecord(
        node=str(doc["node"]),
        netns=str(doc["netns"]),
        argv=tuple(str(a) for a in doc["argv"]),
        log=str(doc["log"]),
        pid=int(doc["pid"]),
        start_ticks=int(doc["start_ticks"]),
        started_at=float(doc["started_at"]),
    )


class StateStore:
    """The files of one lab under ``state_dir`` (thin I/O adapter)."""

    def __init__(self, state_dir: Path, prefix: str) -> None:
        self.state_dir = state_dir
        self.prefix = prefix
        self.path = state_dir / f"{prefix}.json"
        self.lock_path = state_dir / f"{prefix}.lock"
        self.lab_dir = state_dir / prefix

    def log_path(self, node: str) -> Path:
        return self.lab_dir / "logs" / f"{node}.log"

    def data_dir(self, node: str) -> Path:
        return self.lab_dir / "data" / node

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> LabState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise LabStateError(
                f"no lab {self.prefix!r} (no state file {self.path}); start one with "
                f"'lab up --prefix {self.prefix}'"
            ) from None
        state = decode_state(data)
        if state.prefix != self.prefix:
            raise LabStateError(f"{self.path} holds lab {state.prefix!r}, not {self.prefix!r}")
        return state

    def save(self, state: LabState) -> None:
        # Write-then-rename: a crash mid-write never leaves a truncated state file.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(encode_state(state))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab's lock: two invocations never edit one lab at once."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
