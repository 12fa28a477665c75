"""Services of the agent built alone from what they use: a one-member Raft node on loopback
(real pysyncobj, real LMDB view), a roster of the site's hosts, and each other. No agent,
no HTTP server: what a test of one service needs since the services stopped taking the agent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshorch.apps.controller import SiteController
from meshorch.apps.pressure import PressureGuard
from meshorch.apps.records import (
    INST_PREFIX,
    decode_hostinfo,
    decode_placement,
    encode_hostinfo,
    host_protocols,
    hostinfo_key,
)
from meshorch.apps.resources import HostResources
from meshorch.apps.scheduler import HostInfo
from meshorch.apps.spec import parse_app_spec
from meshorch.demo.localsite import free_port
from meshorch.fleet import decommission
from meshorch.fleet.apply import app_put_ops
from meshorch.state.roster import Roster
from meshorch.state.tables import (
    APPS_TABLE,
    DRAIN_PREFIX,
    SITE_TABLES,
    SYSTEM_TABLE,
    MemberRecord,
)
from meshorch.streams.site import SiteStreams
from raft import Put, RaftConfig, RaftNode, local_preset
from tests.waiting import until

HOST = "h1"
MIB = 1 << 20
APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: pos
    priority: 10
    containers:
      - {name: main, image: process, command: ["sleep", "1000"],
         resources: {memory_limit: 32Mi, cpu_request: 0.1}}
"""


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RaftNode]:
    raft = RaftNode(
        RaftConfig(
            self_address=f"127.0.0.1:{free_port()}",
            partners=(),
            data_dir=tmp_path / "raft",
            password="test-password-0123456789",
            tables=SITE_TABLES,
            **local_preset(),  # type: ignore[arg-type]
        )
    )
    await raft.start()
    try:
        await until("leader", lambda: raft.status().is_leader, 20)
        yield raft
    finally:
        await raft.stop()


async def register(node: RaftNode, host: HostInfo) -> None:
    member = MemberRecord(host.host_id, node.status().self_address, None)
    await node.propose(
        [
            Put(SYSTEM_TABLE, member.key(), member.encode()),
            Put(APPS_TABLE, hostinfo_key(host.host_id), encode_hostinfo(host)),
        ]
    )


def placements_on(node: RaftNode, host_id: str) -> list[str]:
    records, _ = node.view.scan(APPS_TABLE, INST_PREFIX, 1000)
    placed = (decode_placement(record.value) for _, record in records)
    return [p.instance_id for p in placed if p.host_id == host_id]


def host_normal() -> HostInfo:
    return HostInfo(HOST, {}, 4000, 1024 * MIB, protocol=2)


async def placed_app(node: RaftNode) -> tuple[Roster, SiteController]:
    roster = Roster(node, node.reachable, HOST)
    streams = SiteStreams(node, HOST, lambda: host_protocols(node.view))
    controller = SiteController(node, roster, streams)
    await register(node, host_normal())
    await node.propose(app_put_ops(parse_app_spec(APP), None))
    await controller.tick()
    return roster, controller


async def test_the_controller_places_an_app_on_the_one_live_host(node: RaftNode) -> None:
    roster, _ = await placed_app(node)
    assert [m.host_id for m in roster.members()] == [HOST]
    assert roster.reachable_hosts() == {HOST}
    assert len(placements_on(node, HOST)) == 1


async def test_a_drained_host_loses_its_instance_at_the_next_tick(node: RaftNode) -> None:
    roster, controller = await placed_app(node)
    await node.propose([Put(SYSTEM_TABLE, DRAIN_PREFIX + HOST.encode(), b"1")])
    assert roster.drained_hosts() == {HOST}
    await controller.tick()
    assert placements_on(node, HOST) == []


def resources(used_pct: float) -> HostResources:
    total = 1000 * MIB
    used = int(total * used_pct / 100)
    return HostResources(2, 0.1, total, used, total, used, time.time())


async def test_pressure_sheds_capacity_then_gives_it_back(node: RaftNode, tmp_path: Path) -> None:
    await placed_app(node)
    use = [resources(99.0)]
    guard = PressureGuard(
        node, HOST, tmp_path, host_normal(), 95.0, sampler=lambda _dir, _now: use[0]
    )

    def advertised() -> int:
        record = node.view.get(APPS_TABLE, hostinfo_key(HOST))
        assert record is not None
        return decode_hostinfo(record.value, alive=True).memory_bytes

    await guard.check()
    assert advertised() == 32 * MIB - 1  # less than what is placed here: one must go
    assert guard.evictions == 1
    use[0] = resources(92.0)  # under the threshold, but within the hysteresis
    await guard.check()
    assert advertised() == 32 * MIB - 1
    use[0] = resources(50.0)
    await guard.check()
    assert advertised() == host_normal().memory_bytes


async def test_decommission_deletes_the_apps_then_reports_done(node: RaftNode) -> None:
    _, controller = await placed_app(node)
    await node.propose(decommission.op_writes(7))
    state = decommission.state(node.view)
    assert state is not None and state["state"] == "running"
    await decommission.step(node, state)
    stopping = decommission.state(node.view)
    assert stopping is not None and stopping["state"] == "stopping"
    await decommission.step(node, stopping)
    assert decommission.state(node.view) == stopping  # an instance is still placed
    await controller.tick()  # the app is gone: its placement goes too
    assert placements_on(node, HOST) == []
    await decommission.step(node, stopping)
    done = decommission.state(node.view)
    assert done is not None and done["state"] == "done" and done["version"] == 7
