"""Commits slower than the proposal timeout, on real nodes: the caller is told the outcome
is unknown and can still learn it; a proposal that never left the queue did nothing.

The nodes' proposal timeout (1 ns) has passed by the next turn of the event loop, and a
commit takes several (a network round trip between the nodes at least), so every proposal
runs past its time: in that turn the timers run after the hand-over scheduled before them,
which fixes the order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from raft import BackloggedError, OutcomeUnknownError, Put, RaftNode
from tests.raft.test_node import make_nodes, running, wait_for

TINY_TIMEOUT_S = 1e-9


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    # Two operations an entry: a second proposal made with a full first one waits for it.
    nodes = make_nodes(tmp_path, 3, proposal_timeout_s=TINY_TIMEOUT_S, max_batch_ops=2)
    async with running(nodes):
        yield nodes


def leader_of(nodes: list[RaftNode]) -> RaftNode:
    return next(node for node in nodes if node.status().is_leader)


async def test_a_slow_commit_is_answered_later_with_its_results(slow: list[RaftNode]) -> None:
    leader = leader_of(slow)
    with pytest.raises(OutcomeUnknownError) as unknown:
        await leader.propose([Put("kv", b"a", b"1"), Put("kv", b"b", b"2")])
    assert unknown.value.outcome is not None
    results = await asyncio.wait_for(unknown.value.outcome, 10)
    assert [r.ok for r in results] == [True, True]
    index = results[0].index
    await wait_for(lambda: all(n.status().applied_index >= index for n in slow))
    for node in slow:
        assert node.view.get("kv", b"a") is not None and node.view.get("kv", b"b") is not None


async def test_a_proposal_queued_past_its_time_is_never_applied(slow: list[RaftNode]) -> None:
    leader = leader_of(slow)
    first, second = await asyncio.gather(
        leader.propose([Put("kv", b"first-1", b"1"), Put("kv", b"first-2", b"1")]),
        leader.propose([Put("kv", b"second", b"1")]),  # no room in the first's entry
        return_exceptions=True,
    )
    assert isinstance(second, BackloggedError), second
    assert isinstance(first, OutcomeUnknownError) and first.outcome is not None, first
    index = (await asyncio.wait_for(first.outcome, 10))[0].index
    # Later entries go on committing (``third``), and the refused one is nowhere.
    with pytest.raises(OutcomeUnknownError) as third:
        await leader.propose([Put("kv", b"third", b"1")])
    assert third.value.outcome is not None
    last = (await asyncio.wait_for(third.value.outcome, 10))[0].index
    assert last > index
    await wait_for(lambda: all(n.status().applied_index >= last for n in slow))
    for node in slow:
        assert node.view.get("kv", b"first-1") is not None
        assert node.view.get("kv", b"third") is not None
        assert node.view.get("kv", b"second") is None


async def test_a_late_outcome_is_settled_when_the_node_stops(tmp_path: Path) -> None:
    """A node that stops answers the outcomes still awaited (nobody waits forever)."""
    async with running(make_nodes(tmp_path, 3, proposal_timeout_s=TINY_TIMEOUT_S)) as nodes:
        leader = leader_of(nodes)
        for other in nodes:
            if other is not leader:
                await other.stop()  # no quorum: nothing commits from now on
        with pytest.raises(OutcomeUnknownError) as unknown:
            await leader.propose([Put("kv", b"k", b"v")])
        outcome = unknown.value.outcome
        assert outcome is not None and not outcome.done()
        await leader.stop()
        with pytest.raises(OutcomeUnknownError, match="node stopped"):
            await asyncio.wait_for(outcome, 5)
