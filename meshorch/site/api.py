"""The agent's HTTP API (aiohttp, JSON by orjson).

Errors are JSON: ``{"error": {"code": "...", "message": "..."}}`` with a 4xx
for bad input (nothing changed) and 503/504 when a write could not be
committed. No write is answered 200 before it is committed and applied here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from meshorch import http_metrics
from meshorch.apps.quotas import (
    DEFAULT_TENANT,
    QUOTA_PREFIX,
    Usage,
    check_tenant,
    decode_quota,
    parse_quota,
    quota_writes,
)
from meshorch.apps.records import (
    APP_PREFIX,
    EVENT_PREFIX,
    INST_PREFIX,
    STATUS_PREFIX,
    AppRecord,
    InstanceReport,
    app_key,
    appver_key,
    decode_app,
    decode_placement,
    decode_rollout,
    rollout_key,
)
from meshorch.apps.spec import SpecError, parse_app_spec, spec_digest, to_json
from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import (
    NameTaken,
    VersionExists,
    app_delete_ops,
    app_put_ops,
    app_view,
    check_link_config,
)
from meshorch.fleet.delta import DeltaRejected
from meshorch.fleet.site_link import SiteLink
from meshorch.http_body import read_limited
from meshorch.images.service import SiteImages
from meshorch.images.store import CHUNK_BYTES, validate_digest, validate_ref
from meshorch.join import admission
from meshorch.join.admission import Admission
from meshorch.join.protocol import JoinRefused, JoinRequest, check_revocation_notice
from meshorch.secrets.keyring import parse_public_key, parse_settings
from meshorch.secrets.service import SecretsRefused, SiteSecrets, parse_unseal_key, sealed_answer
from meshorch.site.host_api import HostRoutes, add_host_routes
from meshorch.site.stream_api import add_stream_routes
from meshorch.state.ports import Members, SiteState
from meshorch.state.protocol import FeatureUnavailable
from meshorch.state.tables import (
    APPS_TABLE,
    KV_TABLE,
    MAX_VALUE_BYTES,
    SYSTEM_TABLE,
    parse_member_request,
    validate_host_id,
    validate_kv_key,
)
from meshorch.streams.site import SiteStreams
from raft import Delete, Put
from raft.errors import NotCommittedError, OutcomeUnknownError

logger = logging.getLogger(__name__)

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if isinstance(exc, _DeltaApiError):
            error = {"code": exc.code, "message": exc.message, "version": exc.version}
            return json_response({"error": error}, exc.status)
        return error_response(exc.status, exc.code, exc.message)
    except SecretsRefused as exc:
        return error_response(exc.status, exc.code, str(exc))
    except RemoteInputError as exc:
        return error_response(400, exc.code, str(exc))
    except FeatureUnavailable as exc:
        return error_response(503, exc.code, str(exc))
    except NotCommittedError as exc:
        return error_response(503, "not_committed", f"{exc}; nothing was written, retry")
    except OutcomeUnknownError as exc:
        return error_response(504, "outcome_unknown", str(exc))
    except web.HTTPException as exc:
        if exc.empty_body:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.text or exc.reason)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error, see the agent log")


STEP_DOWN_WAIT_S = 3.0


class ApiNode(SiteState, Protocol):
    """The Raft member as the API uses it: the state, adding a member, stepping down."""

    async def add_member(self, address: str) -> None: ...

    def step_down(self) -> bool: ...


@dataclass(frozen=True)
class SiteServices:
    """What the agent's API serves from; built by the agent (``meshorch.site.agent``)."""

    site_id: str
    host_id: str
    raft_address: str | None  # None on a mesh site: the address is the overlay's
    node: ApiNode
    members: Members
    admission: Admission
    secrets: SiteSecrets
    images: SiteImages
    streams: SiteStreams
    link: SiteLink
    hosts: HostRoutes
    metrics: Collector
    on_revoked: Callable[[], None]  # this host was revoked: forget the site and stop


SERVICES: web.AppKey[SiteServices] = web.AppKey("site_services")


def build_app(services: SiteServices) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_VALUE_BYTES + 1)
    app[SERVICES] = services
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/ping", ping)
    app.router.add_get("/v1/kv/", list_keys)
    app.router.add_get("/v1/kv", list_keys)
    app.router.add_put("/v1/kv/{key:.+}", put_key)
    app.router.add_get("/v1/kv/{key:.+}", get_key)
    app.router.add_delete("/v1/kv/{key:.+}", delete_key)
    app.router.add_get("/v1/members", list_members)
    app.router.add_post("/v1/members", add_member)
    app.router.add_delete("/v1/members/{host_id}", remove_member)
    app.router.add_post("/v1/raft/step-down", step_down)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_post("/v1/join", join)
    app.router.add_post("/v1/revoked", revoked)
    app.router.add_post("/v1/apps", apply_app)
    app.router.add_get("/v1/apps", list_apps)
    app.router.add_get("/v1/apps/{name}", get_app)
    app.router.add_delete("/v1/apps/{name}", delete_app)
    app.router.add_get("/v1/quotas", list_quotas)
    app.router.add_put("/v1/quotas/{tenant}", put_quota)
    app.router.add_post("/v1/images", add_image)
    app.router.add_get("/v1/images", list_images)
    app.router.add_get("/v1/images/blobs/{digest}", get_blob)
    app.router.add_get("/v1/fleet", get_fleet)
    app.router.add_put("/v1/fleet/link", put_fleet_link)
    app.router.add_post("/v1/fleet/deltas", post_fleet_deltas)
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_get("/v1/secrets/status", secrets_status)
    app.router.add_post("/v1/secrets/unseal-request", unseal_request)
    app.router.add_post("/v1/secrets/unseal", unseal)
    app.router.add_post("/v1/secrets/escrow", escrow)
    app.router.add_post("/v1/secrets/lockdown", lockdown)
    app.router.add_post("/v1/secrets/unlock", unlock)
    app.router.add_post("/v1/secrets/rotate", rotate)
    app.router.add_put("/v1/secrets/settings", put_secret_settings)
    add_stream_routes(app, services.streams)
    add_host_routes(app, services.hosts)
    registry = CollectorRegistry()
    registry.register(services.metrics)
    http_metrics.install(app, registry, "meshorch_agent")
    return app


def _services(request: web.Request) -> SiteServices:
    return request.app[SERVICES]


async def ping(_request: web.Request) -> web.Response:
    """Liveness for peers (``meshorch.net.app_network``): cheap, no state read."""
    return web.Response(status=204)


async def get_status(request: web.Request) -> web.Response:
    svc = _services(request)
    status = svc.node.status()
    records = {m.raft: m for m in svc.members.members()}
    leader = records.get(status.leader_address or "")
    members = [
        records[address].to_json()
        if address in records
        else {"host_id": None, "raft": address, "api": None}
        for address in status.members
    ]
    return json_response(
        {
            "site": svc.site_id,
            "host_id": svc.host_id,
            "leader": leader.host_id if leader else None,
            "leader_raft": status.leader_address,
            "is_leader": status.is_leader,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": svc.node.view.applied_index(),
            "members": members,
            "ready": status.ready,
        }
    )


async def _consistent_read(request: web.Request) -> None:
    consistency = request.query.get("consistency", "linearizable")
    if consistency == "linearizable":
        await _services(request).node.barrier()
    elif consistency != "local":
        raise ApiError(400, "bad_consistency", "consistency must be 'linearizable' or 'local'")


def _parse_int(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ApiError(400, f"bad_{name}", f"{name} must be a non-negative integer")
    return int(raw)


async def put_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    expect_index = _parse_int(request, "expect_index", None)
    if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
        raise ApiError(413, "value_too_large", f"values are limited to {MAX_VALUE_BYTES} bytes")
    try:
        value = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413, "value_too_large", f"values are limited to {MAX_VALUE_BYTES} bytes"
        ) from exc
    # A plain put may be retried across a leader change; a compare-and-set may not.
    (result,) = await _services(request).node.propose(
        [Put(KV_TABLE, key, value, expect_index)], idempotent=expect_index is None
    )
    if result.error == "conflict":
        raise ApiError(
            409,
            "conflict",
            f"expect_index={expect_index} but the key is at index {result.current_index}",
        )
    return json_response({"index": result.index})


async def get_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    await _consistent_read(request)
    record = _services(request).node.view.get(KV_TABLE, key)
    if record is None:
        raise ApiError(404, "not_found", "no such key")
    return web.Response(
        body=record.value,
        content_type="application/octet-stream",
        headers={"X-Meshorch-Index": str(record.mod_index)},
    )


async def delete_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    (result,) = await _services(request).node.propose([Delete(KV_TABLE, key)], idempotent=True)
    return json_response({"index": result.index, "deleted": result.existed})


async def list_keys(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    raw_prefix = validate_kv_key(prefix) if prefix else b""
    limit = _parse_int(request, "limit", DEFAULT_LIST_LIMIT)
    assert limit is not None
    if not 0 < limit <= MAX_LIST_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be 1..{MAX_LIST_LIMIT}")
    await _consistent_read(request)
    records, more = _services(request).node.view.scan(KV_TABLE, raw_prefix, limit)
    keys = [key.decode("utf-8", errors="replace") for key, _ in records]
    return json_response({"keys": keys, "more": more})


async def list_members(request: web.Request) -> web.Response:
    await _consistent_read(request)
    return json_response({"members": [m.to_json() for m in _services(request).members.members()]})


async def add_member(request: web.Request) -> web.Response:
    member = parse_member_request(await request.read())
    svc = _services(request)
    by_id = {m.host_id: m for m in svc.members.members()}
    existing = by_id.get(member.host_id)
    if existing is not None and existing.raft != member.raft:
        raise ApiError(409, "host_id_taken", f"{member.host_id} is already at {existing.raft}")
    if any(m.raft == member.raft and m.host_id != member.host_id for m in by_id.values()):
        raise ApiError(409, "address_taken", f"{member.raft} belongs to another host")
    record = member if existing is None or member.api else existing
    await svc.node.propose([Put(SYSTEM_TABLE, record.key(), record.encode())], idempotent=True)
    if member.raft not in svc.node.status().members:
        await svc.node.add_member(member.raft)
    return json_response({"member": record.to_json()})


async def remove_member(request: web.Request) -> web.Response:
    host_id = validate_host_id(request.match_info["host_id"])
    svc = _services(request)
    await svc.node.barrier()
    record = next((m for m in svc.members.members() if m.host_id == host_id), None)
    if record is None:
        raise ApiError(404, "not_found", f"no member {host_id}")
    if record.raft == svc.raft_address:
        raise ApiError(409, "is_self", "ask another member to remove this host")
    await svc.admission.revoke(record)
    return json_response({"removed": record.to_json()})


async def step_down(request: web.Request) -> web.Response:
    """As leader, hand Raft leadership to a caught-up member (asked before this host is
    removed: pysyncobj cannot remove its leader). 409 ``not_leader`` on a follower;
    followers that lag are waited for a few seconds."""
    svc = _services(request)
    deadline = time.monotonic() + STEP_DOWN_WAIT_S
    while svc.node.status().is_leader:
        if svc.node.step_down():
            return json_response({"stepped_down": True})
        if time.monotonic() > deadline:
            raise ApiError(409, "no_successor", "no member is caught up enough to lead")
        await asyncio.sleep(0.1)
    raise ApiError(409, "not_leader", "this host does not lead the site")


async def create_token(request: web.Request) -> web.Response:
    """``{"ttl_s": 3600, "single_use": false}`` -> a join token for this site."""
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    ttl_s = body.get("ttl_s", 3600)
    single_use = body.get("single_use", False)
    if not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool):
        raise ApiError(400, "bad_ttl", "ttl_s must be a number of seconds")
    if not isinstance(single_use, bool):
        raise ApiError(400, "bad_request", "single_use must be true or false")
    try:
        token = await _services(request).admission.create_token(float(ttl_s), single_use)
    except admission.SiteNotReady as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    return json_response(token)


async def join(request: web.Request) -> web.Response:
    """A host asks to join the site (see meshorch.join.protocol for the protocol)."""
    join_request = JoinRequest.parse(await request.read())
    try:
        answer = await _services(request).admission.admit(join_request, time.time())
    except admission.SiteNotReady as exc:
        raise ApiError(503, exc.code, str(exc)) from exc
    except JoinRefused as exc:
        status = 409 if exc.code in ("host_id_taken", "used_token") else 403
        if exc.code in ("wrong_site", "bad_request", "bad_json"):
            status = 400
        logger.warning("refused join of %s: %s", join_request.host_id, exc)
        raise ApiError(status, exc.code, str(exc)) from exc
    return json_response(answer)


async def revoked(request: web.Request) -> web.Response:
    """The site tells this host it was revoked (a notice signed by the site identity)."""
    svc = _services(request)
    try:
        identity = svc.admission.site_identity()
    except admission.SiteNotReady as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    try:
        check_revocation_notice(
            await request.read(),
            identity.public_key,
            svc.site_id,
            svc.host_id,
            time.time(),
        )
    except JoinRefused as exc:
        raise ApiError(403, exc.code, str(exc)) from exc
    svc.on_revoked()
    return json_response({"stopping": True})


async def add_image(request: web.Request) -> web.Response:
    """Body: an image archive (``podman save`` or a rootfs tar); ``?ref=name:tag``."""
    ref = validate_ref(request.query.get("ref", ""))
    svc = _services(request)
    manifest = await svc.images.add_upload(ref, request.content.iter_chunked(CHUNK_BYTES))
    return json_response({"image": manifest.to_json()})


async def list_images(request: web.Request) -> web.Response:
    await _consistent_read(request)
    svc = _services(request)
    return json_response({"images": svc.images.catalog(), "local": svc.images.counters()})


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = validate_digest(request.match_info["digest"])
    path = _services(request).images.blobs.path(digest)
    if not path.exists():
        raise ApiError(404, "not_found", f"this host does not hold {digest}")
    # FileResponse serves HTTP Range requests, which resume broken transfers.
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


MAX_SPEC_BODY = 1 << 20


def _tenant_param(request: web.Request) -> str | None:
    raw = request.query.get("tenant")
    return None if raw is None else check_tenant(raw)


async def apply_app(request: web.Request) -> web.Response:
    """Body: an application spec, YAML or JSON; ``?tenant=`` (default ``default``) owns it.
    A new version starts a rolling upgrade. 409 ``name_taken`` when another tenant has an
    app of that name, ``version_exists`` when the version was applied with other content."""
    tenant = _tenant_param(request) or DEFAULT_TENANT
    body = await read_limited(request.content, MAX_SPEC_BODY)
    try:
        spec = parse_app_spec(body)
    except SpecError as exc:
        return json_response(
            {"error": {"code": "bad_spec", "message": str(exc), "problems": exc.problems}}, 400
        )
    svc = _services(request)
    await svc.node.barrier()
    existing = svc.node.view.get(APPS_TABLE, appver_key(spec.name, spec.version))
    current = svc.node.view.get(APPS_TABLE, app_key(spec.name))
    try:
        ops = app_put_ops(
            spec,
            None if existing is None else existing.value,
            tenant,
            None if current is None else current.value,
        )
    except (VersionExists, NameTaken) as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    await svc.node.propose(ops, idempotent=True)
    return json_response(
        {"app": spec.name, "tenant": tenant, "version": spec.version, "digest": spec_digest(spec)}
    )


def _scan_json(svc: SiteServices, prefix: bytes) -> list[bytes]:
    records, _ = svc.node.view.scan(APPS_TABLE, prefix, 1_000_000)
    return [r.value for _, r in records]


def _app_view(svc: SiteServices, record: AppRecord) -> dict[str, object]:
    spec = record.spec
    placements = map(decode_placement, _scan_json(svc, INST_PREFIX))
    reports = {r.instance_id: r for r in map(InstanceReport.decode, _scan_json(svc, STATUS_PREFIX))}
    rollout_record = svc.node.view.get(APPS_TABLE, rollout_key(spec.name))
    rollout = decode_rollout(rollout_record.value) if rollout_record else None
    return app_view(spec, placements, reports, rollout, record.tenant)


async def list_apps(request: web.Request) -> web.Response:
    """Every app, each with its tenant; ``?tenant=`` shows only that tenant's."""
    tenant = _tenant_param(request)
    await _consistent_read(request)
    svc = _services(request)
    records = [decode_app(raw) for raw in _scan_json(svc, APP_PREFIX)]
    chosen = [r for r in records if tenant is None or r.tenant == tenant]
    return json_response({"apps": [_app_view(svc, record) for record in chosen]})


async def get_app(request: web.Request) -> web.Response:
    await _consistent_read(request)
    svc = _services(request)
    name = request.match_info["name"]
    stored = svc.node.view.get(APPS_TABLE, app_key(name))
    if stored is None:
        raise ApiError(404, "not_found", f"no application {name!r}")
    record = decode_app(stored.value)
    events_prefix = EVENT_PREFIX + f"{name}/".encode()
    events = [orjson.loads(raw) for raw in _scan_json(svc, events_prefix)][-50:]
    for event in events:
        event.pop("v", None)
    return json_response({**_app_view(svc, record), "spec": to_json(record.spec), "events": events})


async def delete_app(request: web.Request) -> web.Response:
    """``?tenant=``: only if the app is that tenant's (409 ``name_taken`` otherwise)."""
    tenant = _tenant_param(request)
    svc = _services(request)
    name = request.match_info["name"]
    await svc.node.barrier()
    current = svc.node.view.get(APPS_TABLE, app_key(name))
    if current is None:
        raise ApiError(404, "not_found", f"no application {name!r}")
    try:
        ops = app_delete_ops(name, tenant, current.value)
    except NameTaken as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    await svc.node.propose(ops, idempotent=True)
    return json_response({"deleted": name})


# -- tenant quotas (docs/app-spec.md) ------------------------------------------------

MAX_QUOTA_BODY = 4096


async def list_quotas(request: web.Request) -> web.Response:
    """Every tenant with a quota or placed instances: its quota (null fields: unlimited,
    ``quota`` null: none) and what its placed instances request (``used``)."""
    await _consistent_read(request)
    svc = _services(request)
    quotas = dict(map(decode_quota, _scan_json(svc, QUOTA_PREFIX)))
    owners = {r.spec.name: r.tenant for r in map(decode_app, _scan_json(svc, APP_PREFIX))}
    used: dict[str, Usage] = {}
    for p in map(decode_placement, _scan_json(svc, INST_PREFIX)):
        tenant = owners.get(p.app, DEFAULT_TENANT)
        used[tenant] = used.get(tenant, Usage()).plus(p.cpu_millis, p.memory_bytes)
    tenants = sorted(set(quotas) | set(used))
    return json_response(
        {
            "quotas": [
                {
                    "tenant": tenant,
                    "quota": quotas[tenant].to_json() if tenant in quotas else None,
                    "used": used.get(tenant, Usage()).to_json(),
                }
                for tenant in tenants
            ]
        }
    )


async def put_quota(request: web.Request) -> web.Response:
    """Body ``{"cpu_millis", "memory_bytes", "instances"}``: integers >= 0 or null
    (unlimited); all null removes the quota. The same rules as the ``tenant.quota`` op."""
    tenant = check_tenant(request.match_info["tenant"])
    body = await read_limited(request.content, MAX_QUOTA_BODY)
    if len(body) > MAX_QUOTA_BODY:
        raise ApiError(413, "too_large", f"the body is limited to {MAX_QUOTA_BODY} bytes")
    quota = parse_quota(_json_object(body))
    await _services(request).node.propose(list(quota_writes(tenant, quota)), idempotent=True)
    return json_response({"tenant": tenant, "quota": None if quota.unlimited else quota.to_json()})


# -- the fleet link ------------------------------------------------------------------

# Refusals that are about where the site is in the log, not about the delta itself.
ORDER_REASONS = frozenset({"replay", "rollback", "gap", "chain_mismatch", "expired"})


async def get_fleet(request: web.Request) -> web.Response:
    """The site's fleet identity, link, trust state and last refusals."""
    await _consistent_read(request)
    return json_response(_services(request).link.status_json())


async def put_fleet_link(request: web.Request) -> web.Response:
    """Body ``{"hub", "fleet", "root_key", "enroll_token"?}``. Never changes whom the
    site trusts once it has a trust state: only a signed root.rotate delta does."""
    data = _json_object(await request.read())
    unknown = set(data) - {"hub", "fleet", "root_key", "enroll_token"}
    if unknown:
        raise ApiError(400, "bad_link", f"unknown fields: {', '.join(sorted(unknown))}")
    wanted = check_link_config(
        data.get("hub"), data.get("fleet"), data.get("root_key"), data.get("enroll_token")
    )
    link = _services(request).link
    try:
        stored = await link.configure(wanted)
    except RemoteInputError as exc:
        status = 400 if exc.code == "bad_link" else 409
        raise ApiError(status, exc.code, str(exc)) from exc
    trust = link.trust_state()
    return json_response(
        {"link": stored.to_json(), "trust": None if trust is None else trust.to_json()}
    )


async def post_fleet_deltas(request: web.Request) -> web.Response:
    """Relay deltas: one envelope, or a JSON list of envelopes, verified and applied here.

    200 ``{"applied": [versions], "version", "head", "rejected"?}`` (a list may be applied
    in part: its verified prefix); otherwise 400/409 with the refusal's reason as the code,
    and nothing changed.
    """
    body = await request.read()
    if body.lstrip()[:1] == b"[":
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _rejected(DeltaRejected("malformed", f"not a JSON list: {exc}")) from exc
        raws = [orjson.dumps(item) for item in items]
    else:
        raws = [body]
    if not raws:
        raise ApiError(400, "malformed", "no delta given")
    outcome = await _services(request).link.commit(raws)
    if outcome.conflict:
        raise ApiError(409, "conflict", "the site applied other deltas meanwhile; retry")
    if not outcome.applied:
        assert outcome.rejected is not None
        raise _rejected(outcome.rejected)
    assert outcome.state is not None
    answer: dict[str, object] = {
        "applied": outcome.applied,
        "version": outcome.state.version,
        "head": outcome.state.head,
        "op_errors": outcome.op_errors,
    }
    if outcome.rejected is not None:
        answer["rejected"] = outcome.rejected.to_json()
    return json_response(answer)


def _rejected(exc: DeltaRejected) -> ApiError:
    status = 409 if exc.reason in ORDER_REASONS else 400
    return _DeltaApiError(status, exc)


class _DeltaApiError(ApiError):
    def __init__(self, status: int, exc: DeltaRejected) -> None:
        super().__init__(status, exc.reason, exc.message)
        self.version = exc.version


def _json_object(body: bytes) -> dict[str, object]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return data


# -- secrets (docs/secrets.md) -------------------------------------------------------

MAX_SECRETS_BODY = 4096
ROTATE_WAIT_S = 10.0


async def _small_object(request: web.Request, fields: frozenset[str]) -> dict[str, object]:
    body = await read_limited(request.content, MAX_SECRETS_BODY)
    if len(body) > MAX_SECRETS_BODY:
        raise ApiError(413, "too_large", f"the body is limited to {MAX_SECRETS_BODY} bytes")
    data = _json_object(body)
    unknown = set(data) - fields
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    return data


async def list_secrets(request: web.Request) -> web.Response:
    """Names, versions, states and data key ids; never a value."""
    await _consistent_read(request)
    return json_response({"secrets": _services(request).secrets.list_json()})


async def secrets_status(request: web.Request) -> web.Response:
    await _consistent_read(request)
    return json_response(_services(request).secrets.status_json())


async def unseal_request(request: web.Request) -> web.Response:
    """A peer asks for the unseal key: answered sealed to its registered host key."""
    data = await _small_object(request, frozenset({"host_id"}))
    blob = _services(request).secrets.answer_unseal_request(data.get("host_id"))
    return json_response(sealed_answer(blob))


async def unseal(request: web.Request) -> web.Response:
    """The operator's unseal key, ``{"key": base64}``; checked against the keyring."""
    data = await _small_object(request, frozenset({"key"}))
    kek = parse_unseal_key(data)
    changed = await _services(request).secrets.unseal(kek)
    return json_response({"sealed": False, "changed": changed})


async def escrow(request: web.Request) -> web.Response:
    """The unseal key sealed to ``{"public_key": hex X25519}`` (for escrow at the hub)."""
    data = await _small_object(request, frozenset({"public_key"}))
    public_key = parse_public_key(data.get("public_key"))
    return json_response(sealed_answer(_services(request).secrets.escrow(public_key)))


async def lockdown(request: web.Request) -> web.Response:
    await _small_object(request, frozenset())
    svc = _services(request)
    await svc.secrets.lockdown(f"api on {svc.host_id}")
    return json_response({"locked_down": True})


async def unlock(request: web.Request) -> web.Response:
    await _small_object(request, frozenset())
    was_locked = await _services(request).secrets.unlock()
    return json_response({"locked_down": False, "changed": was_locked})


async def rotate(request: web.Request) -> web.Response:
    """Ask for a data key rotation; 200 once done (within ``wait_s``), else 202."""
    data = await _small_object(request, frozenset({"wait_s"}))
    wait_s = data.get("wait_s", ROTATE_WAIT_S)
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= 60:
        raise ApiError(400, "bad_request", "wait_s: seconds, 0 to 60")
    svc = _services(request)
    before = await svc.secrets.request_rotation(f"api on {svc.host_id}")
    assert before is not None
    done = await svc.secrets.rotated_since(before, float(wait_s))
    status = svc.secrets.status_json()
    return json_response({"rotated": done, "current_data_key": status["current_data_key"]},
                         200 if done else 202)  # fmt: skip


async def put_secret_settings(request: web.Request) -> web.Response:
    data = await _small_object(request, frozenset({"rotation_interval_s"}))
    settings = parse_settings(data)
    await _services(request).secrets.put_settings(settings)
    return json_response({"rotation_interval_s": settings.rotation_interval_s})
