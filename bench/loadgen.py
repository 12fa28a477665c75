"""A closed-loop HTTP load generator shared by the benchmarks (aiohttp).

``concurrency`` workers each send one request, wait for the answer, send the
next; requests go round-robin over the given endpoints. Every system under
test is driven by this same code, so ratios compare like with like.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

# (session, worker, sequence) -> performs one request, True on success.
RequestFn = Callable[[aiohttp.ClientSession, int, int], Awaitable[bool]]


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    duration_s: float
    ok: int
    failed: int
    latencies_s: tuple[float, ...]
    completed: int = 0  # every request answered, warm-up and stragglers included

    @property
    def per_second(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index] * 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)


async def run_load(
    request: RequestFn,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> LoadResult:
    """Drive ``request`` from ``concurrency`` workers; measure after ``warmup_s``."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0, "completed": 0}
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s

        async def worker(worker_id: int) -> None:
            sequence = 0
            while True:
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    ok = await request(session, worker_id, sequence)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                ended = time.perf_counter()
                sequence += 1
                counts["completed"] += 1
                if began >= measure_from and ended <= stop_at:
                    if ok:
                        counts["ok"] += 1
                        latencies.append(ended - began)
                    else:
                        counts["failed"] += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(
        concurrency,
        duration_s,
        counts["ok"],
        counts["failed"],
        tuple(latencies),
        counts["completed"],
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
