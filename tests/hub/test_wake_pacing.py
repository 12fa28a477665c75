"""A delta for every site wakes the sites' long-polls a batch per turn of the event loop:
what else is ready (an operator's request, a report) runs between the batches instead of
after every poll has built its answer."""

from __future__ import annotations

import asyncio

from central_hub.siteviews import WAKE_BATCH, SiteViews
from meshorch.fleet.delta import Target

POLLS = 5 * WAKE_BATCH


async def test_polls_are_woken_in_batches_with_other_work_between() -> None:
    views = SiteViews()
    answered = 0

    async def poll(site: str) -> None:
        nonlocal answered
        await views.wait(site, after=0, wait_s=30)
        answered += 1

    polls = [asyncio.create_task(poll(f"s{i}")) for i in range(POLLS)]
    await asyncio.sleep(0.05)  # every poll waits
    assert answered == 0 and views.waiting == POLLS
    seen: list[int] = []  # polls answered, each time other ready work got a turn
    loop = asyncio.get_running_loop()

    def other_work() -> None:
        seen.append(answered)
        if answered < POLLS:
            loop.call_soon(other_work)

    views.index(1, Target(all=True))
    loop.call_soon(other_work)
    await asyncio.wait_for(asyncio.gather(*polls), timeout=10)
    between = sorted({n for n in seen if 0 < n < POLLS})
    assert len(between) >= POLLS // WAKE_BATCH - 1, seen
    steps = zip([0, *between], [*between, POLLS], strict=True)
    assert all(b - a <= WAKE_BATCH for a, b in steps), seen


async def test_a_stop_answers_every_poll_at_once() -> None:
    views = SiteViews()
    polls = [asyncio.create_task(views.wait(f"s{i}", 0, 30)) for i in range(POLLS)]
    await asyncio.sleep(0.05)
    views.close()
    await asyncio.sleep(0)  # one turn: every poll was woken in the same one
    await asyncio.sleep(0)
    assert all(p.done() for p in polls)


async def test_a_poll_that_timed_out_while_queued_is_skipped() -> None:
    views = SiteViews()
    short = [asyncio.create_task(views.wait(f"s{i}", 0, 0.05)) for i in range(WAKE_BATCH)]
    long = [asyncio.create_task(views.wait(f"t{i}", 0, 30)) for i in range(WAKE_BATCH)]
    await asyncio.sleep(0.2)  # the short ones timed out
    assert all(p.done() for p in short) and views.waiting == WAKE_BATCH
    views.index(1, Target(all=True))
    await asyncio.wait_for(asyncio.gather(*long), timeout=5)


async def test_a_poll_waiting_for_any_delta_wakes_for_every_delta() -> None:
    """The leader's and a follower's polls of sites without per-site views wait for any
    delta (``wait_any``): one for a single site wakes them, and so does one for no site."""
    views = SiteViews()
    indexed = [0]  # the newest version indexed
    for version, target in ((1, Target(sites=frozenset({"a"}))), (2, Target())):
        poll = asyncio.create_task(views.wait_any(indexed[0], 30, lambda: indexed[0]))
        await asyncio.sleep(0.05)
        assert not poll.done()
        indexed[0] = version
        views.index(version, target)
        await asyncio.wait_for(poll, timeout=5)
