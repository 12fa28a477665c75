"""The hub's HTTP API (aiohttp, JSON by orjson): operators, and the sites' link.

Every route is declared once in ``ROUTES`` with its auth scheme and schemas; ``build_app``
registers them and ``/v1/openapi.json`` is generated from the same table.

Errors are JSON ``{"error": {"code": "...", "message": "..."}}`` (plus ``"problems"``, a
list, when the input had several). 4xx answers change nothing.

Auth schemes (a route's ``auth``):

    none       no credentials
    <action>   an action of the policy table ``central_hub.authz.POLICY`` (e.g.
               ``apps.write``): ``Authorization: Bearer mht_<id>_<secret>``; 401
               ``unauthorized`` when missing, unknown or expired, 403 ``forbidden`` when the
               table refuses the token's role (or a tenant token a fleet action). The
               service then checks the object: another tenant's object answers 404.
               (A role name given instead of an action reads as ``authz.ROLE_ACTIONS``.)
    site       a request signed by a site's identity key (docs/fleet-link.md); 401
               ``bad_site_signature`` otherwise
    enroll     unsigned; the body carries a single-use enrollment token

Refused token requests (401, 403) are audited (``GET /v1/audit``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from central_hub import authz, openapi, tenancy, tokens
from central_hub.audit import CALLER
from central_hub.dashboard import add_dashboard
from central_hub.errors import ApiError, InputProblems
from central_hub.fleetview import parse_report
from central_hub.metrics import HubCollector
from central_hub.model import (
    validate_labels,
    validate_public_key,
    validate_site_id,
    validate_tenant,
)
from central_hub.placement import parse_policy
from central_hub.tokens import TokenRecord
from central_hub.vault import parse_report_secrets
from meshorch import http_metrics
from meshorch.apps.spec import SpecError, parse_app_spec, spec_digest
from meshorch.errors import RemoteInputError
from meshorch.fleet.delta import DeltaRejected, parse
from meshorch.fleet.link_auth import LinkAuthError, claimed_site, verify_request

if TYPE_CHECKING:
    from central_hub.service import Hub

logger = logging.getLogger(__name__)

JSON = "application/json"
HUB_KEY: web.AppKey[Hub] = web.AppKey("hub")
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("max_body_bytes", int)
SCHEMES = ("none", "site", "enroll")
_TOKEN: web.RequestKey[TokenRecord] = web.RequestKey("token", TokenRecord)
_SITE: web.RequestKey[str] = web.RequestKey("site", str)
MAX_LINK_LIMIT = 500
DEFAULT_WAIT_S = 25.0
MAX_WAIT_S = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = str  # one of SCHEMES, or an action of authz.POLICY


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    type: Literal["integer", "number", "string"]
    description: str


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: Auth
    summary: str
    request: str | None = None  # a schema name of openapi.SCHEMAS
    response: str = "Empty"
    status: int = 200
    query: tuple[Query, ...] = ()


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_response(
    status: int, code: str, message: str, problems: list[str] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if problems:
        error["problems"] = problems
    return json_response({"error": error}, status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        if exc.status == 413:
            response.force_close()  # do not linger reading the rest of a huge body
        return response
    except (InputProblems, SpecError) as exc:
        return error_response(400, exc.code, str(exc), exc.problems)
    except RemoteInputError as exc:
        return error_response(400, exc.code, str(exc))
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "body_too_large", exc.text or "the body is too large")
    except web.HTTPException as exc:
        if exc.empty_body:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.text or exc.reason)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error, see the hub log")


def build_app(hub: Hub, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body_bytes)
    app[HUB_KEY] = hub
    app[MAX_BODY_KEY] = max_body_bytes
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guarded(route))
    add_dashboard(app)  # the web UI (not part of the API: not in ROUTES)
    registry = CollectorRegistry()
    registry.register(HubCollector(hub))
    http_metrics.install(app, registry, "meshorch_hub")  # GET /metrics, latency by route
    return app


# -- request helpers -------------------------------------------------------------------


def _hub(request: web.Request) -> Hub:
    return request.app[HUB_KEY]


def _token(request: web.Request) -> TokenRecord:
    return request[_TOKEN]


def _site(request: web.Request) -> str:
    return request[_SITE]


def _guarded(route: Route) -> Handler:
    action = None if route.auth in SCHEMES else authz.action_of(route.auth)

    async def handler(request: web.Request) -> web.StreamResponse:
        hub = _hub(request)
        if action is not None:
            return await _with_token(hub, request, route, action)
        if route.auth == "site":
            request[_SITE] = _verify_site(hub, request, await _read(request))
        reset = CALLER.set((None, "sites.enroll") if route.auth == "enroll" else None)
        try:
            return await route.handler(request)
        finally:
            CALLER.reset(reset)

    return handler


async def _with_token(
    hub: Hub, request: web.Request, route: Route, action: str
) -> web.StreamResponse:
    token: TokenRecord | None = None
    reset = CALLER.set(None)
    try:
        token = hub.authenticate(request.headers.get("Authorization"))
        CALLER.set((token, action))
        tokens.authorize(token, action)
        request[_TOKEN] = token
        return await route.handler(request)
    except ApiError as exc:
        if exc.status in (401, 403):
            tenant = None if token is None else token.tenant
            detail = f"{request.method} {request.path}: {exc.code}"
            outcome = f"refused {exc.status}"
            refusal = hub.audit(token, action, tenant, "request", route.path, outcome, detail)
            if refusal is not None:
                with contextlib.suppress(ApiError):  # the hub is stopping
                    await refusal
        raise
    finally:
        CALLER.reset(reset)


async def _read(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"bodies are limited to {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"bodies are limited to {limit} bytes") from None


async def _read_json(request: web.Request) -> object:
    body = await _read(request)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None


async def _read_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The body: a JSON object with no field outside ``allowed`` (400
    ``field_not_allowed`` naming the others: mass assignment is refused)."""
    return authz.only_fields(await _read_json(request), allowed, "this request")


def _query_tenant(request: web.Request) -> str | None:
    raw = request.query.get("tenant")
    return None if raw is None else validate_tenant(raw)


def _verify_site(hub: Hub, request: web.Request, body: bytes) -> str:
    try:
        site = claimed_site(request.headers)
        key = hub.site_public_key(site)
        if key is None:
            raise LinkAuthError(f"site {site[:64]!r} is unknown or not enrolled")
        verify_request(key, request.headers, request.method, request.raw_path, body, hub.now())
    except LinkAuthError as exc:
        raise ApiError(401, "bad_site_signature", str(exc)) from None
    return site


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"bad_{name}", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _query_seconds(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:  # also refuses NaN
        raise ApiError(400, f"bad_{name}", f"{name} must be a number of seconds from 0 to {high}")
    return value


# -- fleet and deltas ------------------------------------------------------------------


async def get_fleet(request: web.Request) -> web.Response:
    return json_response(_hub(request).fleet_info())


async def rotate_root(request: web.Request) -> web.Response:
    return json_response(await _hub(request).rotate_root())


async def list_deltas(request: web.Request) -> web.Response:
    hub = _hub(request)
    after = _query_int(request, "after", 0, 0, 2**63)
    limit = _query_int(request, "limit", 100, 1, MAX_LINK_LIMIT)
    found = []
    for version, envelope in hub.deltas_after(after, limit):
        try:
            delta, _, sigs = parse(envelope)
        except DeltaRejected as exc:  # never stored by the hub; say so rather than fail
            found.append({"version": version, "error": str(exc)})
            continue
        found.append(
            {
                "version": delta.version,
                "digest": delta.digest,
                "prev": delta.prev,
                "issued_at": delta.issued_at,
                "expires_at": delta.expires_at,
                "target": delta.target.to_json(),
                "ops": [dict(op) for op in delta.ops],
                "signed_by": [key for key, _ in sigs],
            }
        )
    return json_response({"head": hub.head.version, "deltas": found})


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi.document(ROUTES))


# -- the site link ---------------------------------------------------------------------


async def link_enroll(request: web.Request) -> web.Response:
    data = await _read_object(request, {"site", "public_key", "token"})
    site = validate_site_id(data.get("site"))
    key = validate_public_key(data.get("public_key"))
    token = data.get("token")
    if not isinstance(token, str):
        raise ApiError(403, "bad_enroll_token", "token is the site's enrollment token")
    await _hub(request).enroll(site, key, token)
    return json_response({"site": site})


async def link_deltas(request: web.Request) -> web.Response:
    after = _query_int(request, "after", 0, 0, 2**63)
    wait_s = _query_seconds(request, "wait", DEFAULT_WAIT_S, MAX_WAIT_S)
    limit = _query_int(request, "limit", MAX_LINK_LIMIT, 1, MAX_LINK_LIMIT)
    head, envelopes = await _hub(request).wait_for_deltas(after, wait_s, limit)
    body = {"head": head, "deltas": [orjson.Fragment(e) for e in envelopes]}
    return json_response(body)


async def link_gossip(request: web.Request) -> web.Response:
    return json_response(_hub(request).gossip_info(_site(request)))


async def link_report(request: web.Request) -> web.Response:
    site = _site(request)
    data = await _read_json(request)
    report = parse_report(data, site)
    report.update(parse_report_secrets(data))  # the secrets part (central_hub.vault)
    head = await _hub(request).record_report(site, report)
    return json_response({"head": head})


# -- tokens ----------------------------------------------------------------------------


async def create_token(request: web.Request) -> web.Response:
    caller = _token(request)
    wanted = tokens.parse_token_request(await _read_json(request), caller)
    text, record = await _hub(request).create_token(caller, wanted)
    return json_response({"token": text, **record.public_json()}, 201)


async def list_tokens(request: web.Request) -> web.Response:
    found = _hub(request).list_tokens(_token(request), _query_tenant(request))
    return json_response({"tokens": [t.public_json() for t in found]})


async def delete_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    await _hub(request).delete_token(_token(request), token_id)
    return json_response({"deleted": token_id})


# -- tenants and the audit log -----------------------------------------------------------


async def create_tenant(request: web.Request) -> web.Response:
    tenant_id, description = tenancy.parse_tenant_request(await _read_json(request))
    return json_response(
        await _hub(request).create_tenant(_token(request), tenant_id, description), 201
    )


async def list_tenants(request: web.Request) -> web.Response:
    return json_response({"tenants": _hub(request).list_tenants(_token(request))})


async def get_tenant(request: web.Request) -> web.Response:
    return json_response(_hub(request).get_tenant(_token(request), request.match_info["id"]))


async def delete_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["id"]
    return json_response(await _hub(request).delete_tenant(_token(request), tenant_id))


async def put_quota(request: web.Request) -> web.Response:
    quota = tenancy.parse_quota_request(await _read_json(request))
    tenant_id = request.match_info["id"]
    return json_response(await _hub(request).set_quota(_token(request), tenant_id, quota))


async def get_quota(request: web.Request) -> web.Response:
    return json_response(_hub(request).get_quota(_token(request), request.match_info["id"]))


async def get_audit(request: web.Request) -> web.Response:
    after = _query_int(request, "after", 0, 0, 2**63)
    limit = _query_int(request, "limit", 100, 1, MAX_LINK_LIMIT)
    hub, token = _hub(request), _token(request)
    return json_response(hub.read_audit(token, after, limit, _query_tenant(request)))


# -- sites -----------------------------------------------------------------------------


async def create_site(request: web.Request) -> web.Response:
    data = await _read_object(request, {"id", "labels", "public_key"})
    site = validate_site_id(data.get("id"))
    labels = validate_labels(data.get("labels", {}))
    raw_key = data.get("public_key")
    key = None if raw_key is None else validate_public_key(raw_key)
    return json_response(await _hub(request).register_site(site, labels, key), 201)


async def list_sites(request: web.Request) -> web.Response:
    return json_response({"sites": _hub(request).list_sites(_token(request))})


async def get_site(request: web.Request) -> web.Response:
    return json_response(_hub(request).get_site(_token(request), request.match_info["id"]))


async def put_site_labels(request: web.Request) -> web.Response:
    labels = validate_labels(await _read_json(request))
    site = request.match_info["id"]
    return json_response(await _hub(request).set_site_labels(site, labels))


async def list_alerts(request: web.Request) -> web.Response:
    return json_response({"alerts": _hub(request).list_alerts(_token(request))})


async def acknowledge_alert(request: web.Request) -> web.Response:
    await _read(request)  # no body expected; a body is ignored
    answer = await _hub(request).acknowledge_alert(_token(request), request.match_info["id"])
    return json_response(answer)


async def decommission_site(request: web.Request) -> web.Response:
    site = request.match_info["id"]
    return json_response(await _hub(request).decommission_site(_token(request), site))


async def delete_site(request: web.Request) -> web.Response:
    site = request.match_info["id"]
    await _hub(request).delete_site(site)
    return json_response({"deleted": site})


# -- apps and deployments --------------------------------------------------------------


async def create_app(request: web.Request) -> web.Response:
    data = await _read_object(request, {"spec", "placement", "tenant"})
    raw = data.get("spec")
    if isinstance(raw, dict):
        text: str | bytes = orjson.dumps(raw)
    elif isinstance(raw, str):
        text = raw
    else:
        raise ApiError(400, "bad_spec", "spec is an application spec: an object or YAML text")
    spec = parse_app_spec(text)
    policy = parse_policy(data.get("placement"))
    tenant = data.get("tenant")
    chosen = None if tenant is None else validate_tenant(tenant)
    status, deployment = await _hub(request).deploy(
        _token(request), spec, spec_digest(spec), policy, chosen
    )
    return json_response(deployment, status)


async def list_apps(request: web.Request) -> web.Response:
    found = _hub(request).list_apps(_token(request), _query_tenant(request))
    return json_response({"apps": found})


async def get_app(request: web.Request) -> web.Response:
    return json_response(_hub(request).get_app(_token(request), request.match_info["name"]))


async def delete_app(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return json_response(await _hub(request).delete_app(_token(request), name))


async def get_deployment(request: web.Request) -> web.Response:
    deployment_id = request.match_info["id"]
    return json_response(_hub(request).get_deployment(_token(request), deployment_id))


_AFTER = Query("after", "integer", "only deltas with a version greater than this")
_LIMIT = Query("limit", "integer", "at most this many deltas (1-500)")
_TENANT_FILTER = Query("tenant", "string", "only this tenant's (fleet-wide tokens)")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/fleet", get_fleet, "none", "Fleet name, root public key, log head",
          response="Fleet"),
    Route("POST", "/v1/fleet/rotate", rotate_root, "fleet.rotate",
          "Rotate the fleet root key (appends a root.rotate delta signed by both keys)",
          response="Rotation"),
    Route("GET", "/v1/deltas", list_deltas, "deltas.read", "Inspect the delta log, decoded",
          response="DeltaList", query=(_AFTER, _LIMIT)),
    Route("GET", "/v1/openapi.json", get_openapi, "none", "This document",
          response="Object"),
    Route("POST", "/v1/link/enroll", link_enroll, "enroll",
          "Bind a site's identity key with its single-use enrollment token",
          request="EnrollRequest", response="EnrollResponse"),
    Route("GET", "/v1/link/deltas", link_deltas, "site",
          "Long-poll for deltas after a version (the site's link)", response="LinkDeltas",
          query=(_AFTER, _LIMIT,
                 Query("wait", "number", "hold the request up to this many seconds (0-30)"))),
    Route("POST", "/v1/link/report", link_report, "site", "A site's report of its state",
          request="SiteReport", response="Head"),
    Route("GET", "/v1/link/gossip", link_gossip, "site",
          "The site's gossip certificate, the hub's gossip address and the peers' public "
          "addresses (404 gossip_disabled when the hub does not gossip)",
          response="GossipInfo"),
    Route("POST", "/v1/tokens", create_token, "tokens.create",
          "Create a token (its text is shown only in this answer); a tenant admin creates "
          "tokens of its tenant, none above its role", request="TokenRequest",
          response="NewToken", status=201),
    Route("GET", "/v1/tokens", list_tokens, "tokens.read",
          "List the tokens of the caller's tenant (fleet admin: all; no secrets)",
          response="TokenList", query=(_TENANT_FILTER,)),
    Route("DELETE", "/v1/tokens/{id}", delete_token, "tokens.delete", "Revoke a token",
          response="Deleted"),
    Route("POST", "/v1/tenants", create_tenant, "tenants.create", "Create a tenant",
          request="TenantRequest", response="Tenant", status=201),
    Route("GET", "/v1/tenants", list_tenants, "tenants.read",
          "Tenants (fleet-wide tokens: all; others: their own)", response="TenantList"),
    Route("GET", "/v1/tenants/{id}", get_tenant, "tenants.read", "One tenant",
          response="Tenant"),
    Route("DELETE", "/v1/tenants/{id}", delete_tenant, "tenants.delete",
          "Delete a tenant and revoke its tokens (409 tenant_in_use while it owns apps or "
          "secrets)", response="TenantDeleted"),
    Route("PUT", "/v1/tenants/{id}/quota", put_quota, "tenants.quota",
          "Set a tenant's quota at every site (null: unlimited); a tenant.quota delta",
          request="Quota", response="QuotaSet"),
    Route("GET", "/v1/tenants/{id}/quota", get_quota, "tenants.read", "A tenant's quota",
          response="QuotaSet"),
    Route("GET", "/v1/audit", get_audit, "audit.read",
          "The audit log after a sequence number (tenant admin: its tenant's entries)",
          response="AuditList",
          query=(Query("after", "integer", "only entries with a greater sequence number"),
                 Query("limit", "integer", "at most this many entries (1-500)"),
                 _TENANT_FILTER)),
    Route("POST", "/v1/sites", create_site, "sites.create",
          "Register a site (without public_key the answer has an enroll_token)",
          request="SiteRequest", response="NewSite", status=201),
    Route("GET", "/v1/sites", list_sites, "sites.read", "The fleet view: every site and its health",
          response="SiteList"),
    Route("GET", "/v1/sites/{id}", get_site, "sites.read",
          "One site with hosts, instances and rejections from its latest report (a tenant "
          "token sees the site's health and only its tenant's apps and instances)",
          response="SiteDetail"),
    Route("PUT", "/v1/sites/{id}/labels", put_site_labels, "sites.write",
          "Replace a site's labels (used by the next deployments)", request="Labels",
          response="SiteLabels"),
    Route("GET", "/v1/alerts", list_alerts, "alerts.read",
          "Alerts: active (site offline, lagging, app unhealthy, host disk/memory) and "
          "recently cleared", response="Alerts"),
    Route("POST", "/v1/alerts/{id}/ack", acknowledge_alert, "alerts.ack",
          "Acknowledge an active alert (it stays until its condition clears, hub restarts too)",
          response="Object"),
    Route("POST", "/v1/sites/{id}/decommission", decommission_site, "sites.delete",
          "Decommission a site (site.decommission delta): it stops every application, wipes "
          "its secrets and reports it; the hub then forgets the site", response="Object"),
    Route("DELETE", "/v1/sites/{id}", delete_site, "sites.delete", "Forget a site",
          response="Deleted"),
    Route("POST", "/v1/apps", create_app, "apps.write",
          "Deploy an application version with a placement policy (202 new, 200 repeated); "
          "tenant: the token's (a fleet-wide token may name one; default 'default')",
          request="AppRequest", response="Deployment", status=202),
    Route("GET", "/v1/apps", list_apps, "apps.read", "List the tenant's applications",
          response="AppList", query=(_TENANT_FILTER,)),
    Route("GET", "/v1/apps/{name}", get_app, "apps.read",
          "An application: spec, placement, current deployment, per-site status",
          response="AppDetail"),
    Route("DELETE", "/v1/apps/{name}", delete_app, "apps.delete",
          "Delete an application (app.delete delta to the sites that have it)",
          response="AppDeleted"),
    Route("GET", "/v1/deployments/{id}", get_deployment, "apps.read", "One deployment",
          response="Deployment"),
)  # fmt: skip

# The vault's routes (secrets, lock-down, escrow) are declared with their handlers.
from central_hub.vault_api import VAULT_ROUTES  # noqa: E402

ROUTES += VAULT_ROUTES

from central_hub.logs_api import LOGS_ROUTES  # noqa: E402

ROUTES += LOGS_ROUTES

from central_hub.releases import RELEASES_ROUTES  # noqa: E402

ROUTES += RELEASES_ROUTES
