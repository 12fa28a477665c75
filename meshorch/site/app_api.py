"""The agent's application routes: specs (apply, list, show, delete), tenant quotas, and
the site's image catalogue (uploads, pulls from registries, and blobs peers copy).
"""

from __future__ import annotations

import logging

import aiohttp
import orjson
from aiohttp import web

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
    host_protocols,
    rollout_key,
)
from meshorch.apps.spec import (
    SpecError,
    parse_app_spec,
    require_own_secrets,
    spec_digest,
    to_json,
)
from meshorch.fleet.apply import (
    NameTaken,
    VersionExists,
    app_delete_ops,
    app_put_ops,
    app_view,
)
from meshorch.http_body import read_limited
from meshorch.images.follow import IDLE_S, Follow, parse_follow, parse_start
from meshorch.images.oci import BadManifest, NoMatchingPlatform
from meshorch.images.reference import parse_reference
from meshorch.images.registry import Credentials, RegistryError, credentials_from_secret
from meshorch.images.service import MAX_IMAGE_BYTES, SiteImages
from meshorch.images.store import CHUNK_BYTES, validate_digest, validate_ref
from meshorch.secrets.keyring import SecretUnavailable, is_secret_name
from meshorch.site.guard import caller_of
from meshorch.site.http import (
    ApiError,
    SiteServices,
    consistent_read,
    json_object,
    json_response,
    services,
)
from meshorch.state.protocol import require
from meshorch.state.tables import (
    APPS_TABLE,
)

logger = logging.getLogger(__name__)


def add_app_routes(app: web.Application) -> None:
    """Register the application, quota and image routes."""
    app.router.add_post("/v1/apps", apply_app)
    app.router.add_get("/v1/apps", list_apps)
    app.router.add_get("/v1/apps/{name}", get_app)
    app.router.add_delete("/v1/apps/{name}", delete_app)
    app.router.add_get("/v1/quotas", list_quotas)
    app.router.add_put("/v1/quotas/{tenant}", put_quota)
    app.router.add_post("/v1/images", add_image)
    app.router.add_post("/v1/images/pull", pull_image)
    app.router.add_get("/v1/images", list_images)
    app.router.add_get("/v1/images/blobs/{digest}", get_blob)
    app.router.add_get("/v1/images/partials/{digest}", get_partial_blob)


async def add_image(request: web.Request) -> web.Response:
    """Body: an image archive (``podman save`` or a rootfs tar); ``?ref=name:tag``."""
    ref = validate_ref(request.query.get("ref", ""))
    svc = services(request)
    manifest = await svc.images.add_upload(ref, request.content.iter_chunked(CHUNK_BYTES))
    return json_response({"image": manifest.to_json()})


MAX_PULL_BODY = 16 << 10
# Slow registries are waited for; a silent one is given up on.
PULL_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15, sock_read=60)


async def pull_image(request: web.Request) -> web.Response:
    """Body: ``{"ref": "registry/name:tag", "username"?, "password"?, "plain_http"?, "pin"?}``
    (``pin``: kept at the site when no app names it).
    This host pulls the image and names it in the catalogue, pinned to the digest the tag
    has now; the other hosts copy it from their peers. 502 with the registry's problem
    (``registry_auth``, ``image_not_found``, ``digest_mismatch``, ``registry_unavailable``)."""
    raw = await read_limited(request.content, MAX_PULL_BODY)
    if len(raw) > MAX_PULL_BODY:
        raise ApiError(413, "too_large", f"the body is limited to {MAX_PULL_BODY} B")
    body = json_object(raw)
    ref, username, password = body.get("ref"), body.get("username"), body.get("password")
    plain_http = body.get("plain_http", False)
    if not isinstance(ref, str):
        raise ApiError(400, "bad_request", "ref: an image reference is required")
    if not isinstance(plain_http, bool):
        raise ApiError(400, "bad_request", "plain_http: true or false")
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise ApiError(400, "bad_request", "pin: true or false")
    reference = parse_reference(ref)  # refused here, before any connection, when malformed
    svc = services(request)
    require("oci_images", host_protocols(svc.node.view))
    credentials = None
    if username is not None or password is not None:
        if not (isinstance(username, str) and isinstance(password, str) and username):
            raise ApiError(400, "bad_request", "username and password: strings, both or none")
        credentials = Credentials(username, password)
    tenant = ""
    if body.get("secret") is not None:
        if credentials is not None:
            raise ApiError(400, "bad_request", "secret or username and password, not both")
        credentials = _secret_credentials(svc, body, reference.api_host)
        tenant = str(body.get("tenant", DEFAULT_TENANT))  # checked by _secret_credentials
    try:
        async with aiohttp.ClientSession(timeout=PULL_TIMEOUT) as session:
            manifest, pulled = await svc.images.pull(
                session, ref, credentials, plain_http=plain_http, tenant=tenant, pinned=pin
            )
    except (RegistryError, BadManifest, NoMatchingPlatform) as exc:
        raise ApiError(502, exc.code, f"pulling {ref}: {exc}") from exc
    return json_response({"image": manifest.to_json(), "pull": pulled.to_json()})


def _secret_credentials(svc: SiteServices, body: dict[str, object], registry: str) -> Credentials:
    """The registry credentials in the tenant's secret ``body["secret"]``."""
    name, tenant = body.get("secret"), body.get("tenant", DEFAULT_TENANT)
    if not is_secret_name(name) or not isinstance(name, str) or not isinstance(tenant, str):
        raise ApiError(400, "bad_request", "secret: a secret's name; tenant: a tenant's")
    check_tenant(tenant)
    try:
        value = svc.secrets.value(tenant, name)
    except SecretUnavailable as exc:
        raise ApiError(409, "secret_unavailable", str(exc)) from exc
    return credentials_from_secret(value, registry)


async def list_images(request: web.Request) -> web.Response:
    await consistent_read(request)
    svc = services(request)
    pulling = [
        {"ref": p.ref, "host": p.host, "source": p.source}
        for p in svc.images.pulls_in_progress().values()
    ]
    return json_response(
        {"images": svc.images.catalog(), "pulling": pulling, "local": svc.images.counters()}
    )


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = validate_digest(request.match_info["digest"])
    path = services(request).images.blobs.path(digest)
    if not path.exists():
        raise ApiError(404, "not_found", f"this host does not hold {digest}")
    # FileResponse serves HTTP Range requests, which resume broken transfers.
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def get_partial_blob(request: web.Request) -> web.StreamResponse:
    """A blob as far as this host has it: whole, or the part a pull has fetched so far
    (with HTTP Range: a peer asks for what it lacks). Peers follow a pull with it.

    ``?follow=SIZE`` (SIZE: the blob's size): the bytes as this host receives them, from
    the Range offset up to SIZE, ended short after a while without any
    (``meshorch.images.follow``): the next host of a pull's chain copies it so."""
    digest = validate_digest(request.match_info["digest"])
    images = services(request).images
    raw_follow = request.query.get("follow")
    if raw_follow is not None:
        return await _follow_blob(request, images, digest, raw_follow)
    blobs = images.blobs
    for path in (blobs.path(digest), blobs.partial_path(digest)):
        if path.exists():
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
    raise ApiError(404, "not_found", f"this host has nothing of {digest}")


async def _follow_blob(
    request: web.Request, images: SiteImages, digest: str, raw_follow: str
) -> web.StreamResponse:
    size = parse_follow(raw_follow, MAX_IMAGE_BYTES)
    start = parse_start(request.headers.get("Range"), size)
    declared = images.declared_size(digest)
    if declared is None:
        raise ApiError(404, "not_found", f"no pull or image of the site has {digest}")
    if declared[0] != size:
        raise ApiError(400, "bad_follow", f"follow: {digest} is {declared[0]} bytes, not {size}")
    peer = caller_of(request).name or request.remote or "?"
    if not images.follows.take(peer):
        raise ApiError(429, "too_many_follows", f"at most {images.follows.per_peer} at once")
    try:
        with Follow(images.blobs.path(digest), images.blobs.partial_path(digest), start, size) as f:
            # Waited for only if this host is getting it (not an image it gave up).
            if not await f.wait_for_file(IDLE_S if declared[1] else 0.0):
                raise ApiError(404, "not_found", f"this host has nothing of {digest}")
            response = web.StreamResponse(
                status=206 if start else 200, headers={"Content-Type": "application/octet-stream"}
            )
            if start:
                response.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            await response.prepare(request)  # no length: a follow may end short
            async for chunk in f.chunks():
                await response.write(chunk)
                images.followed_bytes += len(chunk)
            await response.write_eof()
            return response
    finally:
        images.follows.give(peer)


MAX_SPEC_BODY = 1 << 20


def _tenant_param(request: web.Request) -> str | None:
    raw = request.query.get("tenant")
    return None if raw is None else check_tenant(raw)


def _name_unavailable(name: str) -> ApiError:
    """The answer to a put of a name the tenant cannot have: the same whoever holds it, and
    naming nobody (app names are one namespace per site)."""
    return ApiError(409, "name_taken", f"the application name {name!r} is not available")


def _absent(name: str) -> ApiError:
    return ApiError(404, "not_found", f"no application {name!r}")


async def apply_app(request: web.Request) -> web.Response:
    """Body: an application spec, YAML or JSON; ``?tenant=`` (default ``default``) owns it.
    A secret reference without ``tenant`` is that tenant's; one to another tenant's secret
    is refused (400 ``foreign_secret``, naming the field). A new version starts a rolling
    upgrade. 409 ``name_taken`` when the name is not available to the tenant (it is
    another's: the answer does not say whose), ``version_exists`` when the version was
    applied with other content."""
    tenant = _tenant_param(request) or DEFAULT_TENANT
    body = await read_limited(request.content, MAX_SPEC_BODY)
    try:
        spec = parse_app_spec(body, tenant=tenant)
        require_own_secrets(spec, tenant)
    except SpecError as exc:
        return json_response(
            {"error": {"code": exc.code, "message": str(exc), "problems": exc.problems}}, 400
        )
    svc = services(request)
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
    except NameTaken as exc:
        raise _name_unavailable(spec.name) from exc
    except VersionExists as exc:
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
    await consistent_read(request)
    svc = services(request)
    records = [decode_app(raw) for raw in _scan_json(svc, APP_PREFIX)]
    chosen = [r for r in records if tenant is None or r.tenant == tenant]
    return json_response({"apps": [_app_view(svc, record) for record in chosen]})


async def get_app(request: web.Request) -> web.Response:
    """``?tenant=``: another tenant's app answers 404, as an absent one."""
    tenant = _tenant_param(request)
    await consistent_read(request)
    svc = services(request)
    name = request.match_info["name"]
    stored = svc.node.view.get(APPS_TABLE, app_key(name))
    record = None if stored is None else decode_app(stored.value)
    if record is None or tenant not in (None, record.tenant):
        raise _absent(name)
    events_prefix = EVENT_PREFIX + f"{name}/".encode()
    events = [orjson.loads(raw) for raw in _scan_json(svc, events_prefix)][-50:]
    for event in events:
        event.pop("v", None)
    return json_response({**_app_view(svc, record), "spec": to_json(record.spec), "events": events})


async def delete_app(request: web.Request) -> web.Response:
    """``?tenant=``: only if the app is that tenant's; another tenant's app answers 404,
    as an absent one."""
    tenant = _tenant_param(request)
    svc = services(request)
    name = request.match_info["name"]
    await svc.node.barrier()
    current = svc.node.view.get(APPS_TABLE, app_key(name))
    if current is None:
        raise _absent(name)
    try:
        ops = app_delete_ops(name, tenant, current.value)
    except NameTaken as exc:
        raise _absent(name) from exc
    await svc.node.propose(ops, idempotent=True)
    return json_response({"deleted": name})


MAX_QUOTA_BODY = 4096


async def list_quotas(request: web.Request) -> web.Response:
    """Every tenant with a quota or placed instances: its quota (null fields: unlimited,
    ``quota`` null: none) and what its placed instances request (``used``)."""
    await consistent_read(request)
    svc = services(request)
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
    quota = parse_quota(json_object(body))
    await services(request).node.propose(list(quota_writes(tenant, quota)), idempotent=True)
    return json_response({"tenant": tenant, "quota": None if quota.unlimited else quota.to_json()})
