"""The pure side of the site's fleet link: deltas to Raft writes, the site report."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.apps.quotas import Quota, decode_quota
from meshorch.apps.records import (
    AppRecord,
    InstanceReport,
    app_key,
    appver_key,
    decode_app,
    encode_spec,
    rollout_key,
)
from meshorch.apps.rollout import RolloutState
from meshorch.apps.scheduler import HostInfo, Placement
from meshorch.apps.spec import from_json, parse_app_spec, to_json
from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import (
    TRUST_KEY,
    LinkConfig,
    NameTaken,
    SiteFacts,
    VersionExists,
    app_put_ops,
    app_view,
    build_report,
    check_link_config,
    merge_link_config,
    plan_apply,
)
from meshorch.fleet.delta import (
    ALL_SITES,
    GENESIS_HASH,
    Target,
    TrustState,
    key_id,
    next_delta,
    sign,
    verify_batch,
)
from meshorch.state.tables import APPS_TABLE, SYSTEM_TABLE
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
        [{"op": "app.delete", "name": "web", "confirmed": 1}],  # the site's only app
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


# -- tenants and quotas ----------------------------------------------------------------------


class Table:
    """A dict as the site's view, for ops read back by later ones."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}

    def read(self, table: str, key: bytes) -> bytes | None:
        return self.data.get((table, key))

    def apply(self, plan_ops: list[Any]) -> None:
        for op in plan_ops:
            if isinstance(op, Put):
                self.data[(op.table, op.key)] = op.value
            elif isinstance(op, Delete):
                self.data.pop((op.table, op.key), None)


def test_app_put_stores_the_tenant_and_old_records_are_default() -> None:
    deltas, state = verified(chain([{"op": "app.put", "spec": spec_json(), "tenant": "acme"}]))
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    assert not plan.op_errors
    written = {op.key: op.value for op in plan.ops if isinstance(op, Put)}
    record = decode_app(written[app_key("web")])
    assert record.tenant == "acme" and record.spec == from_json(spec_json())
    assert orjson.loads(written[app_key("web")])["v"] == 2
    assert decode_app(written[appver_key("web", "1")]).tenant == "acme"
    # A version 1 record (before tenants) belongs to "default".
    v1 = orjson.dumps({"v": 1, "spec": spec_json()})
    assert decode_app(v1) == AppRecord(from_json(spec_json()), "default")


def test_an_app_name_belongs_to_one_tenant() -> None:
    raws = chain(
        [{"op": "app.put", "spec": spec_json("1"), "tenant": "acme"}],
        [{"op": "app.put", "spec": spec_json("2"), "tenant": "globex"}],  # refused
        [{"op": "app.put", "spec": spec_json("2")}],  # default tenant: refused too
        [{"op": "app.delete", "name": "web", "tenant": "globex", "confirmed": 1}],  # refused
        [{"op": "app.put", "spec": spec_json("2"), "tenant": "acme"}],  # its owner: fine
        [{"op": "app.delete", "name": "web", "tenant": "acme", "confirmed": 1}],
        [{"op": "app.put", "spec": spec_json("1", replicas=4), "tenant": "globex"}],  # free now
    )
    deltas, state = verified(raws)
    table = Table()
    plan = plan_apply(deltas, state, 5, "shop-1", table.read)
    assert [(e.version, e.op) for e in plan.op_errors] == [
        (2, "app.put"), (3, "app.put"), (4, "app.delete")
    ]  # fmt: skip
    for error in plan.op_errors:
        assert error.message == "application web belongs to another tenant"
        assert error.rejection(NOW)["reason"] == "bad_op"
    table.apply(plan.ops)
    final = decode_app(table.data[(APPS_TABLE, app_key("web"))])
    # acme's version 1 was left behind in appver/: globex's own version 1 replaces it.
    assert final.tenant == "globex" and final.spec.services[0].replicas == 4


def test_app_put_ops_name_clash_and_version_check_per_tenant() -> None:
    spec = from_json(spec_json("1"))
    mine = encode_spec(spec, "acme")
    with pytest.raises(NameTaken):
        app_put_ops(spec, mine, "globex", mine)
    assert len(app_put_ops(spec, mine, "acme", mine)) == 2
    with pytest.raises(VersionExists):
        app_put_ops(from_json(spec_json("1", replicas=5)), mine, "acme", mine)


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "a" * 64, 3, "acme/x"])
def test_app_put_with_a_bad_tenant_is_a_bad_op(tenant: object) -> None:
    deltas, state = verified(chain([{"op": "app.put", "spec": spec_json(), "tenant": tenant}]))
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    (error,) = plan.op_errors
    assert "is not a tenant" in error.message and len(plan.ops) == 2  # the guard, the trust


def test_tenant_quota_op_sets_and_removes_a_quota() -> None:
    raws = chain(
        [{"op": "tenant.quota", "tenant": "acme", "cpu_millis": 500, "memory_bytes": None,
          "instances": 4}],
        [{"op": "tenant.quota", "tenant": "acme", "cpu_millis": None, "memory_bytes": None,
          "instances": None}],
    )  # fmt: skip
    deltas, state = verified(raws)
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    assert not plan.op_errors
    put = next(op for op in plan.ops if isinstance(op, Put) and op.key == b"quota/acme")
    assert decode_quota(put.value) == ("acme", Quota(500, None, 4))
    assert Delete(APPS_TABLE, b"quota/acme") in plan.ops


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"tenant": "acme", "cpu_millis": -5}, "cpu_millis: -5 is not between 0"),
        ({"tenant": "acme", "memory_bytes": "64Mi"}, "memory_bytes: an integer or null"),
        ({"tenant": "acme", "instances": 2.0}, "instances: an integer or null"),
        ({"tenant": "acme", "instances": False}, "instances: an integer or null"),
        ({"tenant": "acme", "cpus": 1}, "unknown fields: cpus"),
        ({"cpu_millis": 1}, "tenant: None is not a tenant"),
        ({"tenant": "ACME", "cpu_millis": 1}, "tenant: 'ACME' is not a tenant"),
    ],
)
def test_bad_tenant_quota_ops_are_skipped(op: dict[str, Any], message: str) -> None:
    deltas, state = verified(chain([{"op": "tenant.quota", **op}]))
    plan = plan_apply(deltas, state, 5, "shop-1", empty)
    (error,) = plan.op_errors
    assert error.op == "tenant.quota" and message in error.message
    assert not any(isinstance(o, Put) and o.table == APPS_TABLE for o in plan.ops)


def unplaced_record(index: int, state: str, reason: str) -> InstanceReport:
    return InstanceReport(f"web.main.{index}", "", "1", state, False, 0, NOW, reason)


def test_report_failed_when_an_instance_is_over_quota() -> None:
    reason = "tenant acme over its quota: instances 2 of 1"
    report = site_report(
        "1", [placement(0)], [report_of(0), unplaced_record(1, "over_quota", reason)]
    )
    assert report["apps"]["web"] == {
        "version": "1", "desired": 2, "ready": 1, "state": "failed",
        "message": f"web.main.1 not placed: {reason}",
    }  # fmt: skip
    # Not on any host in the report.
    assert [i["instance_id"] for h in report["hosts"] for i in h["instances"]] == ["web.main.0"]


def test_report_progressing_with_the_reason_when_no_host_can_take_it() -> None:
    reason = "no host can take it (needs 100m CPU and 1Mi memory): 1 lack memory"
    report = site_report(
        "1", [placement(0)], [report_of(0), unplaced_record(1, "unplaced", reason)]
    )
    assert report["apps"]["web"]["state"] == "progressing"
    assert report["apps"]["web"]["message"] == f"1/2 ready; web.main.1 not placed: {reason}"


def test_a_stale_unplaced_record_of_a_placed_instance_is_ignored() -> None:
    report = site_report(
        "1", [placement(0), placement(1)], [report_of(0), unplaced_record(1, "over_quota", "x")]
    )
    assert report["apps"]["web"]["state"] == "progressing"
    assert report["apps"]["web"]["message"] == "1/2 ready"


def test_app_view_shows_tenant_and_unplaced_instances() -> None:
    spec = from_json(spec_json())
    reports = {"web.main.1": unplaced_record(1, "over_quota", "tenant acme over its quota")}
    view = app_view(spec, [placement(0)], reports, None, "acme")
    assert view["tenant"] == "acme"
    assert [i["instance_id"] for i in view["instances"]] == ["web.main.0"]
    assert view["unplaced"] == [
        {"instance_id": "web.main.1", "version": "1", "state": "over_quota",
         "reason": "tenant acme over its quota"}
    ]  # fmt: skip
