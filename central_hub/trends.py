"""Each site's recent trends, from the reports the hub already receives (pure).

Per site, a fixed-size ring of samples ``(time, cpu %, memory %, disk %, restarts)``:

- cpu, memory, disk: of the site's busiest live host in the report (the highest of each;
  cpu is the 1-minute load per core, ``100 * load1 / cpu_count``). None when no host
  reported it (agents before resources were reported, or a site without hosts).
- restarts: the sum of the restart counts of every instance in the report. A counter: its
  rise over the window is how often instances restarted.

``TrendBook.record`` keeps at most one sample per ``every_s`` per site (a report in
between is ignored: O(1), no allocation), so a ring of ``size`` samples covers at least
``size * every_s`` seconds (one hour by default). Memory per site is fixed: two flat
arrays (times as doubles, the four values as single floats), about 3.3 KB for the default
120 samples, whatever the number of hosts or instances; 10,000 sites take about 35 MB.
``forget`` drops a deleted site's ring.

The rings live in the memory of the hub that receives the reports, never in its store:
a restarted hub (or a new leader of a replicated hub) starts them again from the next
reports. An hour of history is not worth a write per site every 30 s.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

SAMPLE_EVERY_S: Final = 30.0
RING_SIZE: Final = 120  # an hour at one sample per 30 s
VALUES: Final = ("cpu_pct", "memory_pct", "disk_pct", "restarts")
_NONE: Final = math.nan  # a value no host reported


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    cpu_pct: float | None
    memory_pct: float | None
    disk_pct: float | None
    restarts: int

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "cpu_pct": self.cpu_pct,
            "memory_pct": self.memory_pct,
            "disk_pct": self.disk_pct,
            "restarts": self.restarts,
        }


def _highest(values: list[float]) -> float | None:
    return round(max(values), 1) if values else None


def sample_of(report: Mapping[str, Any], at: float) -> Sample:
    """The sample a (normalised, ``central_hub.fleetview.parse_report``) report gives."""
    cpu: list[float] = []
    memory: list[float] = []
    disk: list[float] = []
    restarts = 0
    for host in report.get("hosts", ()):
        for instance in host.get("instances", ()):
            restarts += int(instance.get("restarts") or 0)
        use = host.get("resources")
        if not host.get("alive") or not use:
            continue
        cores = use.get("cpu_count")
        if "load1" in use and isinstance(cores, int | float) and cores >= 1:
            cpu.append(100.0 * use["load1"] / cores)
        if "memory_used_pct" in use:
            memory.append(use["memory_used_pct"])
        if "disk_used_pct" in use:
            disk.append(use["disk_used_pct"])
    return Sample(at, _highest(cpu), _highest(memory), _highest(disk), restarts)


class Ring:
    """A site's last ``size`` samples, oldest overwritten first, in two fixed arrays."""

    __slots__ = ("_count", "_next", "_times", "_values")

    def __init__(self, size: int) -> None:
        self._times = array("d", bytes(8 * size))
        self._values = array("f", bytes(4 * len(VALUES) * size))
        self._next = 0
        self._count = 0

    @property
    def size(self) -> int:
        return len(self._times)

    @property
    def last_at(self) -> float | None:
        if not self._count:
            return None
        return self._times[(self._next - 1) % self.size]

    def add(self, sample: Sample) -> None:
        i = self._next
        self._times[i] = sample.at
        base = i * len(VALUES)
        for k, value in enumerate(
            (sample.cpu_pct, sample.memory_pct, sample.disk_pct, sample.restarts)
        ):
            self._values[base + k] = _NONE if value is None else float(value)
        self._next = (i + 1) % self.size
        self._count = min(self._count + 1, self.size)

    def samples(self) -> list[Sample]:
        """Oldest first."""
        found = []
        start = (self._next - self._count) % self.size
        for n in range(self._count):
            i = (start + n) % self.size
            raw = self._values[i * len(VALUES) : (i + 1) * len(VALUES)]
            cpu, memory, disk, restarts = (None if math.isnan(v) else v for v in raw)
            found.append(
                Sample(
                    self._times[i],
                    None if cpu is None else round(cpu, 1),
                    None if memory is None else round(memory, 1),
                    None if disk is None else round(disk, 1),
                    0 if restarts is None else int(restarts),
                )
            )
        return found


class TrendBook:
    """Every site's ring (see the module docstring)."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S, size: int = RING_SIZE) -> None:
        if every_s <= 0 or size < 2:
            raise ValueError("trends need every_s > 0 and at least 2 samples")
        self.every_s = every_s
        self.size = size
        self._rings: dict[str, Ring] = {}

    def record(self, site: str, report: Mapping[str, Any], now: float) -> bool:
        """Keep a sample of ``report`` unless the site's last one is under ``every_s`` old
        (False: ignored). A clock that went back starts the spacing again from ``now``."""
        ring = self._rings.get(site)
        if ring is None:
            ring = self._rings[site] = Ring(self.size)
        last = ring.last_at
        if last is not None and 0 <= now - last < self.every_s:
            return False
        ring.add(sample_of(report, now))
        return True

    def samples(self, site: str, since: float | None = None) -> list[Sample]:
        """The site's samples, oldest first; only those at or after ``since`` if given."""
        ring = self._rings.get(site)
        found = [] if ring is None else ring.samples()
        return found if since is None else [s for s in found if s.at >= since]

    def forget(self, site: str) -> None:
        self._rings.pop(site, None)

    def __len__(self) -> int:
        return len(self._rings)
