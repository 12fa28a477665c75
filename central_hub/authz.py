"""The hub's access policy: one table of actions by role, and the one decision (pure).

Every token route of ``central_hub.api.ROUTES`` names an action of ``POLICY``; the route
guard calls ``authorize(token, action)`` before the handler runs (403 when the role or the
token's reach is not enough), and the service calls ``authorize(token, action, tenant)``
again on the object it touches (404 when the object's tenant is not the token's, so
another tenant's object is indistinguishable from an absent one).

A token carries a role and a tenant: a tenant id, or ``"*"`` (fleet-wide). Scopes:

    fleet    fleet infrastructure: only fleet-wide tokens (tenant "*")
    tenant   an object of one tenant: fleet-wide tokens and that tenant's tokens
    any      every authenticated token (answers are filtered by tenant)

The table (``policy_rows()`` prints it; docs/tenants.md has it too)::

    action             scope   admin  operator  viewer
    fleet.rotate       fleet   yes    -         -
    deltas.read        fleet   yes    yes       yes
    sites.create       fleet   yes    -         -
    sites.write        fleet   yes    -         -
    sites.delete       fleet   yes    -         -
    sites.read         any     yes    yes       yes
    sites.trends       fleet   yes    yes       yes
    tenants.create     fleet   yes    -         -
    tenants.delete     fleet   yes    -         -
    tenants.quota      fleet   yes    -         -
    tenants.read       tenant  yes    yes       yes
    tokens.create      tenant  yes    -         -
    tokens.read        tenant  yes    -         -
    tokens.delete      tenant  yes    -         -
    apps.write         tenant  yes    yes       -
    apps.delete        tenant  yes    yes       -
    apps.read          tenant  yes    yes       yes
    secrets.write      tenant  yes    yes       -
    secrets.read       tenant  yes    yes       yes
    fleet.lockdown     fleet   yes    -         -
    fleet.admin        fleet   yes    -         -
    audit.read         tenant  yes    -         -

So a fleet admin (admin, "*") manages tenants, sites, rotation and every token; a tenant
admin manages its tenant's tokens and objects; an operator changes its tenant's objects; a
viewer reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from central_hub.errors import ApiError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
ALL_TENANTS = "*"
Scope = Literal["fleet", "tenant", "any"]


@dataclass(frozen=True, slots=True)
class Rule:
    scope: Scope
    roles: frozenset[Role]


_ALL: frozenset[Role] = frozenset(ROLES)
_WRITE: frozenset[Role] = frozenset({"operator", "admin"})
_ADMIN: frozenset[Role] = frozenset({"admin"})

POLICY: dict[str, Rule] = {
    "fleet.rotate": Rule("fleet", _ADMIN),
    "deltas.read": Rule("fleet", _ALL),  # the decoded log holds every tenant's specs
    "sites.create": Rule("fleet", _ADMIN),
    "sites.write": Rule("fleet", _ADMIN),
    "sites.delete": Rule("fleet", _ADMIN),
    "sites.read": Rule("any", _ALL),
    "sites.trends": Rule("fleet", _ALL),  # hosts' use; restarts of every tenant's instances
    "tenants.create": Rule("fleet", _ADMIN),
    "tenants.delete": Rule("fleet", _ADMIN),
    "tenants.quota": Rule("fleet", _ADMIN),
    "tenants.read": Rule("tenant", _ALL),
    "tokens.create": Rule("tenant", _ADMIN),
    "tokens.read": Rule("tenant", _ADMIN),
    "tokens.delete": Rule("tenant", _ADMIN),
    "apps.write": Rule("tenant", _WRITE),
    "apps.delete": Rule("tenant", _WRITE),
    "apps.read": Rule("tenant", _ALL),
    "secrets.write": Rule("tenant", _WRITE),
    "secrets.read": Rule("tenant", _ALL),
    "fleet.lockdown": Rule("fleet", _ADMIN),
    "fleet.admin": Rule("fleet", _ADMIN),
    "audit.read": Rule("tenant", _ADMIN),
    "logs.read": Rule("tenant", _ALL),
    "alerts.read": Rule("any", _ALL),  # a tenant token sees its apps' alerts only
    "alerts.ack": Rule("fleet", _WRITE),
}

# A route declared with a role name rather than an action gets the narrowest reading of it
# (``fleet.admin`` is any other fleet administration).
ROLE_ACTIONS: dict[str, str] = {
    "admin": "fleet.admin",
    "operator": "apps.write",
    "deployer": "apps.write",
    "viewer": "apps.read",
}


class Principal(Protocol):
    """What the decision needs of a token (``TokenRecord`` has both attributes)."""

    @property
    def role(self) -> Role: ...

    @property
    def tenant(self) -> str: ...


def action_of(name: str) -> str:
    """The policy action of a route's ``auth`` (an action, or a legacy role name)."""
    action = ROLE_ACTIONS.get(name, name)
    if action not in POLICY:
        raise KeyError(f"{name!r} is not an action of the hub's policy")
    return action


def is_fleet(token: Principal) -> bool:
    return token.tenant == ALL_TENANTS


def reaches(token: Principal, tenant: str) -> bool:
    """Whether the token sees objects of ``tenant`` (for lookups and listings)."""
    return token.tenant in (ALL_TENANTS, tenant)


def permits(token: Principal, action: str) -> bool:
    """The table's cell for the token's role, and its reach for fleet actions."""
    rule = POLICY[action_of(action)]
    if token.role not in rule.roles:
        return False
    return rule.scope != "fleet" or is_fleet(token)


def authorize(
    token: Principal, action: str, tenant: str | None = None, *, what: str = "such object"
) -> None:
    """Raise unless ``token`` may do ``action`` (on an object of ``tenant``, if given).

    404 ``not_found`` ("no <what>") when the object's tenant is not the token's: first, so
    that another tenant's object answers exactly as an absent one. 403 ``forbidden`` when
    the role, or a tenant token for a fleet action, is not enough.
    """
    if tenant is not None and not reaches(token, tenant):
        raise ApiError(404, "not_found", f"no {what}")
    if not permits(token, action):
        rule = POLICY[action_of(action)]
        roles = " or ".join(r for r in ROLES if r in rule.roles)
        reach = "a fleet-wide (tenant '*') token with role " if rule.scope == "fleet" else "role "
        raise ApiError(
            403,
            "forbidden",
            f"{action} needs {reach}{roles}; the token has role {token.role} "
            f"of tenant {token.tenant!r}",
        )


def requirement(action: str) -> str:
    """The requirement of an action in words (for the OpenAPI document)."""
    rule = POLICY[action_of(action)]
    roles = ", ".join(r for r in ROLES if r in rule.roles)
    if rule.scope == "fleet":
        return f"action {action}: a fleet-wide token (tenant '*') with role {roles}"
    if rule.scope == "tenant":
        return (
            f"action {action}: role {roles}; objects of another tenant answer 404 "
            "(fleet-wide tokens reach every tenant)"
        )
    return f"action {action}: any token (role {roles}); answers are filtered by tenant"


def policy_rows() -> list[tuple[str, Scope, dict[Role, bool]]]:
    """The table as rows: (action, scope, {role: allowed})."""
    return [
        (action, rule.scope, {role: role in rule.roles for role in ROLES})
        for action, rule in POLICY.items()
    ]


def field_not_allowed(fields: list[str], why: str) -> ApiError:
    """400 ``field_not_allowed``: a body sets fields its caller may not set (mass
    assignment); the request changes nothing."""
    return ApiError(400, "field_not_allowed", f"fields {fields} may not be set: {why}")


def field_not_permitted(fields: list[str], why: str) -> ApiError:
    """403 ``field_not_allowed``: a well-formed body gives a field a value its caller may
    not (another tenant, a role above its own): refused as the caller's, not the request's,
    fault; the request changes nothing."""
    return ApiError(403, "field_not_allowed", f"fields {fields} may not be set: {why}")


def only_fields(data: object, allowed: Iterable[str], what: str) -> dict[str, Any]:
    """``data`` as a JSON object having no field outside ``allowed``."""
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise field_not_allowed(extra, f"{what} has only {sorted(allowed)}")
    return data
