"""Tenants at every boundary, attacked by tenant ``evil`` against tenant ``acme``.

- An app may reference only its own tenant's secrets: a real hub refuses it (400
  ``foreign_secret`` naming the field) for a tenant token and a fleet-wide one, on create
  and on update; a real agent refuses it on its API and in a delta; and delivery refuses an
  app record that names another tenant's secret (one stored before the site refused them).
  A reference without a tenant means the app's own tenant, and gets its own value.
- No answer tells evil that an object of acme exists: reads and deletes of acme's apps,
  deployments and secrets answer exactly as absent ones, and a name clash says nothing of
  the owner.

Each refusal is paired with the same call by the right tenant going through.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from central_hub import Hub
from meshorch.apps.records import app_key, appver_key, encode_spec
from meshorch.apps.settings import WorkloadSettings
from meshorch.apps.spec import ForeignSecret, from_json
from meshorch.fleet.apply import app_put_ops, plan_apply
from meshorch.fleet.delta import Target, TrustState, key_id
from meshorch.secrets.keyring import seal
from meshorch.secrets.service import delivery_root
from meshorch.site.agent import Agent
from meshorch.state.tables import APPS_TABLE
from raft import Put
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.fleet.hubstub import StubHub
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator
from tests.hub.test_tenant_matrix import snapshot
from tests.waiting import until

ROOT = SigningKey(b"t" * 32)
SITE = "tenant-site"
FLEET = "tenant-fleet"
FOREIGN = "services[0].containers[0].secrets[1].tenant: "


def app(name: str, secrets: list[dict[str, str]], version: str = "1") -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "process",
        "command": ["sleep", "1000"],
        "resources": {"memory_limit": "16Mi", "cpu_request": "10m"},
        "secrets": secrets,
    }
    return {"api_version": "meshorch/v1", "name": name, "version": version,
            "services": [{"name": "web", "replicas": 1, "containers": [container]}]}  # fmt: skip


# An app of evil naming acme's secret (second reference), and the same with its own.
STEAL = [{"name": "api-key"}, {"tenant": "acme", "name": "db-password", "env": "DB"}]
OWN = [{"name": "api-key"}, {"name": "db-password", "env": "DB"}]


# -- the pure applier ----------------------------------------------------------------------


def test_a_delta_op_naming_another_tenants_secret_writes_nothing() -> None:
    stub = StubHub(FLEET, ROOT)
    deltas = [
        stub.publish([{"op": "app.put", "tenant": "evil", "spec": app("grab", STEAL)}]),
        stub.publish([{"op": "app.put", "tenant": "evil", "spec": app("grab", OWN)}]),
    ]
    state = TrustState(fleet=FLEET, trusted_keys=frozenset({key_id(ROOT)}))
    plan = plan_apply(deltas, state, 1, SITE, lambda _table, _key: None)
    assert [(e.version, e.op) for e in plan.op_errors] == [(1, "app.put")]
    assert plan.op_errors[0].message.startswith(FOREIGN + "'acme' is not the app's tenant")
    writes = [op for op in plan.ops if isinstance(op, Put) and op.table == APPS_TABLE]
    assert len(writes) == 2  # delta 2 only: its app record and version
    spec = orjson.loads(writes[0].value)["spec"]
    assert [r["tenant"] for r in spec["services"][0]["containers"][0]["secrets"]] == ["evil"] * 2


def test_app_put_ops_refuse_another_tenants_secret_before_reading() -> None:
    spec = from_json(app("grab", STEAL))  # parsed elsewhere, with acme's secret named
    with pytest.raises(ForeignSecret):
        app_put_ops(spec, b"not read", "evil", b"not read")
    assert len(app_put_ops(from_json(app("grab", STEAL), tenant="acme"), None, "acme", None)) == 2


# -- the hub -------------------------------------------------------------------------------


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with Hub(hub_config(tmp_path / "hub")) as running:
        yield running


@pytest.fixture
async def admin(hub: Hub) -> AsyncIterator[Operator]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield Operator(session, hub.url, admin_token(hub))


async def operators(admin: Operator, *tenants: str) -> dict[str, Operator]:
    found = {}
    for tenant in tenants:
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
        made = await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": tenant}, 201)
        found[tenant] = Operator(admin.session, admin.url, str(made["token"]))
    return found


async def test_hub_refuses_an_app_using_another_tenants_secret(hub: Hub, admin: Operator) -> None:
    key = bytes(SigningKey.generate().verify_key).hex()
    await admin.ok("POST", "/v1/sites", {"id": "s1", "labels": {}, "public_key": key}, 201)
    ops = await operators(admin, "acme", "evil")
    acme, evil = ops["acme"], ops["evil"]
    await acme.ok("POST", "/v1/secrets", {"name": "db-password", "value": "acme-pw"}, 201)
    await evil.ok("POST", "/v1/secrets", {"name": "db-password", "value": "evil-pw"}, 201)
    before = snapshot(hub)
    for caller, body in [
        (evil, {"spec": app("grab", STEAL)}),
        (admin, {"spec": app("grab", STEAL), "tenant": "evil"}),  # a fleet-wide token too
        (evil, {"spec": orjson.dumps(app("grab", STEAL)).decode()}),  # as text
    ]:
        status, answer = await caller.call("POST", "/v1/apps", body)
        assert (status, answer["error"]["code"]) == (400, "foreign_secret"), answer
        assert [p[: len(FOREIGN)] for p in answer["error"]["problems"]] == [FOREIGN]
    assert snapshot(hub) == before  # no app, no deployment, no delta

    # The same app with references without a tenant: evil's own secrets.
    await evil.ok("POST", "/v1/apps", {"spec": app("grab", OWN)}, 202)
    (delta,) = [d for d in (await admin.ok("GET", "/v1/deltas"))["deltas"]
                if d["ops"][0]["op"] == "app.put"]  # fmt: skip
    refs = delta["ops"][0]["spec"]["services"][0]["containers"][0]["secrets"]
    assert [(r["tenant"], r["name"]) for r in refs] == [
        ("evil", "api-key"),
        ("evil", "db-password"),
    ]
    # acme naming its own secret goes through.
    await acme.ok(
        "POST", "/v1/apps", {"spec": app("shop", [{"tenant": "acme", "name": "db-password"}])}, 202
    )

    # An update of evil's app to take acme's secret: refused, the app stays as it was.
    status, answer = await evil.call("POST", "/v1/apps", {"spec": app("grab", STEAL, "2")})
    assert (status, answer["error"]["code"]) == (400, "foreign_secret")
    assert (await evil.ok("GET", "/v1/apps/grab"))["version"] == "1"


async def test_hub_answers_another_tenants_objects_as_absent(hub: Hub, admin: Operator) -> None:
    ops = await operators(admin, "acme", "evil", "globex")
    acme, evil, globex = ops["acme"], ops["evil"], ops["globex"]
    probes = [
        ("GET", "/v1/apps/web"),
        ("DELETE", "/v1/apps/web"),
        ("GET", "/v1/deployments/dep-1"),
        ("GET", "/v1/secrets/db-password?tenant=acme"),
        ("DELETE", "/v1/secrets/db-password?tenant=acme"),
    ]
    absent = [await evil.call(method, path) for method, path in probes]
    assert {status for status, _ in absent} == {404}
    await acme.ok("POST", "/v1/apps", {"spec": app("web", [])}, 202)  # dep-1
    await acme.ok("POST", "/v1/secrets", {"name": "db-password", "value": "acme-pw"}, 201)
    before = snapshot(hub)
    assert [await evil.call(method, path) for method, path in probes] == absent
    assert (await evil.ok("GET", "/v1/apps"))["apps"] == []
    assert (await evil.ok("GET", "/v1/secrets"))["secrets"] == []

    # A name another tenant holds: the same answer whoever holds it, naming nobody.
    await globex.ok("POST", "/v1/apps", {"spec": app("shop", [])}, 202)
    before = snapshot(hub)
    held_by_acme = await evil.call("POST", "/v1/apps", {"spec": app("web", [])})
    held_by_globex = await evil.call("POST", "/v1/apps", {"spec": app("shop", [])})
    assert held_by_acme[0] == held_by_globex[0] == 409
    assert held_by_acme[1]["error"]["code"] == held_by_globex[1]["error"]["code"] == "app_exists"
    message = held_by_acme[1]["error"]["message"]
    assert message.replace("web", "X") == held_by_globex[1]["error"]["message"].replace("shop", "X")
    assert "acme" not in message and "tenant" not in message
    assert snapshot(hub) == before

    # The owner reads, updates and deletes its own.
    assert (await acme.ok("GET", "/v1/apps/web"))["tenant"] == "acme"
    await acme.ok("POST", "/v1/apps", {"spec": app("web", [], "2")}, 202)
    await acme.ok("GET", "/v1/secrets/db-password")
    await acme.ok("DELETE", "/v1/apps/web")


# -- a real agent --------------------------------------------------------------------------


class Site:
    """An agent in the test's loop: its API with the admin token or a tenant's token, and
    deltas signed here and relayed as a hub's would be."""

    def __init__(self, agent: Agent, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.session = session
        self.base = f"http://{agent.config.api_address}"
        self.signer = StubHub(FLEET, ROOT)  # never served: it only signs
        self.tokens: dict[str, str] = {}

    async def call(
        self, method: str, path: str, body: object = None, *, tenant: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:  # fmt: skip
        headers = HEADERS if tenant is None else {"Authorization": f"Bearer {self.tokens[tenant]}"}
        data = raw if raw is not None else None if body is None else orjson.dumps(body)
        async with self.session.request(
            method, self.base + path, data=data, headers=headers
        ) as response:
            return response.status, dict(await response.json(content_type=None))

    async def ok(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        status, answer = await self.call(method, path, body)
        assert status == 200, (path, answer)
        return answer

    async def token_for(self, tenant: str) -> None:
        body = {"role": "operator", "tenant": tenant}
        status, made = await self.call("POST", "/v1/access-tokens", body)
        assert status == 201, made
        self.tokens[tenant] = str(made["token"])

    async def deliver(self, *ops: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Sign one delta for this site, relay it; the op errors."""
        self.signer.publish(ops, target=Target(sites=frozenset({SITE})))
        status, answer = await self.call("POST", "/v1/fleet/deltas", raw=self.signer.envelopes[-1])
        assert status == 200, answer
        return list(answer["op_errors"])

    async def put_secret(self, tenant: str, name: str, value: bytes) -> None:
        status = await self.ok("GET", "/v1/secrets/status?consistency=local")
        blob = base64.b64encode(seal(bytes.fromhex(status["public_key"]), value)).decode()
        op = {"op": "secret.put", "tenant": tenant, "name": name, "version": 1,
              "sealed": {SITE: blob}}  # fmt: skip
        assert await self.deliver(op) == []

    async def instance(self, name: str) -> dict[str, Any]:
        view = await self.ok("GET", f"/v1/apps/{name}?consistency=local")
        (found,) = view["instances"]
        return dict(found)

    def secret_dir(self, instance: Mapping[str, Any]) -> Path:
        runtime_id = f"{instance['instance_id']}.main"
        return delivery_root(self.agent.config.data_dir) / runtime_id


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = lone_agent_config(tmp_path, SITE, FLEET, ROOT)
    settings = WorkloadSettings(runtime="process", cpu_millis=4000, memory_bytes=4096 * 2**20)
    async with (
        Agent(config, None, settings) as agent,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        site = Site(agent, session)

        async def ready() -> bool:
            status, fleet = await site.call("GET", "/v1/fleet")
            if status != 200 or fleet["trust"] is None:
                return False
            status, secrets = await site.call("GET", "/v1/secrets/status?consistency=local")
            return status == 200 and not secrets["sealed"]

        await until("the fleet link configured and the site unsealed", ready, 30)
        for tenant in ("acme", "evil"):
            await site.token_for(tenant)
        yield site


async def test_agent_refuses_an_app_using_another_tenants_secret(site: Site) -> None:
    for tenant in ("evil", None):  # evil's token, and the site's admin token
        status, answer = await site.call("POST", "/v1/apps?tenant=evil", app("grab", STEAL),
                                         tenant=tenant)  # fmt: skip
        assert (status, answer["error"]["code"]) == (400, "foreign_secret"), answer
        assert [p[: len(FOREIGN)] for p in answer["error"]["problems"]] == [FOREIGN]
    errors = await site.deliver({"op": "app.put", "tenant": "evil", "spec": app("grab", STEAL)})
    assert [(e["reason"], e["message"][: 20 + len(FOREIGN)]) for e in errors] == [
        ("bad_op", "op 0 (app.put): " + FOREIGN + "'acm")
    ]
    assert (await site.call("GET", "/v1/apps/grab"))[0] == 404  # nothing written

    # The same with references without a tenant: evil's own secrets.
    status, answer = await site.call("POST", "/v1/apps?tenant=evil", app("grab", OWN),
                                     tenant="evil")  # fmt: skip
    assert status == 200, answer
    status, view = await site.call("GET", "/v1/apps/grab?tenant=evil", tenant="evil")
    refs = view["spec"]["services"][0]["containers"][0]["secrets"]
    assert {r["tenant"] for r in refs} == {"evil"}
    # acme's app naming acme's secret goes through, by its token and by delta.
    status, answer = await site.call("POST", "/v1/apps?tenant=acme", app("shop", STEAL[1:]),
                                     tenant="acme")  # fmt: skip
    assert status == 200, answer
    assert await site.deliver({"op": "app.put", "tenant": "acme", "spec": app("mall", STEAL)}) == []


async def test_agent_answers_another_tenants_app_as_absent(site: Site) -> None:
    absent = [
        await site.call("GET", "/v1/apps/web?tenant=evil", tenant="evil"),
        await site.call("DELETE", "/v1/apps/web?tenant=evil", tenant="evil"),
    ]
    assert {status for status, _ in absent} == {404}
    status, _ = await site.call("POST", "/v1/apps?tenant=acme", app("web", []), tenant="acme")
    assert status == 200
    assert [
        await site.call("GET", "/v1/apps/web?tenant=evil", tenant="evil"),
        await site.call("DELETE", "/v1/apps/web?tenant=evil", tenant="evil"),
    ] == absent
    status, listed = await site.call("GET", "/v1/apps?tenant=evil", tenant="evil")
    assert listed["apps"] == []
    status, answer = await site.call("POST", "/v1/apps?tenant=evil", app("web", []),
                                     tenant="evil")  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "name_taken")
    assert "acme" not in answer["error"]["message"]
    assert "tenant" not in answer["error"]["message"]
    status, view = await site.call("GET", "/v1/apps/web?tenant=acme", tenant="acme")
    assert (status, view["tenant"], view["version"]) == (200, "acme", "1")  # untouched


async def test_delivery_gives_an_app_its_own_tenants_secret_only(site: Site) -> None:
    await site.put_secret("acme", "db-password", b"acme-value")
    await site.put_secret("evil", "db-password", b"evil-value")

    async def all_ready() -> bool:
        listed = (await site.ok("GET", "/v1/secrets?consistency=local"))["secrets"]
        return len(listed) == 2 and all(s["state"] == "ready" for s in listed)

    await until("both secrets decrypted", all_ready)

    # evil's app without a tenant in its reference gets evil's value.
    mine = app("mine", [{"name": "db-password"}])
    status, _ = await site.call("POST", "/v1/apps?tenant=evil", mine, tenant="evil")
    assert status == 200

    async def delivered(name: str, value: bytes) -> bool:
        instance = await site.instance(name)
        path = site.secret_dir(instance) / "db-password"
        return instance["state"] == "running" and path.exists() and path.read_bytes() == value

    await until("evil's app runs with evil's secret", lambda: delivered("mine", b"evil-value"))

    # A record of evil naming acme's secret, as a site stored it before it refused them:
    # the instance is not started and nothing is decrypted or written for it.
    legacy = from_json(app("grab", [{"tenant": "acme", "name": "db-password"}]))
    encoded = encode_spec(legacy, "evil")
    await site.agent.raft.propose(
        [
            Put(APPS_TABLE, appver_key("grab", "1"), encoded),
            Put(APPS_TABLE, app_key("grab"), encoded),
        ]
    )

    async def refused() -> dict[str, Any] | None:
        instance = await site.instance("grab")
        return instance if "refused" in instance["message"] else None

    instance = await until("evil's stolen reference refused", refused)
    assert instance["message"] == (
        "grab.web.0.main: secret acme/db-password refused: an app of tenant evil gets only "
        "its own tenant's secrets"
    )
    assert instance["state"] != "running" and not site.secret_dir(instance).exists()

    # The same record for acme: delivered.
    mall = encode_spec(from_json(app("mall", [{"tenant": "acme", "name": "db-password"}])), "acme")
    await site.agent.raft.propose(
        [Put(APPS_TABLE, appver_key("mall", "1"), mall), Put(APPS_TABLE, app_key("mall"), mall)]
    )
    await until("acme's app runs with acme's secret", lambda: delivered("mall", b"acme-value"))
    instance = await site.instance("grab")
    assert instance["state"] != "running" and not site.secret_dir(instance).exists()
