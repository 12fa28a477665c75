"""The garbage collector's policy in a hub process.

Why: at 10,000 sites a hub keeps a large live heap (each site's latest report, its views,
deployment progress, nonce caches). CPython's full (generation 2) collections walk all of
it, 44-76 ms each at 10,000 sites: alone over the operator API's p99 goal of 50 ms, and
seen as 50 ms driver steps. Most of that heap lives long and dies by reference counting
(a report is a JSON tree without cycles, dropped when the next one replaces it), and an
object frozen by ``gc.freeze`` still dies so; the collector only skips it. Hence:

- ``hold`` (the first one in the process): generation 0's threshold raised to
  ``YOUNG_THRESHOLD`` (``thresholds``), then a full collection and ``gc.freeze``: the
  state loaded at start (reports restored, modules) leaves the collector's generations;
- every ``REFREEZE_S``: ``gc.freeze`` again, so what has lived since (the new reports)
  leaves them too and a full collection stays short. No collection first: the automatic
  young ones have already taken nearly all of the young garbage (a forced one found 0-45
  objects a second at 3,000 sites), and one walks every object made since the last
  freeze: after a deployment, the new long-polls of thousands of sites with their
  coroutines, 15-320 ms a second on each replica (measured at 3,000 sites), 6-8% of the
  leader's time while a deployment runs;
- an object frozen while alive that later becomes garbage in a cycle (e.g. a request in
  flight at a freeze) is only collected once unfrozen: ``reclaim_due`` says when to
  unfreeze, collect everything and freeze again (one full pause per ``RECLAIM_S`` at
  most, sooner if the process's peak resident memory has grown by ``RECLAIM_GROWTH`` of
  what it was at the last one), which bounds such garbage. Growth is read from
  ``getrusage``, O(1): counting the frozen objects (``gc.get_freeze_count``) walks them,
  41 ms for 3 million, which once a second cost each replica a tenth of its CPU and
  stalled its event loop;
- the last ``release`` unfreezes and restores the thresholds.

``Hub`` and ``HubReplica`` hold it while started: a real process (``cli.main``) and the
in-process hubs of the tests and benchmarks get the same collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import time

logger = logging.getLogger(__name__)

Thresholds = tuple[int, int, int]

# Generation 0's threshold: a young collection every that many new container objects
# (CPython's default is 700); a few ms at most each at 10,000 sites.
YOUNG_THRESHOLD = 2_000
REFREEZE_S = 1.0
RECLAIM_S = 600.0
RECLAIM_GROWTH = 1.0  # of the peak resident memory at the last reclaim
RECLAIM_MIN_GROWTH_KB = 64 * 1024  # a small process is not reclaimed for growing


def thresholds(current: Thresholds, young: int = YOUNG_THRESHOLD) -> Thresholds:
    """``current`` (``gc.get_threshold()``) with generation 0's raised to ``young``;
    kept when higher, or 0 (automatic collection off); the older generations' kept."""
    gen0, gen1, gen2 = current
    return (gen0 if gen0 == 0 or gen0 >= young else young, gen1, gen2)


def reclaim_due(peak_kb: int, peak_at_reclaim_kb: int, since_s: float) -> bool:
    """Whether to unfreeze and collect everything: the process's peak resident memory
    ``peak_kb`` now, ``peak_at_reclaim_kb`` at the last reclaim, ``since_s`` seconds ago."""
    grown = peak_kb - peak_at_reclaim_kb
    return since_s >= RECLAIM_S or grown > max(
        peak_at_reclaim_kb * RECLAIM_GROWTH, RECLAIM_MIN_GROWTH_KB
    )


def peak_rss_kb() -> int:
    """The process's peak resident memory (KiB on Linux), without walking anything."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Policy:
    """The process's state: how many hold it, the thresholds before, the refreezer."""

    def __init__(self) -> None:
        self.holders = 0
        self.saved: Thresholds | None = None
        self.task: asyncio.Task[None] | None = None
        self.peak_kb = 0  # the peak resident memory at the last reclaim
        self.reclaimed_at = 0.0

    def hold(self) -> None:
        self.holders += 1
        if self.holders > 1:
            self.refreeze()  # the new holder's state is loaded
            return
        self.saved = gc.get_threshold()
        gc.set_threshold(*thresholds(self.saved))
        self.reclaim()
        self.task = asyncio.get_running_loop().create_task(self.keep(), name="hub-gc")

    async def release(self) -> None:
        if self.holders == 0:
            return
        self.holders -= 1
        if self.holders > 0:
            return
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        gc.unfreeze()
        if self.saved is not None:
            gc.set_threshold(*self.saved)
            self.saved = None

    async def keep(self) -> None:
        while True:
            await asyncio.sleep(REFREEZE_S)
            since = time.monotonic() - self.reclaimed_at
            if reclaim_due(peak_rss_kb(), self.peak_kb, since):
                self.reclaim()
            else:
                self.refreeze()

    def refreeze(self) -> None:
        gc.freeze()  # O(1): no collection walks what it moves (module docstring)

    def reclaim(self) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.peak_kb = peak_rss_kb()
        self.reclaimed_at = time.monotonic()
        logger.debug(
            "gc: %d collected in %.0f ms, peak RSS %d KiB",
            collected,
            (time.perf_counter() - started) * 1000,
            self.peak_kb,
        )


_policy = _Policy()


def hold() -> None:
    """Apply the policy (module docstring) while held; call from the running loop."""
    _policy.hold()


async def release() -> None:
    """Undo one ``hold``; the last one unfreezes and restores the thresholds."""
    await _policy.release()
