"""The collector's policy (central_hub.gcpolicy): its rules, and a started hub holding it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from central_hub import Hub, gcpolicy
from central_hub.gcpolicy import RECLAIM_MIN_GROWTH_KB, RECLAIM_S, YOUNG_THRESHOLD
from tests.hub.conftest import hub_config


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_thresholds_raise_generation_0_only() -> None:
    assert gcpolicy.thresholds((700, 10, 10)) == (YOUNG_THRESHOLD, 10, 10)
    assert gcpolicy.thresholds((700, 5, 20), young=3000) == (3000, 5, 20)
    assert gcpolicy.thresholds((50_000, 10, 10)) == (50_000, 10, 10)  # higher: kept
    assert gcpolicy.thresholds((0, 10, 10)) == (0, 10, 10)  # automatic collection off


def test_reclaim_when_old_or_grown() -> None:
    mb = 1024
    assert not gcpolicy.reclaim_due(peak_kb=300 * mb, peak_at_reclaim_kb=300 * mb, since_s=1.0)
    assert gcpolicy.reclaim_due(peak_kb=300 * mb, peak_at_reclaim_kb=300 * mb, since_s=RECLAIM_S)
    assert gcpolicy.reclaim_due(peak_kb=600 * mb + 1, peak_at_reclaim_kb=300 * mb, since_s=1.0)
    assert not gcpolicy.reclaim_due(peak_kb=600 * mb, peak_at_reclaim_kb=300 * mb, since_s=1.0)
    small = 10 * mb  # a small process grows by at least RECLAIM_MIN_GROWTH_KB first
    grown = small + RECLAIM_MIN_GROWTH_KB
    assert not gcpolicy.reclaim_due(peak_kb=grown, peak_at_reclaim_kb=small, since_s=1.0)
    assert gcpolicy.reclaim_due(peak_kb=grown + 1, peak_at_reclaim_kb=small, since_s=1.0)


async def test_the_keeper_never_walks_the_frozen_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    # gc.get_freeze_count walks every frozen object: 41 ms for 3 million, once a second.
    walks = 0
    count = gc.get_freeze_count

    def counted() -> int:
        nonlocal walks
        walks += 1
        return count()

    monkeypatch.setattr(gc, "get_freeze_count", counted)
    monkeypatch.setattr(gcpolicy, "REFREEZE_S", 0.01)
    gcpolicy.hold()
    try:
        await asyncio.sleep(0.2)  # about 20 rounds of the keeper
    finally:
        await gcpolicy.release()
    assert walks == 0
    assert gcpolicy.peak_rss_kb() > 0


async def test_a_started_hub_holds_the_policy(tmp_path: Path) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    async with Hub(hub_config(tmp_path / "one")) as hub:
        assert gc.get_threshold() == gcpolicy.thresholds(before)
        frozen = gc.get_freeze_count()
        assert frozen > 0  # the hub's state, loaded, is out of the collector's way
        async with Hub(hub_config(tmp_path / "two")):
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() > 0  # one hub still holds it
        assert hub.url
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


async def test_garbage_is_collected_not_frozen() -> None:
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    live = Cycle()
    kept = weakref.ref(live)
    gcpolicy.hold()
    try:
        assert gone() is None  # collected before the freeze
        assert kept() is live and gc.get_freeze_count() > 0
        del live  # garbage once frozen: only a reclaim finds it
        gc.collect()
        assert kept() is not None
        gcpolicy._policy.reclaim()
        assert kept() is None
        assert gc.get_freeze_count() > 0
    finally:
        await gcpolicy.release()
    assert gc.get_freeze_count() == 0


async def test_what_lives_on_is_frozen_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "REFREEZE_S", 0.01)
    gcpolicy.hold()
    try:
        new = Cycle()  # e.g. a site's report received after the start
        assert any(o is new for o in gc.get_objects())
        await asyncio.sleep(0.1)
        assert not any(o is new for o in gc.get_objects())  # frozen: no collection walks it
    finally:
        await gcpolicy.release()
    assert any(o is new for o in gc.get_objects())


async def test_a_refreeze_walks_nothing() -> None:
    """Freezing again every second does not collect: a collection would walk every object
    made since the last freeze (thousands of sites' new long-polls after a deployment)."""
    gcpolicy.hold()
    collections: list[dict[str, int]] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info)

    young = [Cycle() for _ in range(1000)]  # something a collection would walk
    gc.callbacks.append(record)
    try:
        gcpolicy._policy.refreeze()
    finally:
        gc.callbacks.remove(record)
        await gcpolicy.release()
    assert collections == []
    del young
