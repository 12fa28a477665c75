"""The hub's store on real Raft nodes: the writer's fence, soft tables, key files, reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from central_hub.errors import ApiError
from central_hub.replicated_store import KEYFILE_PREFIX, REPLICATED_DBS, ReplicatedStore
from central_hub.store import Store, put_json, version_key
from meshorch.demo.localsite import free_port
from raft import RaftConfig, RaftNode, local_preset
from tests.raft.test_node import running, wait_for

PASSWORD = "test-password-0123456789"


def hub_nodes(tmp_path: Path, **overrides: object) -> list[RaftNode]:
    """Three nodes with the hub's replicated tables."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    return [
        RaftNode(
            RaftConfig(
                self_address=address,
                partners=tuple(a for a in addresses if a != address),
                data_dir=tmp_path / f"n{i}",
                password=PASSWORD,
                tables=REPLICATED_DBS,
                **local_preset(**overrides),  # type: ignore[arg-type]
            )
        )
        for i, address in enumerate(addresses)
    ]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    async with running(hub_nodes(tmp_path)) as started:
        yield started


def leader_of(nodes: list[RaftNode]) -> RaftNode:
    return next(node for node in nodes if node.status().is_leader)


def store_on(node: RaftNode, tmp_path: Path, name: str, lost: list[str]) -> ReplicatedStore:
    keys = tmp_path / f"keys-{name}"
    keys.mkdir()
    local = Store(tmp_path / f"soft-{name}")
    return ReplicatedStore(node, local, keys, on_lost=lambda: lost.append(name))


async def test_writes_reach_every_replica_and_soft_tables_stay_local(
    nodes: list[RaftNode], tmp_path: Path
) -> None:
    leader = leader_of(nodes)
    follower = next(node for node in nodes if node is not leader)
    writer = store_on(leader, tmp_path, "a", [])
    reader = store_on(follower, tmp_path, "b", [])
    await writer.claim("a", 1)
    await writer.apply(
        [
            put_json("sites", "shop-1", {"id": "shop-1"}),
            ("deltas", version_key(1), b'{"v":1}'),
            put_json("reports", "shop-1", {"report": {"site": "shop-1"}}),
        ],
        sync=True,
    )
    await follower.barrier()
    # Reads see the value, not the record head the view stores before it.
    assert reader.get_json("sites", "shop-1") == {"id": "shop-1"}
    assert reader.deltas_after(0, 10, 1 << 20) == [(1, b'{"v":1}')]
    assert reader.last_sequence("deltas") == 1
    assert reader.page("sites", None, lambda _r: True, 10, 10) == ([{"id": "shop-1"}], None)
    # The report is soft state: on the replica that received it only.
    assert writer.get_json("reports", "shop-1") == {"report": {"site": "shop-1"}}
    assert reader.get_json("reports", "shop-1") is None
    # A deletion replicates too.
    await writer.apply([("sites", b"shop-1", None)], sync=True)
    await follower.barrier()
    assert reader.get_json("sites", "shop-1") is None


async def test_a_deposed_writer_changes_nothing(nodes: list[RaftNode], tmp_path: Path) -> None:
    leader = leader_of(nodes)
    lost: list[str] = []
    old = store_on(leader, tmp_path, "old", lost)
    new = store_on(leader, tmp_path, "new", lost)
    await old.claim("old", 1)
    await old.apply([put_json("meta", "head", {"version": 1})], sync=True)
    await new.claim("new", 2)  # another replica became the writer
    with pytest.raises(ApiError) as refused:
        await old.apply([put_json("meta", "head", {"version": 99})], sync=True)
    assert refused.value.status == 503 and refused.value.code == "leader_changed"
    assert lost == ["old"]
    assert new.get_json("meta", "head") == {"version": 1}  # the late write did nothing
    with pytest.raises(ApiError):  # and the deposed store refuses at once afterwards
        await old.apply([put_json("meta", "head", {"version": 98})], sync=True)
    await new.apply([put_json("meta", "head", {"version": 2})], sync=True)
    assert new.get_json("meta", "head") == {"version": 2}


async def test_key_files_ride_with_the_writes_and_materialise_elsewhere(
    nodes: list[RaftNode], tmp_path: Path
) -> None:
    leader = leader_of(nodes)
    follower = next(node for node in nodes if node is not leader)
    writer = store_on(leader, tmp_path, "a", [])
    await writer.claim("a", 1)
    sealed = b"meshorch-sealed-key 1 kek=0011\nAAAA\n"
    (tmp_path / "keys-a" / "fleet-root.key").write_bytes(sealed)
    await writer.apply([put_json("meta", "fleet", "acme")], sync=True)
    await follower.barrier()
    other = store_on(follower, tmp_path, "b", [])
    (tmp_path / "keys-b" / "escrow.key").write_bytes(b"stale, not in the state")
    assert other.get("meta", (KEYFILE_PREFIX + "fleet-root.key").encode()) == sealed
    assert await asyncio.to_thread(other.materialise) == 1
    assert (tmp_path / "keys-b" / "fleet-root.key").read_bytes() == sealed
    assert not (tmp_path / "keys-b" / "escrow.key").exists()
    # A key file removed on the writer (a finished rotation's .new) is removed in the state.
    (tmp_path / "keys-a" / "fleet-root.key").unlink()
    await writer.apply([put_json("meta", "rotations", 1)], sync=True)
    assert writer.get("meta", (KEYFILE_PREFIX + "fleet-root.key").encode()) is None


async def test_commit_from_a_worker_thread_goes_through_raft(
    nodes: list[RaftNode], tmp_path: Path
) -> None:
    writer = store_on(leader_of(nodes), tmp_path, "a", [])
    await writer.claim("a", 1)
    await asyncio.to_thread(writer.commit, [put_json("tokens", "t1", {"id": "t1"})], sync=True)
    assert orjson.loads(writer.get("tokens", b"t1") or b"null") == {"id": "t1"}
    with pytest.raises(RuntimeError, match="event loop"):
        writer.commit([put_json("tokens", "t2", {"id": "t2"})], sync=True)


@pytest.fixture
async def slow_nodes(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    """Nodes whose every commit takes longer than their proposal timeout (1 ns: see
    tests/raft/test_slow_commits.py), two operations an entry (a guard and one write)."""
    async with running(hub_nodes(tmp_path, proposal_timeout_s=1e-9, max_batch_ops=2)) as started:
        yield started


async def test_a_slow_commit_is_awaited_and_the_writer_keeps_its_hub(
    slow_nodes: list[RaftNode], tmp_path: Path
) -> None:
    """Under load a commit can outlast the proposal timeout while the replica still leads:
    the write waits for its outcome instead of stopping the hub (``on_lost``)."""
    leader = leader_of(slow_nodes)
    lost: list[str] = []
    writer = store_on(leader, tmp_path, "a", lost)
    await writer.claim("a", leader.status().term)
    await writer.apply([put_json("meta", "head", {"version": 1})], sync=True)
    assert writer.get_json("meta", "head") == {"version": 1}
    assert writer.slow_commits == 2  # the claim and the write, both past their time
    assert lost == []


async def test_a_change_queued_past_its_time_is_refused_and_changes_nothing(
    slow_nodes: list[RaftNode], tmp_path: Path
) -> None:
    leader = leader_of(slow_nodes)
    lost: list[str] = []
    writer = store_on(leader, tmp_path, "a", lost)
    await writer.claim("a", leader.status().term)
    first, second = await asyncio.gather(
        writer.apply([put_json("sites", "shop-1", {"id": "shop-1"})], sync=True),
        writer.apply([put_json("sites", "shop-2", {"id": "shop-2"})], sync=True),
        return_exceptions=True,
    )
    assert first is None  # applied, after waiting for its slow commit
    assert isinstance(second, ApiError) and (second.status, second.code) == (503, "hub_busy")
    assert second.headers.get("Retry-After") == "1"
    assert lost == []  # nothing was applied behind the hub's back: it goes on
    await writer.apply([put_json("sites", "shop-3", {"id": "shop-3"})], sync=True)
    await wait_for(lambda: all(n.view.get("sites", b"shop-3") is not None for n in slow_nodes))
    for node in slow_nodes:
        assert node.view.get("sites", b"shop-1") is not None
        assert node.view.get("sites", b"shop-2") is None
