"""Nothing is vouched for before it is on disk, in a real three-member cluster: every
follower's answer covers only entries it has fdatasync'd, a leader's commit index only
entries it has fdatasync'd itself (its appends may leave before), and a write is
acknowledged only once the leader and a majority hold it on disk."""

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.transport import TCPTransport

from raft import Put, RaftNode
from raft.journal import DurableJournal
from raft.transport import CappedTransport, unsynced_send_allowed

from .test_node import make_nodes, wait_for


def test_only_a_leaders_appends_may_leave_unsynced() -> None:
    assert unsynced_send_allowed({"type": "append_entries", "entries": []})
    assert unsynced_send_allowed({"type": "apply_command_response", "request_id": 1})
    for kind in ("next_node_idx", "request_vote", "response_vote", "apply_command"):
        assert not unsynced_send_allowed({"type": kind})
    assert not unsynced_send_allowed("readonly")  # pysyncobj's other messages are not dicts


async def test_nothing_is_vouched_for_before_it_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: dict[str, int] = {}  # data dir -> last index fdatasync'd
    violations: list[str] = []
    sync = DurableJournal.sync

    def last_index(journal: DurableJournal) -> int:
        return int(journal[-1][1]) if len(journal) else 0

    def recording_sync(journal: DurableJournal) -> None:
        sync(journal)
        if not journal._dirty:
            synced[str(journal._path.parent)] = last_index(journal)

    nodes = make_nodes(tmp_path, 3)
    data_dir = {n.config.self_address: str(n.config.data_dir) for n in nodes}
    send = TCPTransport.send  # what CappedTransport.send calls once it synced, or not

    def checking_send(transport: CappedTransport, node: Any, message: Any) -> bool:
        sender = data_dir[transport._selfNode.address]
        on_disk = synced.get(sender, 0)
        if isinstance(message, dict):
            kind = message.get("type")
            vouched = message.get("next_node_idx", 0) - 1
            if kind == "next_node_idx" and message["success"] and vouched > on_disk:
                violations.append(f"{sender} acknowledged {message} with {on_disk} synced")
            if kind == "append_entries" and message["commit_index"] > on_disk:
                violations.append(f"{sender} sent commit {message['commit_index']} > {on_disk}")
        return send(transport, node, message)

    monkeypatch.setattr(DurableJournal, "sync", recording_sync)
    monkeypatch.setattr(TCPTransport, "send", checking_send)
    for node in nodes:
        await node.start()
    try:
        await wait_for(lambda: sum(n.status().is_leader for n in nodes) == 1)
        leader = next(n for n in nodes if n.status().is_leader)

        async def write(node: RaftNode, i: int) -> None:
            results = await node.propose([Put("kv", b"k%d" % i, b"v")])
            index = results[0].index
            holders = [d for d, last in synced.items() if last >= index]
            if str(leader.config.data_dir) not in holders or len(holders) < 2:
                violations.append(f"write {index} acknowledged, on disk at {holders}")

        for round_ in range(20):  # one at a time, then many at once, through every member
            await write(nodes[round_ % 3], round_)
        await asyncio.gather(*(write(nodes[i % 3], 100 + i) for i in range(300)))
        assert leader.status().is_leader  # one leader throughout: the check above holds
    finally:
        for node in nodes:
            await node.stop()
    assert not violations, violations[:5]
