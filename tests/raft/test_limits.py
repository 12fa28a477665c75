"""Size limits on real pysyncobj nodes and LMDB views: the view's map grows, the state
budget refuses writes identically on every member, oversized proposals are refused,
and a peer announcing a huge message before authenticating is dropped at once."""

import asyncio
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from raft import Delete, Guard, NotCommittedError, OpResult, Put, RaftNode, transport
from raft.errors import EntryTooLargeError, StateFullError
from raft.state_machine import record_cost
from raft.transport import CappedTcpConnection

from .test_node import make_nodes, wait_for

MIB = 1 << 20


def record_applies(node: RaftNode) -> dict[int, list[OpResult] | None]:
    """Every entry ``node`` applies, with its results (installed before ``start``)."""
    seen: dict[int, list[OpResult] | None] = {}
    apply = node._on_apply

    def recording(payload: bytes, index: int) -> list[OpResult] | None:
        results = apply(payload, index)
        seen[index] = results
        return results

    node._on_apply = recording  # type: ignore[method-assign]
    return seen


def same_up_to_common_index(applies: list[dict[int, list[OpResult] | None]]) -> bool:
    common = min(max(a) for a in applies)
    firsts = [{i: r for i, r in a.items() if i <= common} for a in applies]
    return all(f == firsts[0] for f in firsts)


def counted_bytes(node: RaftNode) -> int:
    found, _ = node.view.scan("kv", b"", 1000)
    return sum(record_cost(len(k), len(r.value)) for k, r in found)


async def started(nodes: list[RaftNode]) -> list[RaftNode]:
    for node in nodes:
        await node.start()
    await wait_for(lambda: sum(n.status().is_leader for n in nodes) == 1)
    return nodes


async def test_the_view_map_grows_as_writes_pass_its_initial_size(tmp_path: Path) -> None:
    (node,) = await started(
        make_nodes(
            tmp_path, 1, view_map_bytes=MIB, max_view_bytes=64 * MIB, max_state_bytes=16 * MIB
        )
    )
    try:
        assert node.view.map_size() == MIB
        value = b"v" * (100 * 1024)
        for i in range(40):  # 4 MB: four times the initial map
            await node.propose([Put("kv", b"k%02d" % i, value)])
        assert node.view.map_size() >= 4 * MIB
        assert node.view.size_bytes() > MIB
        found, _ = node.view.scan("kv", b"k", 100)
        assert len(found) == 40 and all(r.value == value for _, r in found)
    finally:
        await node.stop()


async def test_a_full_budget_refuses_writes_identically_and_deletes_still_apply(
    tmp_path: Path,
) -> None:
    budget = 256 * 1024
    nodes = make_nodes(
        tmp_path, 3, max_state_bytes=budget, view_map_bytes=MIB, max_view_bytes=4 * MIB
    )
    applies = [record_applies(n) for n in nodes]
    await started(nodes)
    try:
        value = b"x" * (100 * 1024)
        # Each member checks against a state with room for two: all three are proposed,
        # and the log decides which one does not fit.
        outcomes = await asyncio.gather(
            *(n.propose([Put("kv", b"w%d" % i, value)]) for i, n in enumerate(nodes))
        )
        results = [r for (r,) in outcomes]
        assert sorted(r.ok for r in results) == [False, True, True]
        (refused,) = [r for r in results if not r.ok]
        assert refused.error == "no_space"
        for node in nodes:
            await node.barrier()
        # Every member computed the same results for every entry, the refusal included.
        assert all(a[refused.index] == [refused] for a in applies)
        assert same_up_to_common_index(applies)
        used = 2 * record_cost(2, len(value))
        assert [n.view.logical_bytes() for n in nodes] == [used] * 3
        keys = [sorted(k for k, _ in n.view.scan("kv", b"", 10)[0]) for n in nodes]
        assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 2
        # As this member sees the state, the write cannot fit: refused, nothing proposed.
        commit_index = nodes[0].status().commit_index
        with pytest.raises(StateFullError):
            await nodes[0].propose([Put("kv", b"more", value)])
        assert nodes[0].status().commit_index == commit_index
        # Deletes apply (they make room) and writes fit again afterwards.
        (deleted,) = await nodes[1].propose([Delete("kv", keys[0][0])])
        assert deleted.ok
        await nodes[2].barrier()  # its check reads its own view: let it see the delete
        (put,) = await nodes[2].propose([Put("kv", b"more", value)])
        assert put.ok
        for node in nodes:
            await node.barrier()
        assert {n.view.logical_bytes() for n in nodes} == {counted_bytes(nodes[0])}
        assert all(n.view.get("kv", b"more") is not None for n in nodes)
        assert same_up_to_common_index(applies)
    finally:
        for node in nodes:
            await node.stop()


async def test_a_guarded_write_over_budget_is_refused_whole(tmp_path: Path) -> None:
    (node,) = await started(
        make_nodes(
            tmp_path, 1, max_state_bytes=256 * 1024, view_map_bytes=MIB, max_view_bytes=4 * MIB
        )
    )
    try:
        await node.propose([Put("kv", b"a", b"x" * (200 * 1024))])
        ops = [Guard("kv", b"g", 0, 2), Put("kv", b"g", b"1"), Put("kv", b"b", b"y" * 40_000)]
        # Each fits alone, so both are proposed (in one entry); not both: the state
        # machine refuses the guard and both of its writes.
        first, second = await asyncio.gather(
            node.propose([Put("kv", b"c", b"z" * 30_000)]), node.propose(ops)
        )
        assert first[0].ok
        assert [r.error for r in second] == ["no_space"] * 3
        assert node.view.get("kv", b"g") is None and node.view.get("kv", b"b") is None
    finally:
        await node.stop()


async def test_a_member_whose_view_cannot_grow_stops_and_the_others_carry_on(
    tmp_path: Path,
) -> None:
    nodes = await started(make_nodes(tmp_path, 3, view_map_bytes=MIB))
    try:
        broken = next(n for n in nodes if not n.status().is_leader)
        broken.view.max_map_size = 2 * MIB  # as if its disk overhead outgrew the margin
        others = [n for n in nodes if n is not broken]
        ops = [Put("kv", b"big%d" % i, b"b" * MIB) for i in range(3)]
        results = await others[0].propose(ops)
        assert all(r.ok for r in results)
        # It stops instead of retrying the entry on every tick...
        await wait_for(lambda: broken._stopped, timeout_s=10)
        assert broken.failure is not None and "max_view_bytes" in str(broken.failure)
        assert broken._applied_index < results[0].index  # neither applied nor skipped
        with pytest.raises(NotCommittedError, match="node stopped"):
            await broken.propose([Put("kv", b"x", b"1")])
        # ... and the other two, a majority, keep committing.
        (result,) = await others[1].propose([Put("kv", b"after", b"1")])
        assert result.ok
    finally:
        for node in nodes:
            await node.stop()


async def test_an_oversized_proposal_is_refused_before_pysyncobj_sees_it(
    tmp_path: Path,
) -> None:
    (node,) = await started(make_nodes(tmp_path, 1))
    try:
        await node.propose([Put("kv", b"warm", b"up")])
        syncobj = node._syncobj
        assert syncobj is not None
        log_before = syncobj.getStatus()["log_len"]
        commit_before = node.status().commit_index
        # Nine values of 1 MiB: more than the default max_entry_bytes (8 MiB).
        ops = [Put("kv", b"k%d" % i, b"v" * MIB) for i in range(9)]
        with pytest.raises(EntryTooLargeError, match="max_entry_bytes"):
            await node.propose(ops)
        assert not node._pending and not node._batches
        await asyncio.sleep(0.2)
        assert syncobj.getStatus()["log_len"] == log_before
        assert node.status().commit_index == commit_before
        assert node.view.get("kv", b"k0") is None
        # Seven fit, in one entry.
        results = await node.propose(ops[:7])
        assert all(r.ok for r in results) and len({r.index for r in results}) == 1
    finally:
        await node.stop()


async def test_large_entries_still_replicate_between_authenticated_peers(
    tmp_path: Path,
) -> None:
    # What is checked is the message cap, not the disk: with "power" each member
    # fdatasyncs the 6 MiB on its event loop, which on a busy shared disk outlasts the
    # local preset's election timeout (a leader change: an unknown outcome).
    nodes = await started(make_nodes(tmp_path, 3, durability="process"))
    try:
        follower = next(n for n in nodes if not n.status().is_leader)
        # 6 MiB in one entry: sent in pieces of appendEntriesBatchSizeBytes, each far
        # above the pre-authentication cap.
        ops = [Put("kv", b"big%d" % i, bytes([i]) * MIB) for i in range(6)]
        results = await follower.propose(ops)
        assert all(r.ok for r in results)
        for node in nodes:
            await node.barrier()
            assert node.view.get("kv", b"big5") is not None
    finally:
        for node in nodes:
            await node.stop()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class _RssSampler:
    """The highest resident size seen, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def _send_junk(address: str, header: bytes, junk_bytes: int) -> tuple[int, float, bool]:
    """Send ``header`` then up to ``junk_bytes`` of junk for at most 3 s; return (bytes
    sent, seconds until the peer closed the connection, whether it closed it)."""
    host, _, port = address.rpartition(":")
    chunk = b"\xa5" * (64 * 1024)
    began = time.monotonic()
    sent = 0
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        try:
            sock.sendall(header)
            while sent < junk_bytes:
                if time.monotonic() - began > 3:
                    return sent, time.monotonic() - began, False  # still reading
                sock.sendall(chunk)
                sent += len(chunk)
            # All sent: does the node close the connection now?
            sock.shutdown(socket.SHUT_WR)
            closed = sock.recv(1) == b""
        except TimeoutError:  # the node neither reads nor closes
            closed = False
        except OSError:  # reset or broken pipe: the node closed it
            closed = True
    return sent, time.monotonic() - began, closed


async def test_a_huge_length_header_before_authentication_is_dropped_at_once(
    tmp_path: Path,
) -> None:
    nodes = await started(make_nodes(tmp_path, 3))
    try:
        target = nodes[0]
        await target.propose([Put("kv", b"before", b"1")])
        before = _rss_bytes()
        header = struct.pack("i", 0x7FFFFFFF)  # pysyncobj's framing: a 2 GiB message
        with _RssSampler() as rss:
            sent, elapsed, closed = await asyncio.to_thread(
                _send_junk, target.config.self_address, header, 256 * MIB
            )
        # Dropped after the first read: what was sent fits in the sockets' buffers.
        assert closed and sent < 32 * MIB, (sent, elapsed)
        assert elapsed < 2.0
        assert rss.peak - before < 8 * MIB, (rss.peak - before) / MIB
        # The cluster keeps committing, through the node that was attacked too.
        for i, node in enumerate(nodes):
            (result,) = await node.propose([Put("kv", b"after%d" % i, b"2")])
            assert result.ok
        for node in nodes:
            await node.barrier()
            assert all(node.view.get("kv", b"after%d" % i) for i in range(3))
    finally:
        for node in nodes:
            await node.stop()


async def test_every_connection_of_a_node_is_capped(tmp_path: Path) -> None:
    nodes = await started(make_nodes(tmp_path, 3))
    try:
        await wait_for(lambda: all(len(n.reachable()) == 3 for n in nodes))
        for node in nodes:
            transport = node._syncobj._SyncObj__transport  # type: ignore[union-attr]
            connections = list(transport._connections.values())
            assert len(connections) == 2  # one outgoing, one incoming
            assert all(isinstance(c, CappedTcpConnection) for c in connections)
            assert all(c.message_bytes > 16 * MIB for c in connections)
    finally:
        for node in nodes:
            await node.stop()


def _held_open(address: str, count: int) -> list[socket.socket]:
    host, _, port = address.rpartition(":")
    return [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset: closed too


async def test_silent_connections_are_closed_and_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stranger opening connections and saying nothing: beyond the cap they are closed at
    once, and each is closed once its time to identify itself is up; members carry on."""
    monkeypatch.setattr(transport, "IDENTIFY_S", 3.0)
    monkeypatch.setattr(transport, "MAX_UNKNOWN_CONNECTIONS", 4)
    nodes = await started(make_nodes(tmp_path, 3))
    try:
        socks = await asyncio.to_thread(_held_open, nodes[0].config.self_address, 10)
        try:
            # Beyond the cap (4 waiting at once): closed as soon as the node accepts them.
            await asyncio.sleep(1.0)
            early = [await asyncio.to_thread(_closed_by_peer, s, 0.1) for s in socks]
            assert early.count(True) >= 6 and early.count(False) >= 1, early
            await asyncio.sleep(3.0)
            late = [await asyncio.to_thread(_closed_by_peer, s, 0.5) for s in socks]
            assert all(late), late  # and the rest once their time to identify is up
        finally:
            for sock in socks:
                sock.close()
        for i, node in enumerate(nodes):
            (result,) = await node.propose([Put("kv", b"still%d" % i, b"1")])
            assert result.ok
    finally:
        for node in nodes:
            await node.stop()


async def test_pysyncobj_admin_commands_are_refused_even_with_the_password(
    tmp_path: Path,
) -> None:
    """pysyncobj's utility protocol (status, add or remove a member, hand over leadership)
    over the Raft port: refused, whoever knows the password. The members still connect."""
    from pysyncobj.utility import TcpUtility, UtilityException

    from .test_node import PASSWORD

    nodes = await started(make_nodes(tmp_path, 3))
    try:
        await wait_for(lambda: all(len(n.reachable()) == 3 for n in nodes))
        leader = next(n for n in nodes if n.status().is_leader)
        members_before = leader.status().members
        for command in (
            ["status"],
            ["add", "127.0.0.1:1"],
            ["remove", nodes[1].config.self_address],
        ):
            utility = TcpUtility(PASSWORD, timeout=3.0)
            with pytest.raises(UtilityException):
                await asyncio.to_thread(utility.executeCommand, leader.config.self_address, command)
        await asyncio.sleep(0.5)
        assert leader.status().members == members_before
        assert all(len(n.reachable()) == 3 for n in nodes)
    finally:
        for node in nodes:
            await node.stop()
