"""What a host uses: CPU load, memory, disk of the data directory (read from /proc)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class HostResources:
    cpu_count: int
    load1: float  # 1-minute load average
    memory_total_bytes: int
    memory_used_bytes: int
    disk_total_bytes: int  # the file system of the data directory
    disk_used_bytes: int
    at: float
    net_rx_bytes: int = 0  # since boot, every interface but loopback
    net_tx_bytes: int = 0

    @property
    def memory_used_pct(self) -> float:
        return 100.0 * self.memory_used_bytes / max(self.memory_total_bytes, 1)

    @property
    def disk_used_pct(self) -> float:
        return 100.0 * self.disk_used_bytes / max(self.disk_total_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "memory_used_pct": round(self.memory_used_pct, 1),
            "disk_used_pct": round(self.disk_used_pct, 1),
        }


def _meminfo() -> tuple[int, int]:
    values: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total, total - values.get("MemAvailable", values.get("MemFree", 0))


def _net_bytes() -> tuple[int, int]:
    rx = tx = 0
    with open("/proc/net/dev") as dev:
        for line in list(dev)[2:]:  # two header lines
            name, _, counters = line.partition(":")
            fields = counters.split()
            if name.strip() != "lo" and len(fields) >= 9:
                rx += int(fields[0])
                tx += int(fields[8])
    return rx, tx


def sample(data_dir: Path, now: float) -> HostResources:
    total, used = _meminfo()
    disk = shutil.disk_usage(data_dir)
    rx, tx = _net_bytes()
    return HostResources(
        os.cpu_count() or 1, os.getloadavg()[0], total, used, disk.total, disk.used, now, rx, tx
    )
