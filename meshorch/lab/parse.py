"""Parsers for what ``ip`` and ``/proc`` print (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass


def parse_netns_list(text: str) -> list[str]:
    """Names from ``ip netns list`` (lines like ``mo-s1-h1 (id: 3)``)."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def parse_pids(text: str) -> list[int]:
    """Pids from ``ip netns pids NS``: one per line."""
    return [int(w) for w in text.split() if w.isdigit()]


_LINK_RE = re.compile(r"^\d+:\s+([^:@\s]+)(?:@\S+)?:")


def parse_link_names(text: str) -> list[str]:
    """Interface names from ``ip -o link show`` (``5: mos1h1@if4: <...> ...``)."""
    out: list[str] = []
    for line in text.splitlines():
        match = _LINK_RE.match(line)
        if match:
            out.append(match.group(1))
    return out


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """Interface -> (bytes received, bytes sent) from ``/proc/net/dev``."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        name, colon, rest = line.partition(":")
        fields = rest.split()
        if colon and len(fields) >= 9 and fields[0].isdigit():
            counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str  # R, S, D, Z (zombie), X (dead), ...
    start_ticks: int


def parse_proc_stat(text: str) -> ProcStat:
    """State and start time from ``/proc/PID/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are counted
    from the last ``)``.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    return ProcStat(state=rest[0], start_ticks=int(rest[19]))
