"""The hub's side of gossip: the summary format, the fleet view merging reports and gossip
summaries, ``GET /v1/link/gossip``, the ``--gossip`` flags and certificate renewal."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from central_hub import Hub, HubConfig, HubConfigError
from central_hub.cli import build_parser, config_from_args
from central_hub.fleetview import site_detail, site_summary
from gossip import parse_cert, verify_cert
from meshorch.fleet.client import BadHubAnswer, parse_gossip_info
from meshorch.fleet.gossip import (
    MAX_SUMMARY_BYTES,
    BadSummary,
    announced_version,
    delta_messages,
    open_summary,
    parse_site_summary,
    seal_summary,
)
from meshorch.fleet.gossip import (
    site_summary as compact_summary,
)
from tests.hub.conftest import MakeSite, hub_config
from tests.hub.helpers import Operator, Site

KEY = SigningKey(b"k" * 32)
SITE = {"id": "s1", "labels": {}, "public_key": bytes(KEY.verify_key).hex()}


def report(apps: dict[str, Any] | None = None, version: int = 3) -> dict[str, Any]:
    return {
        "v": 1,
        "site": "s1",
        "time": 100.0,
        "applied_version": version,
        "applied_head": "ab" * 32,
        "rejections": [],
        "hosts": [{"host_id": "h1", "alive": True, "instances": []}],
        "apps": apps or {},
    }


def app(state: str) -> dict[str, Any]:
    return {"version": "1", "desired": 1, "ready": 1, "state": state, "message": ""}


# -- the summary --------------------------------------------------------------------------


def test_the_compact_summary_stays_small_whatever_the_report() -> None:
    apps = {f"app-{i:03d}-{'x' * 50}": app("failed") for i in range(300)}
    summary = compact_summary(report(apps), 1790000000.123)
    value = seal_summary(KEY, "s1", summary, 7)
    assert len(value) <= MAX_SUMMARY_BYTES
    assert summary["na"] == 300 and summary["more_alerts"] == 300 - len(summary["alerts"])
    assert parse_site_summary(open_summary(value, "s1", bytes(KEY.verify_key), 7)) == summary
    assert announced_version("s1", value) == 3


def test_app_changes_change_the_digest() -> None:
    a = compact_summary(report({"web": app("healthy")}), 1.0)
    b = compact_summary(report({"web": app("progressing")}), 1.0)
    assert a["apps"] != b["apps"] and a["alerts"] == b["alerts"] == []
    assert compact_summary(report({"web": app("failed")}), 1.0)["alerts"] == ["web"]


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"x" * 64,
        b"[1, 2]" + b"s" * 64,
        orjson.dumps({"v": 2, "av": 1}) + b"s" * 64,
        b"\xff" * 200,
    ],
)
def test_values_that_are_not_summaries_are_refused(value: bytes) -> None:
    with pytest.raises(BadSummary):
        open_summary(value, "s1", bytes(KEY.verify_key), 1)
    with pytest.raises(BadSummary):
        announced_version("s1", value)


def test_a_summary_only_opens_for_its_member_and_key() -> None:
    value = seal_summary(KEY, "s1", compact_summary(report(), 1.0), 4)
    assert open_summary(value, "s1", bytes(KEY.verify_key), 4)
    with pytest.raises(BadSummary):
        open_summary(value, "s2", bytes(KEY.verify_key), 4)  # moved to another member
    with pytest.raises(BadSummary):
        open_summary(value, "s1", bytes(KEY.verify_key), 5)  # to another version
    with pytest.raises(BadSummary):
        open_summary(value, "s1", bytes(SigningKey(b"o" * 32).verify_key), 4)
    tampered = value.replace(b'"av":3', b'"av":9')
    with pytest.raises(BadSummary):
        open_summary(tampered, "s1", bytes(KEY.verify_key), 4)


@pytest.mark.parametrize(
    "change",
    [
        {"av": -1},
        {"av": True},
        {"t": "now"},
        {"t": float("inf")},
        {"alerts": "web"},
        {"alerts": [1]},
        {"apps": "x" * 65},
        {"n": None},
    ],
)
def test_summaries_with_bad_fields_are_refused(change: dict[str, Any]) -> None:
    good = compact_summary(report(), 1.0)
    with pytest.raises(BadSummary):
        parse_site_summary({**good, **change})


def test_only_envelopes_that_fit_are_sent_and_in_order() -> None:
    small, big = b"e" * 100, b"b" * 10_000
    assert delta_messages([small, small]) == [b"D" + small] * 2
    assert delta_messages([small, big, small]) == [b"D" + small]  # consecutive only


# -- the fleet view ------------------------------------------------------------------------


def test_a_fresh_gossip_summary_keeps_a_site_with_a_stale_report_reachable() -> None:
    summary = parse_site_summary(compact_summary(report({"web": app("healthy")}, 7), 150.0))
    gossip = (summary, 150.0)
    now = 160.0
    # The report came at 100: 60 s old, stale at 30 s.
    view = site_summary(SITE, report(version=3), 100.0, now, 30.0, 600.0, gossip=gossip)
    assert view["health"] == "healthy" and view["seen_via"] == "gossip"
    assert view["last_seen"] == 150.0 and view["applied_version"] == 7
    without = site_summary(SITE, report(version=3), 100.0, now, 30.0, 600.0)
    assert without["health"] == "unreachable" and without["seen_via"] is None
    # Both stale: unreachable.
    late = site_summary(SITE, report(), 100.0, 200.0, 30.0, 600.0, gossip=gossip)
    assert late["health"] == "unreachable" and late["seen_via"] is None
    # A fresh report wins; the summary is shown too.
    detail = site_detail(SITE, report(version=3), 155.0, now, 30.0, 600.0, gossip=gossip)
    assert detail["seen_via"] == "link" and detail["applied_version"] == 7
    assert detail["gossip"] == {**summary, "received_at": 150.0}
    assert detail["report_received_at"] == 155.0


def test_gossip_alerts_and_hosts_down_make_a_site_degraded() -> None:
    failed = parse_site_summary(compact_summary(report({"web": app("failed")}), 150.0))
    view = site_summary(SITE, None, None, 155.0, 30.0, 600.0, gossip=(failed, 150.0))
    assert view["health"] == "degraded" and view["applied_version"] == 3
    down = parse_site_summary(
        {**compact_summary(report(), 150.0), "n": 3, "up": 2}  # one host of three down
    )
    view = site_summary(SITE, None, None, 155.0, 30.0, 600.0, gossip=(down, 150.0))
    assert view["health"] == "degraded"
    assert site_summary(SITE, None, None, 155.0, 30.0, 600.0)["health"] == "unknown"


def test_counts_come_from_the_summary_when_only_it_is_fresh() -> None:
    failed = parse_site_summary(
        {**compact_summary(report({"web": app("failed"), "db": app("healthy")}), 150.0),
         "n": 3, "up": 2}
    )  # fmt: skip
    view = site_summary(SITE, report(), 100.0, 160.0, 30.0, 600.0, gossip=(failed, 150.0))
    assert view["counts"] == {
        "source": "gossip",
        "hosts": {"total": 3, "up": 2},
        "apps": {"total": 2, "healthy": 1},
        "instances": None,  # a summary has none
    }
    # A summary cannot be split by tenant: a tenant's view has no app count from it.
    mine = site_summary(
        SITE, None, None, 155.0, 30.0, 600.0, gossip=(failed, 150.0), visible_apps={"db"}
    )
    assert mine["counts"]["apps"] is None and mine["counts"]["hosts"]["total"] == 3
    # A fresh report wins (it has instances).
    fresh = site_summary(SITE, report(), 155.0, 160.0, 30.0, 600.0, gossip=(failed, 150.0))
    assert fresh["counts"]["source"] == "report"
    assert fresh["counts"]["instances"] == {"total": 0, "ready": 0}


# -- GET /v1/link/gossip ---------------------------------------------------------------------


async def test_a_site_gets_a_certificate_for_its_own_key(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    site = await make_site("shop-1")
    status, answer = await site.request("GET", "/v1/link/gossip")
    assert status == 200, answer
    info = parse_gossip_info(answer)
    cert = verify_cert(info.cert, [hub.root_key], time.time())
    assert cert.member_id == "shop-1" and cert.public_key.hex() == site.public_key
    assert 6 * 86400 < cert.expires_at - time.time() <= 7 * 86400
    assert info.hub_id == "hub" and info.preset == "wan"
    assert hub.gossip is not None and answer["hub"]["addr"] == hub.gossip.address
    assert info.peers == {}  # nobody gossiped yet
    # Unsigned: refused like every link route.
    async with site.session.get(hub.url + "/v1/link/gossip") as response:
        assert response.status == 401


async def test_the_hub_id_is_reserved(admin: Operator, make_site: MakeSite) -> None:
    site = await make_site("hub")
    status, answer = await site.request("GET", "/v1/link/gossip")
    assert status == 409 and answer["error"]["code"] == "reserved_id"


async def test_without_gossip_the_route_says_so(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with Hub(hub_config(tmp_path / "hub", gossip=False)) as hub:
        assert hub.gossip is None
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        site = Site(session, hub.url, "s1", hub.fleet, hub.root_key)
        await admin.ok("POST", "/v1/sites", {"id": "s1", "public_key": site.public_key}, 201)
        status, answer = await site.request("GET", "/v1/link/gossip")
        assert status == 404 and answer["error"]["code"] == "gossip_disabled"
        detail = await admin.ok("GET", "/v1/sites/s1")
        assert detail["gossip"] is None and detail["health"] == "unknown"


async def test_the_route_is_in_the_openapi_document(
    hub: Hub, session: aiohttp.ClientSession
) -> None:
    async with session.get(hub.url + "/v1/openapi.json") as response:
        doc = await response.json()
    route = doc["paths"]["/v1/link/gossip"]["get"]
    assert "GossipInfo" in orjson.dumps(route).decode()
    assert "GossipInfo" in doc["components"]["schemas"]


async def test_the_hub_certificate_follows_a_root_rotation(hub: Hub, admin: Operator) -> None:
    assert hub.gossip is not None and hub.gossip._sealer is not None
    before = hub.gossip._sealer.cert
    assert before.anchor_key.hex() == hub.root_key
    await admin.ok("POST", "/v1/fleet/rotate")
    hub.gossip.maintain()
    after = hub.gossip._sealer.cert
    assert after.anchor_key.hex() == hub.root_key != before.anchor_key.hex()
    assert parse_cert(after.raw).member_id == "hub"


# -- flags ---------------------------------------------------------------------------------


def parse(*argv: str) -> HubConfig:
    return config_from_args(build_parser().parse_args(["--data-dir", "/tmp/x", *argv]))


def test_gossip_flags() -> None:
    config = parse("--listen", "10.0.0.1:7900")
    assert config.gossip and config.gossip_address == ("10.0.0.1", 7900)
    config = parse("--gossip", "0.0.0.0:7946", "--gossip-advertise", "203.0.113.7:7946")
    assert config.gossip_address == ("0.0.0.0", 7946)
    assert config.gossip_advertise == ("203.0.113.7", 7946)
    assert not parse("--listen", "localhost:7900", "--no-gossip").gossip
    assert parse("--gossip-preset", "lan").gossip_preset == "lan"
    with pytest.raises(HubConfigError, match="gossip"):
        parse("--listen", "localhost:7900")  # gossip needs an IP address
    with pytest.raises(HubConfigError, match="gossip_advertise"):
        parse("--gossip-advertise", "hub.example:7946")
    with pytest.raises(HubConfigError, match="--gossip"):
        parse("--gossip", "nowhere")


def test_a_certificate_answer_that_is_not_one_is_refused() -> None:
    good = {
        "cert": base64.b64encode(b"c" * 140).decode(),
        "hub": {"id": "hub", "addr": "10.0.0.1:7900"},
        "preset": "wan",
        "peers": [{"id": "s2", "addr": "198.51.100.2:7700"}, {"id": "s3", "addr": "bad"}],
    }
    info = parse_gossip_info(good)
    assert info.peers == {"s2": ("198.51.100.2", 7700)}  # the bad entry is skipped
    for bad in ({**good, "cert": "%%"}, {**good, "hub": {"id": "hub"}}, {**good, "preset": "x"}):
        with pytest.raises(BadHubAnswer):
            parse_gossip_info(bad)
