"""Who may call each route of the agent: one table, one decision (pure).

Every route is on one surface:

    open      anyone: liveness (``GET /v1/ping``), and ``GET /v1/status`` answers anyone
              with readiness alone (the upgrade launcher's health check); the rest of the
              status needs a token, the socket or a peer
    join      hosts that are not members yet: ``POST /v1/join`` (the token's proof is the
              authentication) and ``POST /v1/revoked`` (a notice signed by the site identity)
    peer      the other hosts of the site, each request signed by the sending host's peer key
              (``meshorch.state.peer_auth``): image blobs, release wheels, unseal requests
              (for the signer's own key only), a rekey's new unseal key, leadership hand-over
    operator  people and tools: the root-only Unix socket (full access), or an access token
              (``Authorization: Bearer moat1...``) whose role allows the route's action

Roles and actions (``policy_rows()`` prints the table; README "Security" has it too)::

    action           admin  operator  viewer   tenant tokens
    site.read        yes    yes       yes      -
    site.admin       yes    -         -        -
    members.write    yes    -         -        -
    kv.read          yes    yes       yes      -
    kv.write         yes    yes       -        -
    apps.read        yes    yes       yes      their tenant's (?tenant= theirs)
    apps.write       yes    yes       -        their tenant's (?tenant= theirs)
    images.read      yes    yes       yes      -
    images.write     yes    yes       -        -
    quotas.write     yes    -         -        -
    streams.read     yes    yes       yes      their tenant's streams
    streams.write    yes    yes       -        their tenant's streams
    secrets.read     yes    yes       yes      -
    secrets.admin    yes    -         -        -
    fleet.read       yes    yes       yes      -
    fleet.write      yes    -         -        -        (link, relayed deltas, key rotation)
    tokens.admin     yes    -         -        -

A token of one tenant reaches only that tenant's apps and streams, and only with the tenant
named in the request (``?tenant=``, or the stream's path): everything else is site-wide.
Unknown routes are refused: a route without a rule is a bug the tests catch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Surface = Literal["open", "join", "peer", "operator"]
Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")


@dataclass(frozen=True, slots=True)
class Rule:
    surface: Surface
    action: str = ""  # operator routes: the action a role must allow
    tenant_from: Literal["", "query", "path"] = ""  # where a tenant token's tenant must be


_READ: frozenset[Role] = frozenset(ROLES)
_WRITE: frozenset[Role] = frozenset({"operator", "admin"})
_ADMIN: frozenset[Role] = frozenset({"admin"})

ACTIONS: dict[str, frozenset[Role]] = {
    "site.read": _READ,
    "site.admin": _ADMIN,
    "members.write": _ADMIN,
    "kv.read": _READ,
    "kv.write": _WRITE,
    "apps.read": _READ,
    "apps.write": _WRITE,
    "images.read": _READ,
    "images.write": _WRITE,
    "quotas.write": _ADMIN,
    "streams.read": _READ,
    "streams.write": _WRITE,
    "secrets.read": _READ,
    "secrets.admin": _ADMIN,
    "fleet.read": _READ,
    "fleet.write": _ADMIN,
    "tokens.admin": _ADMIN,
}
# What a token of one tenant may do at all (with its own tenant in the request).
TENANT_ACTIONS = frozenset({"apps.read", "apps.write", "streams.read", "streams.write"})

_STREAM = "/v1/streams/{tenant}/{app}/{name}"


def _op(action: str, tenant_from: Literal["", "query", "path"] = "") -> Rule:
    return Rule("operator", action, tenant_from)


RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/ping"): Rule("open"),
    ("GET", "/v1/status"): Rule("open"),  # readiness for anyone; details need more
    ("POST", "/v1/join"): Rule("join"),
    ("POST", "/v1/revoked"): Rule("join"),
    ("GET", "/v1/images/blobs/{digest}"): Rule("peer"),
    ("GET", "/v1/images/partials/{digest}"): Rule("peer"),
    ("GET", "/v1/releases/{digest}"): Rule("peer"),
    ("POST", "/v1/secrets/unseal-request"): Rule("peer"),
    ("POST", "/v1/secrets/rekey"): Rule("peer"),
    ("POST", "/v1/raft/step-down"): Rule("peer"),
    ("GET", "/metrics"): _op("site.read"),
    ("GET", "/v1/kv"): _op("kv.read"),
    ("GET", "/v1/kv/"): _op("kv.read"),
    ("GET", "/v1/kv/{key}"): _op("kv.read"),
    ("PUT", "/v1/kv/{key}"): _op("kv.write"),
    ("DELETE", "/v1/kv/{key}"): _op("kv.write"),
    ("POST", "/v1/sessions"): _op("kv.write"),
    ("GET", "/v1/members"): _op("site.read"),
    ("POST", "/v1/members"): _op("members.write"),
    ("DELETE", "/v1/members/{host_id}"): _op("members.write"),
    ("POST", "/v1/tokens"): _op("members.write"),  # a join token buys a membership
    ("GET", "/v1/hosts"): _op("site.read"),
    ("PUT", "/v1/hosts/{host_id}/drain"): _op("site.admin"),
    ("POST", "/v1/apps"): _op("apps.write", "query"),
    ("GET", "/v1/apps"): _op("apps.read", "query"),
    ("GET", "/v1/apps/{name}"): _op("apps.read", "query"),
    ("DELETE", "/v1/apps/{name}"): _op("apps.write", "query"),
    ("GET", "/v1/quotas"): _op("site.read"),
    ("PUT", "/v1/quotas/{tenant}"): _op("quotas.write"),
    ("POST", "/v1/images"): _op("images.write"),
    ("POST", "/v1/images/pull"): _op("images.write"),
    ("GET", "/v1/images"): _op("images.read"),
    ("GET", "/v1/fleet"): _op("fleet.read"),
    ("PUT", "/v1/fleet/link"): _op("fleet.write"),
    ("POST", "/v1/fleet/deltas"): _op("fleet.write"),
    ("POST", "/v1/fleet/key"): _op("fleet.write"),
    ("GET", "/v1/fleet/applied"): _op("fleet.read"),
    ("GET", "/v1/secrets"): _op("secrets.read"),
    ("GET", "/v1/secrets/status"): _op("secrets.read"),
    ("POST", "/v1/secrets/unseal"): _op("secrets.admin"),
    ("POST", "/v1/secrets/escrow"): _op("secrets.admin"),
    ("POST", "/v1/secrets/lockdown"): _op("secrets.admin"),
    ("POST", "/v1/secrets/unlock"): _op("secrets.admin"),
    ("POST", "/v1/secrets/rotate"): _op("secrets.admin"),
    ("PUT", "/v1/secrets/settings"): _op("secrets.admin"),
    ("GET", "/v1/streams"): _op("streams.read"),
    ("GET", _STREAM): _op("streams.read", "path"),
    ("PUT", _STREAM): _op("streams.write", "path"),
    ("POST", _STREAM + "/events"): _op("streams.write", "path"),
    ("GET", _STREAM + "/events"): _op("streams.read", "path"),
    ("GET", _STREAM + "/tail"): _op("streams.read", "path"),
    ("GET", _STREAM + "/offsets/{consumer}"): _op("streams.read", "path"),
    ("PUT", _STREAM + "/offsets/{consumer}"): _op("streams.write", "path"),
    ("GET", "/v1/access-tokens"): _op("tokens.admin"),
    ("POST", "/v1/access-tokens"): _op("tokens.admin"),
    ("DELETE", "/v1/access-tokens/{token_id}"): _op("tokens.admin"),
}


def route_key(method: str, canonical: str) -> tuple[str, str]:
    """The table's key of a route: HEAD is GET; ``{key:.+}`` is ``{key}``."""
    method = "GET" if method.upper() == "HEAD" else method.upper()
    return method, canonical.replace("{key:.+}", "{key}")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the middleware established it."""

    kind: Literal["anonymous", "local", "token", "peer"]
    role: Role | None = None  # tokens
    tenant: str | None = None  # tokens of one tenant; None: site-wide
    name: str = ""  # the token id or the peer's host id, for logs


ANONYMOUS = Caller("anonymous")
LOCAL = Caller("local", name="unix socket")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int = 200  # 401 nobody proven, 403 proven but not enough
    code: str = ""
    message: str = ""


ALLOW = Decision(True)


def _deny(status: int, code: str, message: str) -> Decision:
    return Decision(False, status, code, message)


def decide(rule: Rule | None, caller: Caller, request_tenant: str | None) -> Decision:
    """May ``caller`` call a route with ``rule``? ``request_tenant``: the tenant the request
    names where the rule says (None when it names none)."""
    if rule is None:
        return _deny(404, "not_found", "no such route")
    if rule.surface in ("open", "join"):
        return ALLOW
    if caller.kind == "local":
        return ALLOW
    if rule.surface == "peer":
        if caller.kind == "peer":
            return ALLOW
        return _deny(401, "peer_only", "only the site's hosts may call this (signed requests)")
    if caller.kind != "token" or caller.role is None:
        return _deny(401, "unauthenticated", "an access token is needed (Authorization: Bearer)")
    if caller.role not in ACTIONS.get(rule.action, frozenset()):
        return _deny(403, "forbidden", f"role {caller.role} may not {rule.action}")
    if caller.tenant is not None:
        if rule.action not in TENANT_ACTIONS:
            return _deny(403, "forbidden", f"a token of tenant {caller.tenant} is for its apps")
        if request_tenant != caller.tenant:
            where = "?tenant=" if rule.tenant_from == "query" else "the stream's tenant"
            return _deny(403, "forbidden", f"{where} must be this token's tenant")
    return ALLOW


def policy_rows() -> Iterator[tuple[str, str, str, str, str]]:
    """The role table, for docs and tests: action, admin, operator, viewer, tenant tokens."""
    for action, roles in ACTIONS.items():
        admin, operator, viewer = (
            "yes" if r in roles else "-" for r in ("admin", "operator", "viewer")
        )
        yield action, admin, operator, viewer, "own" if action in TENANT_ACTIONS else "-"
