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

Refused token requests are audited (``GET /v1/audit``): a 403 (or a 401 of a recognised
token) one entry each; a failed authentication is counted per source address and sampled
into the log, and rate-limited per source (429 with ``Retry-After``):
``central_hub.authguard``. It writes nothing itself, so a flood of bad tokens costs the
hub no fsync each.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from central_hub import authz, holds, openapi, siteviews, tenancy, tokens
from central_hub.audit import CALLER
from central_hub.contract import BodyContract, QueryContract
from central_hub.dashboard import add_dashboard
from central_hub.deltas_api import DELTAS_ROUTES
from central_hub.errors import ApiError, InputProblems
from central_hub.fleetview import parse_report
from central_hub.logs_api import LOGS_ROUTES
from central_hub.metrics import HubCollector
from central_hub.model import (
    validate_labels,
    validate_public_key,
    validate_site_id,
    validate_tenant,
)
from central_hub.placement import parse_policy
from central_hub.releases import RELEASES_ROUTES
from central_hub.replay import NonceCache, admit
from central_hub.report_stream import STREAM_PATH, Answer, Streams, enrolled_with
from central_hub.routing import (
    CONFIRM_QUERY,
    HUB_KEY,
    MAX_BODY_KEY,
    PAGE_QUERIES,
    QUERY_KEY,
    SELECTOR_QUERY,
    SIGNER_KEY,
    SITE_KEY,
    TENANT_QUERY,
    TOKEN_KEY,
    Handler,
    Query,
    Route,
    error_body,
    error_response,
    hub_of,
    json_response,
    page_query,
    query_value,
    read,
    read_json,
    read_object,
    signer_of,
    site_of,
    token_of,
)
from central_hub.tokens import TokenRecord
from central_hub.trends_api import TRENDS_ROUTES
from central_hub.vault import parse_report_secrets
from central_hub.vault_api import VAULT_ROUTES
from meshorch import http_metrics
from meshorch.apps.spec import SpecError, parse_app_spec, spec_digest
from meshorch.errors import RemoteInputError
from meshorch.fleet.delta import DeltaRejected, parse
from meshorch.fleet.link_auth import (
    MAX_CLOCK_SKEW_S,
    LinkAuthError,
    claimed_site,
    is_legacy,
    verify_request,
)
from meshorch.fleet.sitekey import MAX_ROTATION_BODY, RotationRefused, check_rotation
from meshorch.promtext import Registry

if TYPE_CHECKING:
    from central_hub.parts import HubParts

logger = logging.getLogger(__name__)

SCHEMES = ("none", "site", "enroll")
MAX_LINK_LIMIT = 500
# The request line's bytes: room for every declared query parameter at its longest, even
# percent-encoded (contract.MAX_QUERY_VALUE and the routes' own maxima).
MAX_REQUEST_LINE = 65536
DEFAULT_WAIT_S = 25.0
MAX_WAIT_S = 30.0
NONCES_KEY = web.AppKey("nonces", NonceCache)
# Whether format 1 site signatures (agents before nonces, replayable) are accepted on the
# link's GET routes: the deprecation window of docs/fleet-link.md. Never on other routes.
LEGACY_SIGNATURES_KEY = web.AppKey("legacy_signatures", bool)
STREAMS_KEY = web.AppKey("report_streams", Streams)
REPORT_CONTRACT_KEY = web.AppKey("report_contract", BodyContract)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, details=exc.details)
        response.headers.update(exc.headers)
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
        response = error_response(exc.status, code, exc.text or exc.reason)
        if "Allow" in exc.headers:  # a 405 says which methods the path has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error, see the hub log")


def build_app(
    hub: HubParts,
    max_body_bytes: int,
    legacy_signatures: bool = True,
    nonces: NonceCache | None = None,
) -> web.Application:
    """The hub's application; ``nonces``: the replay cache (a replica keeps one across
    its terms as leader, ``central_hub.replica``)."""
    app = web.Application(
        middlewares=[errors_middleware],
        client_max_size=max_body_bytes,
        handler_args={"max_line_size": MAX_REQUEST_LINE},
    )
    app[HUB_KEY] = hub
    app[MAX_BODY_KEY] = max_body_bytes
    # Requests signed before the cache began could have been taken by an earlier run.
    app[NONCES_KEY] = NonceCache(started_at=hub.ledger.now()) if nonces is None else nonces
    app[LEGACY_SIGNATURES_KEY] = legacy_signatures
    streams = app[STREAMS_KEY] = Streams()
    app[REPORT_CONTRACT_KEY] = BodyContract("SiteReport", openapi.SCHEMAS)

    async def close_streams(_app: web.Application) -> None:
        await streams.close_all()

    app.on_shutdown.append(close_streams)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guarded(route))
    add_dashboard(app)  # the web UI (not part of the API: not in ROUTES)
    registry = Registry()
    registry.register(HubCollector(hub))
    http_metrics.install(app, registry, "meshorch_hub")  # GET /metrics, latency by route
    return app


# -- guards ----------------------------------------------------------------------------


def _guarded(route: Route) -> Handler:
    """The route's handler behind its auth scheme, then its declared contract: a caller
    who may not call the route is refused before its input is even looked at, and the
    handler runs only on input the OpenAPI document allows."""
    action = None if route.auth in SCHEMES else authz.action_of(route.auth)
    checked = _checked(route)

    async def handler(request: web.Request) -> web.StreamResponse:
        hub = hub_of(request)
        if action is not None:
            return await _with_token(hub, request, route.path, checked, action)
        if route.auth == "site":
            body = await read(request, route.max_body)
            request[SITE_KEY] = _verify_site(hub, request, body, changes=route.changes)
        reset = CALLER.set((None, "sites.enroll") if route.auth == "enroll" else None)
        try:
            return await checked(request)
        finally:
            CALLER.reset(reset)

    return handler


def _checked(route: Route) -> Handler:
    """``route.handler`` after the request's query and body are checked against the
    route's declaration (400 naming the field)."""
    queries = QueryContract(route.query)
    path_params = QueryContract(route.path_params)
    body = None if route.request is None else BodyContract(route.request, openapi.SCHEMAS)

    async def handler(request: web.Request) -> web.StreamResponse:
        repeated = [name for name in set(request.query) if len(request.query.getall(name)) > 1]
        request[QUERY_KEY] = queries.parse(request.query, repeated)
        path_params.parse(request.match_info, ())
        if body is not None:
            body.check(await read_json(request, route.max_body))
        return await route.handler(request)

    return handler


async def _with_token(
    hub: HubParts, request: web.Request, path: str, handler: Handler, action: str
) -> web.StreamResponse:
    token: TokenRecord | None = None
    reset = CALLER.set(None)
    try:
        try:
            token = hub.accounts.authenticate(request.headers.get("Authorization"))
        except ApiError as exc:  # counted and sampled, never one audit write each
            what = f"{request.method} {request.path}"
            raise hub.accounts.failures.refused(request.remote, action, what, exc) from None
        CALLER.set((token, action))
        tokens.authorize(token, action)
        request[TOKEN_KEY] = token
        return await handler(request)
    except ApiError as exc:
        if token is not None and exc.status in (401, 403):
            tenant = token.tenant
            detail = f"{request.method} {request.path}: {exc.code}"
            outcome = f"refused {exc.status}"
            refusal = hub.ledger.audit(token, action, tenant, "request", path, outcome, detail)
            if refusal is not None:
                with contextlib.suppress(ApiError):  # the hub is stopping
                    await refusal
        raise
    finally:
        CALLER.reset(reset)


def _verify_site(hub: HubParts, request: web.Request, body: bytes, *, changes: bool) -> str:
    """The site, its signature checked (the key it was checked with kept on the request,
    ``signer_of``) and its nonce never seen before; 401 otherwise. A request that
    ``changes`` state is never accepted with a replayable signature."""
    now = hub.ledger.now()
    try:
        site = claimed_site(request.headers)
        key = hub.sites.site_public_key(site)
        if key is None:
            raise LinkAuthError(f"site {site[:64]!r} is unknown or not enrolled")
        signed_at, nonce = verify_request(
            key, request.headers, request.method, request.host, request.raw_path, body, now
        )
    except LinkAuthError as exc:
        raise ApiError(401, "bad_site_signature", str(exc)) from None
    if is_legacy(request.headers):
        if changes or not request.app[LEGACY_SIGNATURES_KEY]:
            raise ApiError(
                401,
                "signature_outdated",
                f"site {site!r} signs without a nonce (an agent older than the hub): the "
                f"hub accepts that only on GET link routes during the deprecation window, "
                f"never on {request.method} {request.path}; upgrade the site's agents",
            )
        _warn_legacy(site)
    else:
        admit(request.app[NONCES_KEY], site, nonce, signed_at, now, changes=changes)
    request[SIGNER_KEY] = key
    return site


_LEGACY_WARNED: set[str] = set()


def _warn_legacy(site: str) -> None:
    if site not in _LEGACY_WARNED and len(_LEGACY_WARNED) < 100_000:
        _LEGACY_WARNED.add(site)
        logger.warning(
            "site %s signs link requests without a nonce (an old agent): accepted on GET "
            "link routes only until it upgrades",
            site,
        )


# -- fleet and deltas ------------------------------------------------------------------


async def get_fleet(request: web.Request) -> web.Response:
    return json_response(hub_of(request).ledger.fleet_info())


async def rotate_root(request: web.Request) -> web.Response:
    return json_response(await hub_of(request).ledger.rotate_root())


async def list_deltas(request: web.Request) -> web.Response:
    hub = hub_of(request)
    after = query_value(request, "after", 0)
    limit = query_value(request, "limit", 100)
    found = []
    for version, envelope in hub.ledger.deltas_after(after, limit):
        try:
            delta, _, sigs = parse(envelope)
        except DeltaRejected as exc:  # never stored by the hub; say so rather than fail
            found.append({"version": version, "error": str(exc)})
            continue
        found.append(
            {
                "version": delta.version,
                "format": delta.format,
                "digest": delta.digest,
                "prev": delta.prev,
                "issued_at": delta.issued_at,
                "expires_at": delta.expires_at,
                "target": delta.target.describe(),
                "ops": [dict(op) for op in delta.ops],
                "signed_by": [key for key, _ in sigs],
            }
        )
    return json_response(
        {
            "head": hub.ledger.head.version,
            "deltas": found,
            "delta_format": hub.delta_format.status_json(),
        }
    )


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi.document(ROUTES))


# -- the site link ---------------------------------------------------------------------


async def link_enroll(request: web.Request) -> web.Response:
    data = await read_object(request, {"site", "public_key", "token"})
    site = validate_site_id(data.get("site"))
    key = validate_public_key(data.get("public_key"))
    token = data.get("token")
    if not isinstance(token, str):
        raise ApiError(403, "bad_enroll_token", "token is the site's enrollment token")
    await hub_of(request).sites.enroll(site, key, token)
    return json_response({"site": site})


async def link_deltas(request: web.Request) -> web.Response:
    after = query_value(request, "after", 0)
    wait_s = float(query_value(request, "wait", DEFAULT_WAIT_S))
    limit = query_value(request, "limit", MAX_LINK_LIMIT)
    hub = hub_of(request)
    site = site_of(request)
    if hub.site_facts.is_held(site):
        return json_response(await holds.held_poll(hub.ledger, site, after, wait_s))
    hub.snapshots.require_deltas_after(after)
    if hub.delta_format.site_ready(site):  # waits for this site's deltas only
        head, envelopes = await hub.ledger.wait_for_site(site, after, wait_s, limit)
    else:
        head, envelopes = await hub.ledger.wait_for_deltas(after, wait_s, limit, site)
    if hub.site_facts.is_held(site):  # held while the poll waited
        return json_response(holds.held_answer(after))
    return json_response(siteviews.answer(head, envelopes))


async def link_snapshot(request: web.Request) -> web.Response:
    """The calling site's snapshot (its signature says which site: no other's can be
    asked for), with the root rotations after ``after``."""
    after = query_value(request, "after", 0)
    return json_response(hub_of(request).snapshots.snapshot(site_of(request), after))


async def link_gossip(request: web.Request) -> web.Response:
    return json_response(hub_of(request).sites.gossip_info(site_of(request)))


async def link_report(request: web.Request) -> web.Response:
    return json_response(
        await _take_report(hub_of(request), site_of(request), await read_json(request))
    )


async def _take_report(hub: HubParts, site: str, data: object) -> dict[str, Any]:
    """Keep ``site``'s report ``data`` (checked against the route's contract); its answer."""
    report = parse_report(data, site)
    report.update(parse_report_secrets(data))  # the secrets part (central_hub.vault)
    head = await hub.sites.record_report(site, report)
    if hub.site_facts.is_held(site):
        return holds.held_report_answer(report)
    if not hub.delta_format.site_ready(site):
        return {"head": head}
    # The newest version for this site: its poll is answered at once only for those.
    return {"head": head, "site_head": hub.ledger.site_head(site)}


async def link_report_stream(request: web.Request) -> web.StreamResponse:
    """The site's reports on one WebSocket (``central_hub.report_stream``): its upgrade was
    signed and checked like any link request; each message answered as ``link_report``."""
    hub, site, key = hub_of(request), site_of(request), signer_of(request)
    contract = request.app[REPORT_CONTRACT_KEY]

    async def handle(body: bytes) -> Answer:
        try:
            data = orjson.loads(body)
            contract.check(data)
            return 200, await _take_report(hub, site, data)
        except orjson.JSONDecodeError as exc:
            return 400, error_body("bad_json", f"the body is not JSON: {exc}")
        except InputProblems as exc:
            return 400, error_body(exc.code, str(exc), exc.problems)
        except RemoteInputError as exc:
            return 400, error_body(exc.code, str(exc))
        except ApiError as exc:
            return exc.status, error_body(exc.code, exc.message, details=exc.details)
        except Exception:  # as errors_middleware answers it: the stream stays open
            logger.exception("unhandled error in a report on %s's stream", site)
            return 500, error_body("internal", "internal error, see the hub log")

    return await request.app[STREAMS_KEY].serve(
        request,
        site,
        enrolled_with(hub.ledger.store, site, key),
        handle,
        request.app[MAX_BODY_KEY],
    )


async def link_key(request: web.Request) -> web.Response:
    """Move the calling site to a new key: signed by its current key (the guard), the body
    proves possession of the new one (``meshorch.fleet.sitekey``). Checked before any write."""
    hub, site = hub_of(request), site_of(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "bad_key_rotation", "the body is a JSON object")
    try:
        new_key = check_rotation(site, data, hub.ledger.now(), MAX_CLOCK_SKEW_S)
    except RotationRefused as exc:
        raise ApiError(400, "bad_key_rotation", str(exc)) from None
    return json_response(await hub.sites.rotate_key(site, signer_of(request), new_key))


# -- tokens ----------------------------------------------------------------------------


async def create_token(request: web.Request) -> web.Response:
    caller = token_of(request)
    wanted = tokens.parse_token_request(await read_json(request), caller)
    text, record = await hub_of(request).accounts.create_token(caller, wanted)
    return json_response({"token": text, **record.public_json()}, 201)


async def list_tokens(request: web.Request) -> web.Response:
    page = page_query(request, "tokens")
    found, last = hub_of(request).accounts.page_tokens(
        token_of(request), query_value(request, "tenant"), page.after, page.limit
    )
    tokens_json = [t.public_json() for t in found]
    return json_response({"tokens": tokens_json, "next_cursor": page.next_cursor(last)})


async def delete_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    below = await hub_of(request).accounts.delete_token(token_of(request), token_id)
    return json_response({"deleted": token_id, "revoked_descendants": below})


# -- tenants and the audit log -----------------------------------------------------------


async def create_tenant(request: web.Request) -> web.Response:
    tenant_id, description = tenancy.parse_tenant_request(await read_json(request))
    return json_response(
        await hub_of(request).accounts.create_tenant(token_of(request), tenant_id, description), 201
    )


async def list_tenants(request: web.Request) -> web.Response:
    page = page_query(request, "tenants")
    found, last = hub_of(request).accounts.page_tenants(token_of(request), page.after, page.limit)
    return json_response({"tenants": found, "next_cursor": page.next_cursor(last)})


async def get_tenant(request: web.Request) -> web.Response:
    return json_response(
        hub_of(request).accounts.get_tenant(token_of(request), request.match_info["id"])
    )


async def delete_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["id"]
    return json_response(await hub_of(request).accounts.delete_tenant(token_of(request), tenant_id))


async def put_quota(request: web.Request) -> web.Response:
    quota = tenancy.parse_quota_request(await read_json(request))
    tenant_id = request.match_info["id"]
    return json_response(
        await hub_of(request).accounts.set_quota(token_of(request), tenant_id, quota)
    )


async def get_quota(request: web.Request) -> web.Response:
    return json_response(
        hub_of(request).accounts.get_quota(token_of(request), request.match_info["id"])
    )


async def get_audit(request: web.Request) -> web.Response:
    after, limit = query_value(request, "after", 0), query_value(request, "limit", 100)
    hub, token = hub_of(request), token_of(request)
    tenant = query_value(request, "tenant")
    return json_response(hub.ledger.read_audit(token, after, limit, tenant))


# -- sites -----------------------------------------------------------------------------


async def create_site(request: web.Request) -> web.Response:
    data = await read_object(request, {"id", "labels", "public_key"})
    site = validate_site_id(data.get("id"))
    labels = validate_labels(data.get("labels", {}))
    raw_key = data.get("public_key")
    key = None if raw_key is None else validate_public_key(raw_key)
    return json_response(await hub_of(request).sites.register_site(site, labels, key), 201)


async def list_sites(request: web.Request) -> web.Response:
    page = page_query(request, "sites", selector=True)
    found, last = hub_of(request).sites.page_sites(
        token_of(request), page.after, page.limit, page.selector
    )
    return json_response({"sites": found, "next_cursor": page.next_cursor(last)})


async def get_site(request: web.Request) -> web.Response:
    return json_response(
        hub_of(request).sites.get_site(token_of(request), request.match_info["id"])
    )


async def put_site_labels(request: web.Request) -> web.Response:
    labels = validate_labels(await read_json(request))
    site = request.match_info["id"]
    return json_response(await hub_of(request).sites.set_site_labels(site, labels))


async def put_site_key(request: web.Request) -> web.Response:
    data = await read_object(request, {"public_key"})
    key = validate_public_key(data.get("public_key"))
    return json_response(await hub_of(request).sites.set_key(request.match_info["id"], key))


async def list_alerts(request: web.Request) -> web.Response:
    return json_response({"alerts": hub_of(request).alerting.list_alerts(token_of(request))})


async def acknowledge_alert(request: web.Request) -> web.Response:
    await read(request)  # no body expected; a body is ignored
    answer = await hub_of(request).alerting.acknowledge_alert(
        token_of(request), request.match_info["id"]
    )
    return json_response(answer)


async def decommission_site(request: web.Request) -> web.Response:
    site = request.match_info["id"]
    confirm = query_value(request, "confirm")
    return json_response(
        await hub_of(request).sites.decommission_site(token_of(request), site, confirm)
    )


async def delete_site(request: web.Request) -> web.Response:
    site = request.match_info["id"]
    await hub_of(request).sites.delete_site(site)
    return json_response({"deleted": site})


# -- apps and deployments --------------------------------------------------------------


async def create_app(request: web.Request) -> web.Response:
    data = await read_object(request, {"spec", "placement", "tenant"})
    raw = data.get("spec")
    if isinstance(raw, dict):
        text: str | bytes = orjson.dumps(raw)
    elif isinstance(raw, str):
        text = raw
    else:
        raise ApiError(400, "bad_spec", "spec is an application spec: an object or YAML text")
    chosen = data.get("tenant")
    deployments = hub_of(request).deployments
    # Whose app it is first: a secret reference without a tenant is the app's tenant's.
    tenant = deployments.owner(
        token_of(request), None if chosen is None else validate_tenant(chosen)
    )
    spec = parse_app_spec(text, tenant=tenant)
    policy = parse_policy(data.get("placement"))
    status, deployment = await deployments.deploy(
        token_of(request), spec, spec_digest(spec), policy, tenant, query_value(request, "confirm")
    )
    return json_response(deployment, status)


async def list_apps(request: web.Request) -> web.Response:
    page = page_query(request, "apps")
    found, last = hub_of(request).deployments.page_apps(
        token_of(request), query_value(request, "tenant"), page.after, page.limit
    )
    return json_response({"apps": found, "next_cursor": page.next_cursor(last)})


async def get_app(request: web.Request) -> web.Response:
    return json_response(
        hub_of(request).deployments.get_app(token_of(request), request.match_info["name"])
    )


async def delete_app(request: web.Request) -> web.Response:
    name, confirm = request.match_info["name"], query_value(request, "confirm")
    return json_response(
        await hub_of(request).deployments.delete_app(token_of(request), name, confirm)
    )


async def get_deployment(request: web.Request) -> web.Response:
    deployment_id = request.match_info["id"]
    return json_response(
        hub_of(request).deployments.get_deployment(token_of(request), deployment_id)
    )


MAX_VERSION = 2**63
_AFTER = Query(
    "after",
    "integer",
    "only deltas with a version greater than this",
    minimum=0,
    maximum=MAX_VERSION,
)
_LIMIT = Query(
    "limit",
    "integer",
    f"at most this many deltas (1-{MAX_LINK_LIMIT})",
    minimum=1,
    maximum=MAX_LINK_LIMIT,
)
_TENANT_FILTER = TENANT_QUERY

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
                 Query("wait", "number", "hold the request up to this many seconds (0-30)",
                       minimum=0, maximum=MAX_WAIT_S))),
    Route("GET", "/v1/link/snapshot", link_snapshot, "site",
          "The calling site's desired state at the head, signed by the fleet root key, and "
          "the root.rotate deltas after the version it applied (docs/fleet-link.md)",
          response="LinkSnapshot",
          query=(Query("after", "integer", "the version the site applied: root rotations "
                       "after it come with the snapshot", minimum=0, maximum=MAX_VERSION),)),
    Route("POST", "/v1/link/report", link_report, "site", "A site's report of its state",
          request="SiteReport", response="Head"),
    Route("GET", STREAM_PATH, link_report_stream, "site",
          "The site's reports on one WebSocket, signed once at the upgrade: each message a "
          "SiteReport, each answered with one message {status, body}, body as POST "
          "/v1/link/report answers (426 upgrade_required without the upgrade; "
          "docs/fleet-link.md)", response="Empty", status=101, errors=(426,),
          writes_on_get=True),
    Route("POST", "/v1/link/key", link_key, "site",
          "Move the site to a new identity key: signed by the current key, with the new "
          "key's proof; the old key is refused from then on (409 key_reused for a key the "
          "site had before)", request="KeyRotation", response="KeyRotated",
          max_body=MAX_ROTATION_BODY),
    Route("GET", "/v1/link/gossip", link_gossip, "site",
          "The site's gossip certificate, the hub's gossip address and the peers' public "
          "addresses (404 gossip_disabled when the hub does not gossip)",
          response="GossipInfo"),
    Route("POST", "/v1/tokens", create_token, "tokens.create",
          "Create a token (its text is shown only in this answer), a child of the calling "
          "token: a tenant admin creates tokens of its tenant, none above its role; an "
          "expiry past the caller's (or none) is capped to the caller's expiry; at most "
          "8 tokens below a root (400 token_chain_too_deep)", request="TokenRequest",
          response="NewToken", status=201),
    Route("GET", "/v1/tokens", list_tokens, "tokens.read",
          "List the tokens of the caller's tenant (fleet admin: all; no secrets)",
          response="TokenList", query=(_TENANT_FILTER, *PAGE_QUERIES)),
    Route("DELETE", "/v1/tokens/{id}", delete_token, "tokens.delete",
          "Revoke a token and every token created below it (one transaction)",
          response="TokenRevoked"),
    Route("POST", "/v1/tenants", create_tenant, "tenants.create", "Create a tenant",
          request="TenantRequest", response="Tenant", status=201),
    Route("GET", "/v1/tenants", list_tenants, "tenants.read",
          "Tenants (fleet-wide tokens: all; others: their own); paginated",
          response="TenantList", query=PAGE_QUERIES),
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
          query=(Query("after", "integer", "only entries with a greater sequence number",
                       minimum=0, maximum=MAX_VERSION),
                 Query("limit", "integer", f"at most this many entries (1-{MAX_LINK_LIMIT})",
                       minimum=1, maximum=MAX_LINK_LIMIT),
                 _TENANT_FILTER)),
    Route("POST", "/v1/sites", create_site, "sites.create",
          "Register a site (without public_key the answer has an enroll_token)",
          request="SiteRequest", response="NewSite", status=201),
    Route("GET", "/v1/sites", list_sites, "sites.read",
          "The fleet view: sites and their health, in id order, paginated (follow "
          "next_cursor) and filtered by labels (selector)",
          response="SiteList", query=(*PAGE_QUERIES, SELECTOR_QUERY)),
    Route("GET", "/v1/sites/{id}", get_site, "sites.read",
          "One site with hosts, instances and rejections from its latest report (a tenant "
          "token sees the site's health and only its tenant's apps and instances)",
          response="SiteDetail"),
    Route("PUT", "/v1/sites/{id}/labels", put_site_labels, "sites.write",
          "Replace a site's labels (used by the next deployments)", request="Labels",
          response="SiteLabels"),
    Route("PUT", "/v1/sites/{id}/key", put_site_key, "sites.create",
          "Bind a site's identity key (a site locked out by a rotation it did not make: "
          "bind the key its `meshorch fleet status` shows pending); keys it had are refused",
          request="SiteKey", response="KeyRotated"),
    Route("GET", "/v1/alerts", list_alerts, "alerts.read",
          "Alerts: active (site offline, lagging, app unhealthy, host disk/memory) and "
          "recently cleared", response="Alerts"),
    Route("POST", "/v1/alerts/{id}/ack", acknowledge_alert, "alerts.ack",
          "Acknowledge an active alert (it stays until its condition clears, hub restarts too)",
          response="Object"),
    Route("POST", "/v1/sites/{id}/decommission", decommission_site, "sites.delete",
          "Decommission a site (site.decommission delta): it stops every application, wipes "
          "its secrets and reports it; the hub then forgets the site. Refused (409) unless "
          "confirmed when it stops an application at too many of its sites",
          response="Object", query=(CONFIRM_QUERY,)),
    Route("DELETE", "/v1/sites/{id}", delete_site, "sites.delete", "Forget a site",
          response="Deleted"),
    Route("POST", "/v1/apps", create_app, "apps.write",
          "Deploy an application version with a placement policy (202 new, 200 repeated); "
          "tenant: the token's (a fleet-wide token may name one; default 'default'). A "
          "placement that removes it from too many sites is refused (409) unless confirmed",
          request="AppRequest", response="Deployment", status=202, also=(200,),
          query=(CONFIRM_QUERY,)),
    Route("GET", "/v1/apps", list_apps, "apps.read",
          "List the tenant's applications, in name order, paginated",
          response="AppList", query=(_TENANT_FILTER, *PAGE_QUERIES)),
    Route("GET", "/v1/apps/{name}", get_app, "apps.read",
          "An application: spec, placement, current deployment, per-site status",
          response="AppDetail"),
    Route("DELETE", "/v1/apps/{name}", delete_app, "apps.delete",
          "Delete an application (app.delete delta to the sites that have it); refused "
          "(409) unless confirmed when it stops at too many sites or empties a site",
          response="AppDeleted", query=(CONFIRM_QUERY,)),
    Route("GET", "/v1/deployments/{id}", get_deployment, "apps.read", "One deployment",
          response="Deployment"),
)  # fmt: skip

# The vault's, the logs' and the releases' routes are declared with their handlers.
ROUTES += VAULT_ROUTES + LOGS_ROUTES + RELEASES_ROUTES + DELTAS_ROUTES
ROUTES += TRENDS_ROUTES
