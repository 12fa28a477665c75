"""The deletion interlock: changes that would stop an application at too many sites are
refused with the list of what would go, then accepted with the count typed back; the
operations of a confirmed change carry the confirmation (real hub, real HTTP, LMDB)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from central_hub import Hub, interlock
from central_hub.interlock import Assessment, Removal, Thresholds, assess, left_empty
from meshorch.fleet.interlock import refused_groups
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, spec_text
from tests.hub.test_delta_export import cli, hub_env

# -- pure ------------------------------------------------------------------------------


def sites(count: int, prefix: str = "s") -> frozenset[str]:
    return frozenset(f"{prefix}{i:03d}" for i in range(count))


def test_the_thresholds_the_issue_names() -> None:
    ten_percent = assess([Removal("web", sites(10), 100)])
    assert ten_percent.reasons == () and ten_percent.touched == 10  # 10% exactly: fine
    eleven = assess([Removal("web", sites(11), 100)])
    assert eleven.reasons == ("web would stop at 11 of its 100 sites (more than 10%)",)
    many = assess([Removal("web", sites(51), 1000)])  # 5.1%, but more than 50 sites
    assert many.reasons == ("web would stop at 51 sites (more than 50)",)
    assert assess([Removal("web", sites(50), 1000)]).reasons == ()
    emptied = assess([Removal("web", sites(1), 100)], {"s000"})
    assert emptied.reasons == ("1 site(s) would be left running no application",)
    loose = Thresholds(fraction=1.0, max_sites=10**6)
    assert assess([Removal("web", sites(60), 100)], (), loose).reasons == ()


def test_touched_counts_each_site_once_and_the_list_is_bounded() -> None:
    big = sites(interlock.MAX_LISTED_SITES + 5)
    found = assess([Removal("a", big, 2000), Removal("b", sites(3), 3)], {"s001"})
    assert found.touched == len(big)
    details = found.details()
    assert details["sites"] == len(big) and details["truncated"] is True
    assert sum(len(r["sites"]) for r in details["removals"]) == interlock.MAX_LISTED_SITES
    assert [r["stops_at"] for r in details["removals"]] == [len(big), 3]


def test_confirmation_must_match_whether_needed_or_not() -> None:
    needed = assess([Removal("web", sites(60), 100)])
    with pytest.raises(interlock.ConfirmationRequired) as refused:
        interlock.confirmation(needed, None, "x")
    assert refused.value.code == "confirmation_required" and refused.value.status == 409
    assert refused.value.details is not None and refused.value.details["sites"] == 60
    with pytest.raises(interlock.ConfirmationRequired) as wrong:
        interlock.confirmation(needed, 59, "x")
    assert wrong.value.code == "confirmation_mismatch"
    assert interlock.confirmation(needed, 60, "x") == 60
    small = assess([Removal("web", sites(1), 100)])
    assert interlock.confirmation(small, None, "x") is None
    with pytest.raises(interlock.ConfirmationRequired):
        interlock.confirmation(small, 3, "x")
    assert interlock.confirmation(Assessment((), frozenset(), 0, ()), None, "x") is None


def test_left_empty_sees_the_other_apps_of_a_site() -> None:
    losing = {"a": ["web"], "b": ["web"], "c": ["web", "db"]}
    apps = [("web", ["a", "b", "c"]), ("db", ["b", "c"])]
    assert left_empty(losing, apps) == {"a", "c"}


def delete(name: str, confirmed: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "app.delete", "name": name}
    return {**op, "confirmed": 2} if confirmed else op


def put(name: str) -> dict[str, Any]:
    return {"op": "app.put", "spec": {"name": name}}


def test_a_site_refuses_a_delta_emptying_it_without_a_confirmation() -> None:
    assert refused_groups([(1, [delete("web"), delete("db")])], ["web", "db"]) == {1}
    assert refused_groups([(1, [delete("web", True), delete("db")])], ["web", "db"]) == {1}
    assert refused_groups([(1, [delete("web", True)])], ["web"]) == set()
    assert refused_groups([(1, [delete("web")])], ["web", "db"]) == set()  # db stays
    assert refused_groups([(1, [delete("web"), put("new")])], ["web"]) == set()
    assert refused_groups([(1, [delete("web")])], []) == set()  # nothing ran
    # One delta at a time: the second empties what the first left; a refused one's
    # deletions do not happen, so the next is judged against what still runs.
    groups = [(1, [delete("web")]), (2, [delete("db")]), (3, [delete("db")])]
    assert refused_groups(groups, ["web", "db"]) == {2, 3}
    assert refused_groups([(1, [{"op": "app.delete", "name": "web", "confirmed": True}])],
                          ["web"]) == {1}  # fmt: skip


# -- a real hub ------------------------------------------------------------------------


async def fleet_of(admin: Operator, count: int, old: int) -> None:
    """``count`` sites, the first ``old`` labelled tier=old, the rest tier=new."""

    def site(i: int) -> dict[str, Any]:
        return {"id": f"shop-{i:03d}", "labels": {"tier": "old" if i < old else "new"}}

    for start in range(0, count, 20):
        batch = range(start, min(count, start + 20))
        await asyncio.gather(*(admin.ok("POST", "/v1/sites", site(i), 201) for i in batch))


EVERYWHERE = {"max_parallel": 1000}  # one wave: every site gets the app at once


async def admin_cli(hub: Hub, *args: str) -> tuple[int, str, str]:
    return await cli(*args, env=hub_env(hub))


async def test_a_label_change_removing_an_app_from_60_of_100_sites_needs_confirm_60(
    hub: Hub, admin: Operator, tmp_path: Path
) -> None:
    await fleet_of(admin, 100, old=60)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": EVERYWHERE}, 202)
    head = hub.head.version
    narrower = {"spec": spec_text(version="2.0"),
                "placement": {"match": {"tier": "new"}, **EVERYWHERE}}  # fmt: skip
    status, answer = await admin.call("POST", "/v1/apps", narrower)
    assert status == 409, answer
    error = answer["error"]
    assert error["code"] == "confirmation_required" and "confirm=60" in error["message"]
    details = error["details"]
    assert details["sites"] == 60 and details["truncated"] is False
    [removal] = details["removals"]
    assert removal["app"] == "web" and (removal["stops_at"], removal["of"]) == (60, 100)
    assert removal["sites"] == [f"shop-{i:03d}" for i in range(60)]
    assert details["emptied"] == removal["sites"]  # web is all they run
    assert hub.head.version == head  # refused before anything was written
    app = await admin.ok("GET", "/v1/apps/web")
    assert app["version"] == "1.0" and len(app["sites"]) == 100

    status, answer = await admin.call("POST", "/v1/apps?confirm=59", narrower)
    assert status == 409 and answer["error"]["code"] == "confirmation_mismatch"
    assert hub.head.version == head

    # The operator's way: the CLI shows the list, then takes --confirm 60.
    deploy_file = tmp_path / "web-2.yaml"
    deploy_file.write_text(
        spec_text(version="2.0") + "placement:\n  match: {tier: new}\n  max_parallel: 1000\n"
    )
    code, _, err = await admin_cli(hub, "deploy", "-f", str(deploy_file))
    assert code != 0 and "web: stops at 60 of 100 site(s): shop-000, shop-001" in err, err
    assert "and 40 more" in err and "repeat with --confirm 60" in err
    assert hub.head.version == head
    code, out, err = await admin_cli(hub, "deploy", "-f", str(deploy_file), "--confirm", "60")
    assert code == 0 and "deployment" in out, err
    accepted = (await admin.ok("GET", "/v1/apps/web"))["deployment"]
    deltas = (await admin.ok("GET", f"/v1/deltas?after={head}"))["deltas"]
    deleted = [d for d in deltas if d["ops"][0]["op"] == "app.delete"]
    assert [d["ops"] for d in deleted] == [[{"op": "app.delete", "name": "web", "confirmed": 60}]]
    assert deleted[0]["target"]["sites"] == [f"shop-{i:03d}" for i in range(60)]
    assert accepted["version"] == "2.0"
    audit = (await admin.ok("GET", "/v1/audit?limit=500"))["entries"]
    assert any("confirmed: stops at 60 site(s)" in str(e) for e in audit), audit[-3:]


async def test_delete_and_decommission_go_through_the_interlock(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    await fleet_of(admin, 20, old=0)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": EVERYWHERE}, 202)
    other = {"spec": spec_text(name="db"), "placement": {"sites": ["shop-000"]}}
    await admin.ok("POST", "/v1/apps", other, 202)
    head = hub.head.version
    status, answer = await admin.call("DELETE", "/v1/apps/web")
    assert status == 409 and answer["error"]["details"]["sites"] == 20
    assert len(answer["error"]["details"]["emptied"]) == 19  # shop-000 still runs db
    assert hub.head.version == head
    # One site of 20 is 5%: a decommission needs no confirmation (emptying is its purpose).
    await admin.ok("POST", "/v1/sites/shop-019/decommission", {})
    # db runs at one site only: stopping it there is all of db.
    status, answer = await admin.call("POST", "/v1/sites/shop-000/decommission", {})
    assert status == 409 and answer["error"]["code"] == "confirmation_required"
    assert answer["error"]["details"]["removals"][0]["app"] == "db"
    decommission = await admin.ok("POST", "/v1/sites/shop-000/decommission?confirm=1", {})
    stamped = (await admin.ok("GET", f"/v1/deltas?after={decommission['delta'] - 1}"))["deltas"]
    assert stamped[0]["ops"] == [{"op": "site.decommission", "confirmed": 1}]
    deleted = await admin.ok("DELETE", "/v1/apps/web?confirm=20")
    assert len(deleted["sites"]) == 20


async def test_strangers_are_refused_before_the_interlock_looks(hub: Hub, admin: Operator) -> None:
    await fleet_of(admin, 3, old=0)
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "red"}, 201)
    body = {"spec": spec_text(), "tenant": "blue", "placement": EVERYWHERE}
    await admin.ok("POST", "/v1/apps", body, 202)
    red = (await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "red"}, 201))["token"]
    viewer = (await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201))["token"]
    head = hub.head.version
    async with admin.session.delete(f"{hub.url}/v1/apps/web?confirm=3") as anonymous:
        assert anonymous.status == 401  # no credential at all
    for token, status in (("mht_0_bad", 401), (red, 404), (viewer, 403)):
        got, answer = await admin.call("DELETE", "/v1/apps/web?confirm=3", token=token)
        assert got == status, answer
        assert "details" not in answer["error"]  # nothing of the fleet's layout leaks
    # A decommission is a fleet admin's: a tenant's admin and a viewer get no list either.
    for token in (red, viewer):
        path = "/v1/sites/shop-000/decommission"
        got, answer = await admin.call("POST", path, {}, token=token)
        assert got == 403 and "details" not in answer["error"], answer
    assert hub.head.version == head
    status, answer = await admin.call("DELETE", "/v1/apps/web?confirm=0")
    assert status == 400 and answer["error"]["code"] == "bad_confirm"
    # A tenant's admin is asked about its own applications only.
    blue = (await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201))["token"]
    status, answer = await admin.call("DELETE", "/v1/apps/web", token=blue)
    assert status == 409
    assert "of tenant blue" in answer["error"]["message"]
    await admin.ok("GET", "/v1/apps/web")


async def test_the_cli_deletes_an_app_with_confirm(hub: Hub, admin: Operator) -> None:
    await fleet_of(admin, 4, old=0)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": EVERYWHERE}, 202)
    code, out, err = await admin_cli(hub, "apps", "web", "--delete")
    assert code != 0 and "confirmation_required" in err, (out, err)
    assert "web: stops at 4 of 4 site(s): shop-000, shop-001, shop-002, shop-003" in err
    assert "repeat with --confirm 4" in err
    code, out, err = await admin_cli(hub, "apps", "web", "--delete", "--confirm", "4")
    assert code == 0 and "web deleted" in out, err
    assert (await admin.call("GET", "/v1/apps/web"))[0] == 404
