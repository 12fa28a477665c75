"""Real pysyncobj nodes in one process, on loopback."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshorch.demo.localsite import free_port
from raft import (
    NotCommittedError,
    OutcomeUnknownError,
    Put,
    RaftConfig,
    RaftNode,
    Record,
    local_preset,
)
from raft.config import ConfigError

PASSWORD = "test-password-0123456789"


def make_nodes(tmp_path: Path, count: int, **overrides: object) -> list[RaftNode]:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    return [
        RaftNode(
            RaftConfig(
                self_address=address,
                partners=tuple(a for a in addresses if a != address),
                data_dir=tmp_path / f"n{i}",
                password=PASSWORD,
                **local_preset(**overrides),  # type: ignore[arg-type]
            )
        )
        for i, address in enumerate(addresses)
    ]


async def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(nodes: list[RaftNode]) -> AsyncIterator[list[RaftNode]]:
    """``nodes`` started, once one of them leads; stopped after, whatever happened."""
    try:
        for node in nodes:
            await node.start()
        await wait_for(lambda: sum(n.status().is_leader for n in nodes) == 1)
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    async with running(make_nodes(tmp_path, 3)) as nodes:
        yield nodes


async def test_a_write_on_any_node_is_applied_everywhere(cluster: list[RaftNode]) -> None:
    results = await asyncio.gather(
        *(node.propose([Put("kv", b"from-%d" % i, b"v")]) for i, node in enumerate(cluster))
    )
    assert all(r[0].ok for r in results)
    for node in cluster:
        await node.barrier()
        for i in range(3):
            assert node.view.get("kv", b"from-%d" % i) is not None


async def test_concurrent_proposals_share_entries_and_keep_order(cluster: list[RaftNode]) -> None:
    node = cluster[0]
    before = node.status().commit_index
    results = await asyncio.gather(
        *(node.propose([Put("kv", b"k", b"%d" % i)]) for i in range(300))
    )
    indexes = [r[0].index for r in results]
    assert indexes == sorted(indexes)  # proposals commit in submission order
    assert node.status().commit_index - before < 300  # batched into fewer entries
    assert node.view.get("kv", b"k") == Record(indexes[-1], b"299")


async def test_leader_change_is_observed(cluster: list[RaftNode]) -> None:
    changes: list[str | None] = []
    follower = next(n for n in cluster if not n.status().is_leader)
    follower.on_leader_change(lambda s: changes.append(s.leader_address))
    leader = next(n for n in cluster if n.status().is_leader)
    await leader.stop()
    await wait_for(lambda: any(c not in (None, leader.config.self_address) for c in changes))


async def test_far_behind_node_catches_up_from_a_dump(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, compaction_min_entries=20, compaction_min_interval_s=0.5)
    for node in nodes[:2]:
        await node.start()
    try:
        await wait_for(lambda: any(n.status().is_leader for n in nodes[:2]))
        for i in range(120):
            await nodes[0].propose([Put("kv", b"key-%03d" % i, b"value-%d" % i)])
        # Leader and follower have compacted their logs: the latecomer needs the dump.
        await wait_for(lambda: all((n.config.data_dir / "raft.dump").exists() for n in nodes[:2]))
        # The first entries are gone from every log: only a dump can carry them now.
        for node in nodes[:2]:
            raft_status = node._syncobj.getStatus()  # type: ignore[union-attr]
            assert raft_status["log_len"] < raft_status["commit_idx"] - 50
        await nodes[2].start()
        await wait_for(lambda: nodes[2].view.get("kv", b"key-119") is not None)
        assert nodes[2].view.get("kv", b"key-000") == nodes[0].view.get("kv", b"key-000")
        found, _ = nodes[2].view.scan("kv", b"key-", 1000)
        assert len(found) == 120
    finally:
        for node in nodes:
            await node.stop()


async def test_state_survives_a_full_restart(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, compaction_min_entries=30, compaction_min_interval_s=0.5)
    for node in nodes:
        await node.start()
    await wait_for(lambda: any(n.status().is_leader for n in nodes))
    for i in range(100):
        await nodes[i % 3].propose([Put("kv", b"k%d" % i, b"v%d" % i)])
    configs = [n.config for n in nodes]
    for node in nodes:
        await node.stop()
    restarted = [RaftNode(c) for c in configs]
    try:
        # The LMDB view is readable at once, before any election: node 0 proposed k99
        # and applied it before its proposal returned.
        assert restarted[0].view.get("kv", b"k99") is not None
        for node in restarted:
            await node.start()
        await wait_for(lambda: any(n.status().is_leader for n in restarted))
        await restarted[2].propose([Put("kv", b"after", b"restart")])
        for node in restarted:
            await node.barrier()
            found, _ = node.view.scan("kv", b"k", 1000)
            assert len(found) == 100
    finally:
        for node in restarted:
            await node.stop()


async def test_idle_nodes_use_almost_no_cpu(cluster: list[RaftNode]) -> None:
    # pysyncobj is ticked by the event loop: an idle cluster only exchanges heartbeats.
    await asyncio.sleep(0.5)
    before = time.process_time()
    await asyncio.sleep(2.0)
    assert time.process_time() - before < 0.4  # three nodes; a busy loop would take 2 s


async def test_a_write_at_concurrency_one_is_prompt(cluster: list[RaftNode]) -> None:
    follower = next(n for n in cluster if not n.status().is_leader)
    await follower.propose([Put("kv", b"warm", b"up")])
    durations = []
    for i in range(20):
        began = time.perf_counter()
        await follower.propose([Put("kv", b"k%d" % i, b"v")])
        durations.append(time.perf_counter() - began)
    # No tick period in the path: a forwarded write takes a few round trips on loopback.
    assert sorted(durations)[10] < 0.04


async def test_the_log_is_compacted_once_it_outgrows_the_state(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, compaction_log_bytes=20_000)
    for node in nodes:
        await node.start()
    try:
        await wait_for(lambda: any(n.status().is_leader for n in nodes))
        value = b"x" * 200
        for _ in range(6):
            await asyncio.gather(
                *(nodes[i % 3].propose([Put("kv", b"k%d" % (i % 10), value)]) for i in range(50))
            )
        for node in nodes:
            await node.barrier()
        await wait_for(lambda: all((n.config.data_dir / "raft.dump").exists() for n in nodes))
        for node in nodes:
            raft_status = node._syncobj.getStatus()  # type: ignore[union-attr]
            # 300 writes of 200 bytes, in far fewer entries, and most of them compacted away.
            assert raft_status["log_len"] < raft_status["commit_idx"] / 2
            assert node.view.get("kv", b"k9") is not None
    finally:
        for node in nodes:
            await node.stop()


async def test_proposals_after_stop_are_refused(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1)
    await node.start()
    await wait_for(lambda: node.status().is_leader)
    await node.propose([Put("kv", b"k", b"v")])
    await node.stop()
    with pytest.raises(NotCommittedError):
        await node.propose([Put("kv", b"k", b"v")])


async def test_minority_cannot_commit(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, proposal_timeout_s=1.5)
    await nodes[0].start()
    try:
        with pytest.raises(OutcomeUnknownError, match="no commit within"):
            await nodes[0].propose([Put("kv", b"lonely", b"x")])
        assert nodes[0].view.get("kv", b"lonely") is None
    finally:
        await nodes[0].stop()


def test_config_refuses_a_non_positive_tick_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tick_interval_s"):
        RaftConfig(
            self_address="127.0.0.1:1", data_dir=tmp_path, password=PASSWORD, tick_interval_s=0
        ).validate()


def test_config_refuses_a_short_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password"):
        RaftConfig(self_address="127.0.0.1:1", data_dir=tmp_path, password="short").validate()


def test_only_proposals_that_did_nothing_or_write_nothing_are_sent_again() -> None:
    from raft.errors import NotCommittedError, OutcomeUnknownError
    from raft.node import retryable

    refused, unknown = NotCommittedError("not_leader"), OutcomeUnknownError("leader changed")
    assert retryable(refused, idempotent=True, read_only=False)
    assert not retryable(refused, idempotent=False, read_only=False)
    # A put whose first attempt may be committed must not be applied again later.
    assert not retryable(unknown, idempotent=True, read_only=False)
    assert retryable(unknown, idempotent=True, read_only=True)  # a barrier writes nothing
