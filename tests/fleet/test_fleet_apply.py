"""The pure side of the site's fleet link: deltas to Raft writes, the site report."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.appspec import from_json, parse_app_spec, to_json
from meshorch.delta import (
    ALL_SITES,
    GENESIS_HASH,
    Target,
    TrustState,
    key_id,
    next_delta,
    sign,
    verify_batch,
)
from meshorch.errors import RemoteInputError
from meshorch.fleet_apply import (
    TRUST_KEY,
    LinkConfig,
    SiteFacts,
    VersionExists,
    app_put_ops,
    build_report,
    check_link_config,
    merge_link_config,
    plan_apply,
)
from meshorch.rollout import RolloutState
from meshorch.scheduler import HostInfo, Placement
from meshorch.site_state import APPS_TABLE, SYSTEM_TABLE
from meshorch.workloads import InstanceReport, app_key, appver_key, encode_spec, rollout_key
from raft import Delete, Guard, Put

NOW = 1_790_000_000.0
ROOT = SigningKey(b"r" * 32)

SPEC = """
api_version: meshorch/v1
name: web
version: "{version}"
services:
  - name: main
    replicas: {replicas}
    containers:
      - name: main
        image: process
        command: ["sleep", "100"]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
"""


def spec_json(version: str = "1", replicas: int = 2) -> dict[str, Any]:
    return to_json(parse_app_spec(SPEC.format(version=version, replicas=replicas)))


def chain(*op_lists: list[dict[str, Any]], target: Target = ALL_SITES) -> list[bytes]:
    raws, version, head = [], 0, GENESIS_HASH
    for ops in op_lists:
        envelope, delta = sign(next_delta("acme", version, head, ops, target, NOW, 60), [ROOT])
        raws.append(envelope)
        version, head = delta.version, delta.digest
    return raws


def trust() -> TrustState:
    return TrustState("acme", frozenset({key_id(ROOT)}))


def verified(raws: list[bytes]) -> tuple[list[Any], TrustState]:
    result = verify_batch(raws, trust(), NOW)
    assert result.rejected is None and result.state is not None
    return result.accepted, result.state


def empty(table: str, key: bytes) -> bytes | None:
    return None


def test_app_put_for_this_site_writes_the_spec_and_the_trust_with_cas() -> None:
    deltas, state = verified(chain([{"op": "app.put", "spec": spec_json()}]))
    plan = plan_apply(deltas, state, 17, "shop-1", empty)
    encoded = encode_spec(from_json(spec_json()))
    # One guard on the trust record read covers every write: all or nothing.
    assert plan.ops[0] == Guard(SYSTEM_TABLE, TRUST_KEY, 17, 3)
    assert plan.ops[1:3] == [
        Put(APPS_TABLE, appver_key("web", "1"), encoded),
        Put(APPS_TABLE, app_key("web"), encoded),
    ]
    trust_put = plan.ops[-1]
    assert isinstance(trust_put, Put)
    assert (trust_put.table, trust_put.key) == (SYSTEM_TABLE, TRUST_KEY)
    assert TrustState.from_json(orjson.loads(trust_put.value)) == state
    assert plan.applied == [1] and plan.for_site == [1] and not plan.op_errors


def test_first_trust_write_expects_absent_record_index() -> None:
    deltas, state = verified(chain([]))
    plan = plan_apply(deltas, state, 0, "shop-1", empty)
    assert plan.ops == [
        Guard(SYSTEM_TABLE, TRUST_KEY, 0, 1),
        Put(SYSTEM_TABLE, TRUST_KEY, orjson.dumps(state.to_json())),
    ]


def test_ops_of_a_delta_for_other_sites_are_ignored_but_the_version_advances() -> None:
    raws = chain([{"op": "app.put", "spec": spec_json()}], target=Target(sites=frozenset({"x"})))
    deltas, state = verified(raws)
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    assert len(plan.ops) == 2 and plan.applied == [1] and plan.for_site == []


def test_delete_and_the_overlay_of_earlier_deltas_in_the_batch() -> None:
    raws = chain(
        [{"op": "app.put", "spec": spec_json("1")}],
        [{"op": "app.delete", "name": "web"}],
        [{"op": "app.put", "spec": spec_json("1", replicas=3)}],  # same version, new content
    )
    deltas, state = verified(raws)
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    assert Delete(APPS_TABLE, app_key("web")) in plan.ops
    assert Delete(APPS_TABLE, rollout_key("web")) in plan.ops
    # Version 1 was written by delta 1 of this batch with other content: refused.
    assert [(e.version, e.op) for e in plan.op_errors] == [(3, "app.put")]
    assert plan.applied == [1, 2, 3]


def test_unknown_and_invalid_ops_are_skipped_and_recorded() -> None:
    raws = chain(
        [
            {"op": "app.frobnicate"},
            {"op": "app.put", "spec": {"name": "x"}},
            {"op": "app.put", "spec": "nope"},
            {"op": "app.delete"},
            {"op": "app.put", "spec": spec_json()},
        ]
    )
    deltas, state = verified(raws)
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    assert [e.index for e in plan.op_errors] == [0, 1, 2, 3]
    assert "unknown operation" in plan.op_errors[0].message
    assert len(plan.ops) == 4  # the guard, the good app.put and the trust
    entry = plan.op_errors[0].rejection(NOW)
    assert entry["reason"] == "bad_op" and entry["version"] == 1


def test_app_put_refuses_a_known_version_with_other_content() -> None:
    spec = from_json(spec_json("1"))
    other = encode_spec(from_json(spec_json("1", replicas=5)))
    with pytest.raises(VersionExists):
        app_put_ops(spec, other)
    assert len(app_put_ops(spec, encode_spec(spec))) == 2


def test_rotation_changes_trust_only_through_the_state() -> None:
    new = SigningKey(b"n" * 32)
    envelope, _ = sign(
        next_delta("acme", 0, GENESIS_HASH, [{"op": "root.rotate", "new_key": key_id(new)}],
                   ALL_SITES, NOW, 60),
        [ROOT, new],
    )  # fmt: skip
    deltas, state = verified([envelope])
    assert state.trusted_keys == {key_id(new)}
    plan = plan_apply(deltas, state, 3, "shop-1", empty)
    assert len(plan.ops) == 2 and not plan.op_errors


# -- link configuration ----------------------------------------------------------------


def test_link_config_validation_lists_problems() -> None:
    with pytest.raises(RemoteInputError) as info:
        check_link_config("ftp://x", "", "abc")
    message = str(info.value)
    assert "hub" in message and "fleet" in message and "root_key" in message
    config = check_link_config("http://hub:1/", "acme", key_id(ROOT).upper(), "tok")
    assert config == LinkConfig("http://hub:1", "acme", key_id(ROOT), "tok")
    assert "enroll_token" not in config.to_json()
    assert LinkConfig.decode(config.encode()) == config


def test_link_config_cannot_change_fleet_or_root_key() -> None:
    first = LinkConfig("http://hub:1", "acme", key_id(ROOT))
    state = first.initial_trust()
    assert merge_link_config(first, None, None) == first
    with pytest.raises(RemoteInputError, match="fleet"):
        merge_link_config(LinkConfig("http://hub:1", "other", key_id(ROOT)), first, state)
    other_key = key_id(SigningKey(b"o" * 32))
    with pytest.raises(RemoteInputError) as info:
        merge_link_config(LinkConfig("http://hub:1", "acme", other_key), first, state)
    assert info.value.code == "root_key_conflict"
    moved = merge_link_config(LinkConfig("http://hub:2", "acme", key_id(ROOT)), first, state)
    assert moved.hub == "http://hub:2" and moved.root_key == key_id(ROOT)
    # After a rotation the new key may be named, but the stored one stays.
    rotated = TrustState("acme", frozenset({other_key}), 4, "a" * 64)
    again = merge_link_config(LinkConfig("http://hub:2", "acme", other_key), first, rotated)
    assert again.root_key == key_id(ROOT)


# -- the report ----------------------------------------------------------------------------


def placement(index: int, version: str = "1", host: str = "h1") -> Placement:
    return Placement(f"web.main.{index}", "web", "main", index, version, host, 100, 1 << 20)


def report_of(index: int, version: str = "1", host: str = "h1", **kw: Any) -> InstanceReport:
    fields: dict[str, Any] = {"state": "running", "ready": True, "restarts": 0, "since": NOW}
    fields.update(kw)
    return InstanceReport(f"web.main.{index}", host, version, **fields)


HOSTS = [HostInfo("h1", {}, 1000, 1 << 30, True), HostInfo("h2", {}, 1000, 1 << 30, False)]


def site_report(
    version: str,
    placements: list[Placement],
    reports: list[InstanceReport],
    rollout: RolloutState | None = None,
) -> dict[str, Any]:
    facts = SiteFacts(
        specs=[from_json(spec_json(version))],
        placements=placements,
        reports={r.instance_id: r for r in reports},
        rollouts={} if rollout is None else {"web": rollout},
        hosts=HOSTS,
        members=["h1", "h2", "h3"],
    )
    state = TrustState("acme", frozenset({key_id(ROOT)}), 7, "b" * 64)
    rejections = [{"reason": "expired", "message": "m", "version": 8, "at": NOW}]
    return build_report("shop-1", NOW, state, rejections, facts)


def test_report_healthy() -> None:
    report = site_report("1", [placement(0), placement(1)], [report_of(0), report_of(1)])
    assert report["v"] == 1 and report["site"] == "shop-1" and report["time"] == NOW
    assert report["applied_version"] == 7 and report["applied_head"] == "b" * 64
    assert report["rejections"][0]["reason"] == "expired"
    assert report["apps"]["web"] == {
        "version": "1", "desired": 2, "ready": 2, "state": "healthy", "message": ""
    }  # fmt: skip
    hosts = {h["host_id"]: h for h in report["hosts"]}
    assert set(hosts) == {"h1", "h2", "h3"}
    assert hosts["h1"]["alive"] and not hosts["h2"]["alive"] and not hosts["h3"]["alive"]
    assert hosts["h1"]["instances"][0] == {
        "app": "web", "instance_id": "web.main.0", "service": "main", "version": "1",
        "state": "running", "ready": True, "restarts": 0,
    }  # fmt: skip


def test_report_progressing_when_not_all_ready_or_rolling() -> None:
    report = site_report("1", [placement(0), placement(1)], [report_of(0)])
    assert report["apps"]["web"]["state"] == "progressing"
    assert report["apps"]["web"]["ready"] == 1
    report = site_report("2", [placement(0, "2"), placement(1, "1")], [report_of(0, "2")])
    assert report["apps"]["web"]["state"] == "progressing"
    rolling = RolloutState("web", "1", "2", NOW)
    report = site_report(
        "2", [placement(0, "2"), placement(1, "2")], [report_of(0, "2"), report_of(1, "2")], rolling
    )
    assert report["apps"]["web"]["state"] == "progressing"
    # An instance reported by a host that no longer runs it counts for nothing.
    report = site_report("1", [placement(0), placement(1)], [report_of(0), report_of(1, host="h9")])
    assert report["apps"]["web"]["ready"] == 1


def test_report_failed_on_rollback_or_failed_instance() -> None:
    rolled_back = RolloutState("web", "1", "2", NOW, phase="rolled_back", reason="not ready")
    report = site_report(
        "2", [placement(0), placement(1)], [report_of(0), report_of(1)], rolled_back
    )
    assert report["apps"]["web"]["state"] == "failed"
    assert "rolled back" in report["apps"]["web"]["message"]
    report = site_report(
        "1", [placement(0), placement(1)], [report_of(0), report_of(1, state="failed", ready=False)]
    )
    assert report["apps"]["web"]["state"] == "failed"
