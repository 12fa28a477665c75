"""Route declarations and the request helpers shared by the hub's HTTP route modules.

``Route`` and ``Query`` (``central_hub.contract``) declare a route: ``central_hub.api``
registers it and checks its query and body against the declaration before the handler
runs, ``central_hub.openapi`` documents the same declaration. The helpers read what a
guarded request carries (the hub, the caller's token or site, a size-limited body, the
checked query parameters) and answer JSON. The route modules (``central_hub.api``,
``vault_api``, ``logs_api``, ``releases``) import from here, never from each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from central_hub import authz, paging
from central_hub.contract import Query as Query  # re-exported: route modules declare with it
from central_hub.errors import ApiError
from central_hub.model import ID_PATTERN
from central_hub.tokens import TokenRecord

if TYPE_CHECKING:
    from central_hub.parts import HubParts

JSON = "application/json"
HUB_KEY: web.AppKey[HubParts] = web.AppKey("hub")
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("max_body_bytes", int)
TOKEN_KEY: web.RequestKey[TokenRecord] = web.RequestKey("token", TokenRecord)
SITE_KEY: web.RequestKey[str] = web.RequestKey("site", str)
# The public key (hex) a site request was verified with.
SIGNER_KEY: web.RequestKey[str] = web.RequestKey("site_signer", str)
# The route's declared query parameters present in the request, converted and checked.
QUERY_KEY: web.RequestKey[dict[str, object]] = web.RequestKey("query", dict)
BODY_KEY: web.RequestKey[object] = web.RequestKey("json_body", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = str  # "none", "site", "enroll", or an action of authz.POLICY


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: Auth
    summary: str
    request: str | None = None  # a schema name of openapi.SCHEMAS: the body, checked
    response: str = "Empty"
    status: int = 200
    query: tuple[Query, ...] = ()
    path_params: tuple[Query, ...] = ()  # those not declared are any string
    also: tuple[int, ...] = ()  # other success statuses, with the same response schema
    errors: tuple[int, ...] = ()  # error statuses beyond those of its auth scheme
    max_body: int = 0  # bytes; 0: the hub's --max-body
    # A GET that changes state (the report stream): its site signature is held to what a
    # POST's is (never a replayable one), like every method but GET.
    writes_on_get: bool = False

    @property
    def changes(self) -> bool:
        return self.method != "GET" or self.writes_on_get


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_response(
    status: int,
    code: str,
    message: str,
    problems: list[str] | None = None,
    details: dict[str, Any] | None = None,
) -> web.Response:
    return json_response(error_body(code, message, problems, details), status)


def error_body(
    code: str,
    message: str,
    problems: list[str] | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"error": {"code": ..., "message": ...}}``, as every error is answered."""
    error: dict[str, Any] = {"code": code, "message": message}
    if problems:
        error["problems"] = problems
    if details is not None:
        error["details"] = dict(details)
    return {"error": error}


def hub_of(request: web.Request) -> HubParts:
    """The parts of the hub serving the request."""
    return request.app[HUB_KEY]


def token_of(request: web.Request) -> TokenRecord:
    """The caller's token (routes guarded by an action)."""
    return request[TOKEN_KEY]


def site_of(request: web.Request) -> str:
    """The calling site (routes guarded by ``site``)."""
    return request[SITE_KEY]


def signer_of(request: web.Request) -> str:
    """The public key a ``site`` route's request was verified with."""
    return request[SIGNER_KEY]


async def read(request: web.Request, max_bytes: int = 0) -> bytes:
    """The body, at most ``max_bytes`` or else the app's ``MAX_BODY_KEY`` bytes (413
    ``body_too_large``)."""
    limit = request.app[MAX_BODY_KEY]
    if max_bytes:
        limit = min(limit, max_bytes)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"bodies are limited to {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"bodies are limited to {limit} bytes") from None
    if len(body) > limit:  # sent without a length
        raise ApiError(413, "body_too_large", f"bodies are limited to {limit} bytes")
    return body


async def read_json(request: web.Request, max_bytes: int = 0) -> object:
    """The body parsed as JSON (400 ``bad_json``); parsed once per request, so checking
    it against the route's contract and handling it read it once."""
    if BODY_KEY in request:
        return request[BODY_KEY]
    body = await read(request, max_bytes)
    try:
        data: object = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    request[BODY_KEY] = data
    return data


async def read_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The body: a JSON object with no field outside ``allowed`` (400
    ``field_not_allowed`` naming the others: mass assignment is refused)."""
    return authz.only_fields(await read_json(request), allowed, "this request")


def query_value(request: web.Request, name: str, default: object = None) -> Any:
    """The route's declared query parameter ``name``, checked against its declaration
    before the handler ran (``default`` when the request did not give it)."""
    return request[QUERY_KEY].get(name, default)


@dataclass(frozen=True, slots=True)
class PageQuery:
    """``limit``, ``cursor`` and ``selector`` of a paginated list route
    (``central_hub.paging``), read for the caller's token."""

    listing: str
    tenant: str  # the caller's token's: a cursor is good for its tenant only
    key: bytes
    after: str | None
    limit: int
    selector: paging.Selector

    def next_cursor(self, last: str | None) -> str | None:
        """The answer's ``next_cursor`` (None on the last page)."""
        return (
            None if last is None else paging.make_cursor(self.key, self.listing, self.tenant, last)
        )


def page_query(request: web.Request, listing: str, *, selector: bool = False) -> PageQuery:
    """The page asked for (400 ``bad_limit``, ``bad_cursor``, ``bad_selector``); a
    ``selector`` on a listing without labels is refused."""
    tenant = token_of(request).tenant
    key = paging.cursor_key(hub_of(request).vault.keys.master)
    raw_selector = query_value(request, "selector")
    if "selector" in request.query and not selector:  # a listing that did not declare it
        raise ApiError(400, "bad_selector", f"{listing} have no labels to select by")
    return PageQuery(
        listing,
        tenant,
        key,
        paging.read_cursor(key, query_value(request, "cursor"), listing, tenant),
        query_value(request, "limit", paging.DEFAULT_LIMIT),
        paging.parse_selector(raw_selector),
    )


PAGE_QUERIES = (
    Query(
        "limit",
        "integer",
        f"at most this many items (1-{paging.MAX_LIMIT}, default {paging.DEFAULT_LIMIT}); a "
        "filtered page may hold fewer while more follow",
        minimum=1,
        maximum=paging.MAX_LIMIT,
    ),
    Query(
        "cursor",
        "string",
        "the next_cursor of the previous page (opaque; good for this listing and the "
        "caller's tenant only: 400 bad_cursor otherwise)",
        pattern=paging.CURSOR_PATTERN,
        max_length=paging.MAX_CURSOR_CHARS,
    ),
)
CONFIRM_QUERY = Query(
    "confirm",
    "integer",
    "the number of sites the change touches, typed by the operator after a 409 "
    "confirmation_required listed what it would stop (docs/interlock.md); one that does "
    "not match is refused (409 confirmation_mismatch)",
    minimum=1,
    maximum=10_000_000,
)
SELECTOR_QUERY = Query(
    "selector",
    "string",
    "label selector: key=value, key!=value, key (has the label) or !key, comma-separated, "
    "all must hold",
    pattern=paging.SELECTOR_PATTERN,
    max_length=paging.MAX_SELECTOR_CHARS,
)
SITE_ID_PATH = Query(
    "id",
    "string",
    "the site's id",
    pattern=ID_PATTERN,
    error="bad_site_id",
)
TENANT_QUERY = Query(
    "tenant",
    "string",
    "only this tenant's (fleet-wide tokens)",
    pattern=ID_PATTERN,
    error="bad_tenant",
)
