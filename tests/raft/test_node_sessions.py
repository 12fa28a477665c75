"""Client sessions on real pysyncobj nodes: a request proposed again is applied once."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from raft import (
    Append,
    ClientRequest,
    NotCommittedError,
    OutcomeUnknownError,
    RaftNode,
    SessionError,
)
from raft.node import final_error
from raft.sessions import SESSIONS_TABLE
from raft.state_machine import decode_counter
from tests.raft.test_node import make_nodes, running


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    async with running(make_nodes(tmp_path, 3)) as nodes:
        yield nodes


def counted(node: RaftNode, key: bytes) -> int:
    record = node.view.get("kv", key)
    return decode_counter(None if record is None else record.value)[0] - 1


async def test_a_request_sent_through_every_member_at_once_is_applied_once(
    cluster: list[RaftNode],
) -> None:
    floor = cluster[0].view.applied_index()
    for seq in (1, 2, 3):
        request = ClientRequest(b"client-a", seq, floor)
        answers = await asyncio.gather(
            *(n.propose([Append("kv", b"n", b"x", 1)], session=request) for n in cluster)
        )
        assert len({tuple(a) for a in answers}) == 1  # one answer, the first application's
        assert answers[0][0].current_index == seq
    for node in cluster:
        await node.barrier()
        assert counted(node, b"n") == 3
    # Every member keeps the same session records (the apply is deterministic).
    tables = [node.view.scan(SESSIONS_TABLE, b"", 100)[0] for node in cluster]
    assert tables[0] and tables[0] == tables[1] == tables[2]


async def test_an_older_request_of_a_session_is_refused(cluster: list[RaftNode]) -> None:
    floor = cluster[0].view.applied_index()
    await cluster[1].propose([Append("kv", b"m", b"x", 1)], session=ClientRequest(b"b", 5, floor))
    with pytest.raises(SessionError) as refused:
        await cluster[2].propose(
            [Append("kv", b"m", b"x", 1)], session=ClientRequest(b"b", 4, floor)
        )
    assert refused.value.code == "session_stale"
    await cluster[2].barrier()
    assert counted(cluster[2], b"m") == 1


def test_a_resend_that_did_nothing_leaves_an_earlier_unknown_outcome_unknown() -> None:
    earlier = OutcomeUnknownError("the leader changed while the entry was in flight")
    final = final_error(NotCommittedError("no_leader"), earlier)
    assert isinstance(final, OutcomeUnknownError)
    assert "leader changed" in str(final) and "no_leader" in str(final)
    refused = NotCommittedError("no_leader")
    assert final_error(refused, None) is refused
