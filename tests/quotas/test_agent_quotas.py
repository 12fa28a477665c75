"""Tenant quotas at a real agent (process runtime; one in the test's event loop), with
deltas signed here and relayed to its API as a hub's would be.

- a deployment over its tenant's quota is refused with the reason, in GET /v1/apps/{name}
  and in the site report; raising the quota lets it be placed;
- an upgrade that would go over the quota rolls back at once with the reason;
- the app name is one tenant's (another tenant's app answers as an absent one); the
  local API (PUT/GET /v1/quotas) validates like the op.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.apps.settings import WorkloadSettings
from meshorch.fleet.delta import Target
from meshorch.site.agent import Agent
from meshorch.site.config import AgentConfig
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.fleet.hubstub import StubHub
from tests.waiting import until

ROOT = SigningKey(b"q" * 32)
SITE = "quota-site"
MI = 2**20


def spec(name: str, version: str = "1", replicas: int = 2, memory: str = "48Mi",
         command: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "api_version": "meshorch/v1",
        "name": name,
        "version": version,
        "services": [
            {
                "name": "main",
                "replicas": replicas,
                "containers": [
                    {
                        "name": "main",
                        "image": "process",
                        "command": command or ["sleep", "1000"],
                        "resources": {"memory_limit": memory, "cpu_request": "10m"},
                    }
                ],
                "restart": {"policy": "always", "backoff_initial_s": 0.5, "backoff_max_s": 2},
            }
        ],
    }


def agent_config(tmp_path: Path) -> AgentConfig:
    return lone_agent_config(tmp_path, SITE, "acme-fleet", ROOT)


class Site:
    def __init__(self, agent: Agent, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.session = session
        self.base = f"http://{agent.config.api_address}"
        self.signer = StubHub("acme-fleet", ROOT)  # never served: it only signs

    async def call(
        self, method: str, path: str, body: object = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else None if body is None else orjson.dumps(body)
        async with self.session.request(
            method, self.base + path, data=data, headers=HEADERS
        ) as response:
            return response.status, dict(await response.json(content_type=None))

    async def deliver(self, *ops: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Sign one delta for this site, relay it; the op errors."""
        self.signer.publish(ops, target=Target(sites=frozenset({SITE})))
        status, answer = await self.call("POST", "/v1/fleet/deltas", raw=self.signer.envelopes[-1])
        assert status == 200, answer
        return list(answer["op_errors"])

    async def app(self, name: str) -> dict[str, Any]:
        status, view = await self.call("GET", f"/v1/apps/{name}?consistency=local")
        assert status == 200, view
        return view

    def report_app(self, name: str) -> dict[str, Any]:
        report = self.agent.site_link.report()
        assert report is not None
        return dict(report["apps"][name])


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = agent_config(tmp_path)
    settings = WorkloadSettings(runtime="process", cpu_millis=4000, memory_bytes=4096 * MI)
    async with (
        Agent(config, None, settings) as agent,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20), headers=HEADERS) as session,
    ):
        site = Site(agent, session)

        async def linked() -> bool:
            status, fleet = await site.call("GET", "/v1/fleet")
            return status == 200 and fleet["trust"] is not None

        await until("the fleet link is configured", linked, 30)
        yield site


def quota_op(tenant: str, **fields: int | None) -> dict[str, Any]:
    return {"op": "tenant.quota", "tenant": tenant, "cpu_millis": None, "memory_bytes": None,
            "instances": None, **fields}  # fmt: skip


async def test_over_quota_refused_with_reason_then_placed_when_raised(site: Site) -> None:
    started = time.monotonic()
    assert await site.deliver(quota_op("acme", memory_bytes=64 * MI)) == []
    assert await site.deliver({"op": "app.put", "tenant": "acme", "spec": spec("web")}) == []
    reason = "tenant acme over its quota: memory 96Mi of 64Mi"

    async def refused() -> dict[str, Any] | None:
        view = await site.app("web")
        return view if view["unplaced"] and view["ready"] == 1 else None

    view = await until("one instance placed, one refused", refused)
    assert view["tenant"] == "acme"
    assert view["unplaced"] == [
        {"instance_id": "web.main.1", "version": "1", "state": "over_quota", "reason": reason}
    ]
    assert [i["instance_id"] for i in view["instances"]] == ["web.main.0"]
    assert {"kind": "instance_over_quota", "detail": f"web.main.1: {reason}"} in [
        {"kind": e["kind"], "detail": e["detail"]} for e in view["events"]
    ]
    health = site.report_app("web")
    assert health["state"] == "failed" and health["message"] == f"web.main.1 not placed: {reason}"
    status, listed = await site.call("GET", "/v1/quotas")
    quota = {"cpu_millis": None, "memory_bytes": 64 * MI, "instances": None}
    used = {"cpu_millis": 10, "memory_bytes": 48 * MI, "instances": 1}
    assert listed["quotas"] == [{"tenant": "acme", "quota": quota, "used": used}]

    # Another tenant cannot take the name, by delta or by the local API.
    clash = await site.deliver({"op": "app.put", "tenant": "globex", "spec": spec("web", "9")})
    assert [e["message"] for e in clash] == [
        "op 0 (app.put): application web belongs to another tenant"
    ]
    assert clash[0]["reason"] == "bad_op"
    status, body = await site.call("POST", "/v1/apps?tenant=globex", spec("web", "9"))
    assert (status, body["error"]["code"]) == (409, "name_taken")
    assert "acme" not in body["error"]["message"] and "tenant" not in body["error"]["message"]

    # Raising the quota lets it be placed; the refusal goes away.
    assert await site.deliver(quota_op("acme", memory_bytes=128 * MI)) == []

    async def healthy() -> bool:
        return site.report_app("web")["state"] == "healthy"

    await until("both instances placed and ready", healthy)
    assert (await site.app("web"))["unplaced"] == []

    # Version 2 needs 2 x 96Mi: over the quota, it rolls back at once, with the reason.
    assert (
        await site.deliver(
            {"op": "app.put", "tenant": "acme", "spec": spec("web", "2", memory="96Mi")}
        )
        == []
    )
    blocked = "version 2: tenant acme over its quota: memory 192Mi of 128Mi"

    async def rolled_back() -> dict[str, Any] | None:
        view = await site.app("web")
        return view if (view["rollout"] or {}).get("phase") == "rolled_back" else None

    view = await until("the rollout rolled back", rolled_back)
    assert view["rollout"] == {"phase": "rolled_back", "from": "1", "to": "2", "reason": blocked}
    assert {i["version"] for i in view["instances"]} == {"1"} and view["unplaced"] == []
    kinds = [e["kind"] for e in view["events"]]
    assert kinds[-3:] == ["rollout_started", "rollback_started", "rollback_done"]
    health = site.report_app("web")
    assert health == {"version": "2", "desired": 2, "ready": 0, "state": "failed",
                      "message": f"rolled back to 1: {blocked}"}  # fmt: skip
    assert time.monotonic() - started < 60


async def test_local_quota_and_tenant_routes(site: Site) -> None:
    status, body = await site.call("PUT", "/v1/quotas/globex", {"instances": 1})
    assert status == 200 and body == {
        "tenant": "globex", "quota": {"cpu_millis": None, "memory_bytes": None, "instances": 1}
    }  # fmt: skip
    for path, payload, code in [
        ("/v1/quotas/Globex", {"instances": 1}, "bad_tenant"),
        ("/v1/quotas/globex", {"instances": -1}, "bad_quota"),
        ("/v1/quotas/globex", {"instances": "1"}, "bad_quota"),
        ("/v1/quotas/globex", {"cpu": 1}, "bad_quota"),
        ("/v1/quotas/globex", [1], "bad_request"),
    ]:
        status, body = await site.call("PUT", path, payload)
        assert (status, body["error"]["code"]) == (400, code), (path, payload, body)
    status, body = await site.call("POST", "/v1/apps?tenant=Nope", spec("a"))
    assert (status, body["error"]["code"]) == (400, "bad_tenant")

    status, body = await site.call("POST", "/v1/apps?tenant=globex", spec("small", replicas=2))
    assert status == 200 and body["tenant"] == "globex"
    status, body = await site.call("POST", "/v1/apps", spec("plain", replicas=1))
    assert status == 200 and body["tenant"] == "default"

    async def refused() -> dict[str, Any] | None:
        view = await site.app("small")
        return view if view["unplaced"] and len(view["instances"]) == 1 else None

    view = await until("globex's second instance refused", refused)
    assert view["unplaced"][0]["reason"] == "tenant globex over its quota: instances 2 of 1"
    status, listed = await site.call("GET", "/v1/apps?tenant=globex")
    assert [a["name"] for a in listed["apps"]] == ["small"]
    status, listed = await site.call("GET", "/v1/apps")
    assert {a["name"]: a["tenant"] for a in listed["apps"]} == {
        "plain": "default", "small": "globex"
    }  # fmt: skip

    # All null removes the quota: the second instance is placed.
    status, body = await site.call("PUT", "/v1/quotas/globex", {})
    assert status == 200 and body["quota"] is None

    async def placed() -> bool:
        view = await site.app("small")
        return len(view["instances"]) == 2 and not view["unplaced"]

    await until("both placed once the quota is gone", placed)
    status, listed = await site.call("GET", "/v1/quotas")
    assert [(q["tenant"], q["quota"], q["used"]["instances"]) for q in listed["quotas"]] == [
        ("default", None, 1), ("globex", None, 2)
    ]  # fmt: skip
    # Another tenant's app answers as an absent one.
    status, body = await site.call("DELETE", "/v1/apps/small?tenant=acme")
    absent = await site.call("DELETE", "/v1/apps/nothing?tenant=acme")
    assert (status, body) == (404, {"error": {"code": "not_found",
                                              "message": "no application 'small'"}})  # fmt: skip
    assert absent == (404, {"error": {"code": "not_found", "message": "no application 'nothing'"}})
    status, body = await site.call("GET", "/v1/apps/small?tenant=acme")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await site.call("DELETE", "/v1/apps/small?tenant=globex")
    assert status == 200
