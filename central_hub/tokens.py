"""Operator tokens: creation and checking (pure).

A token reads ``mht_<id>_<secret>`` (both hex). The hub stores the id, the role, the tenant
and the sha256 of the secret, never the secret. Roles are ``viewer``, ``operator`` and
``admin`` (a stored ``deployer`` is read as ``operator``); tenant ``"*"`` reaches every
tenant. What a token may do is decided by ``central_hub.authz`` (re-exported here).

Tokens form a tree: a token created with ``POST /v1/tokens`` records the id of the token
that created it (``parent``; the bootstrap admin token and tokens kept from before have
none). A child never outranks its parent (no role above it, no tenant beyond it:
``parse_token_request``), never outlives it (an expiry past the parent's, or none, is
capped to the parent's: ``child_expiry``), and dies with it: revoking a token revokes its
descendants in the same transaction (``central_hub.accounts``), and authentication walks
the token's ancestors (``check_lineage``: at most ``MAX_DEPTH`` reads), so a token whose
ancestor is gone or expired is refused whatever happened to the tree in between. Chains
are at most ``MAX_DEPTH`` tokens below a root (400 ``token_chain_too_deep`` past it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from central_hub.authz import (
    ALL_TENANTS,
    ROLES,
    Role,
    authorize,
    field_not_allowed,
    field_not_permitted,
    is_fleet,
    permits,
    reaches,
)
from central_hub.errors import ApiError
from central_hub.model import validate_tenant
from meshorch.errors import RemoteInputError

__all__ = [
    "ALL_TENANTS",
    "ROLES",
    "Role",
    "authorize",
    "field_not_allowed",
    "field_not_permitted",
    "is_fleet",
    "permits",
    "reaches",
]

LEGACY_ROLES: dict[str, Role] = {"deployer": "operator"}
PREFIX = "mht_"
_ID_BYTES = 8
_SECRET_BYTES = 32
# Compared against when the token id is unknown, so both paths do the same work.
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()
MAX_DESCRIPTION = 200
# Tokens below a root token at most: authentication reads this many ancestors at most.
MAX_DEPTH = 8

Random = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    role: Role
    tenant: str
    secret_hash: str
    created_at: float
    expires_at: float | None = None
    description: str = ""
    parent: str | None = None  # the token that created this one (None: a root token)

    def public_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "description": self.description,
            "parent": self.parent,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.public_json(), "secret_hash": self.secret_hash}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TokenRecord:
        return TokenRecord(
            id=str(data["id"]),
            role=_role(data["role"]),
            tenant=str(data["tenant"]),
            secret_hash=str(data["secret_hash"]),
            created_at=float(data["created_at"]),
            expires_at=None if data.get("expires_at") is None else float(data["expires_at"]),
            description=str(data.get("description", "")),
            parent=None if data.get("parent") is None else str(data["parent"]),
        )


def _role(value: object) -> Role:
    for role in ROLES:
        if value == role:
            return role
    if isinstance(value, str) and value in LEGACY_ROLES:
        return LEGACY_ROLES[value]
    raise RemoteInputError("bad_role", f"role {value!r} is not one of {', '.join(ROLES)}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(
    role: Role,
    tenant: str,
    now: float,
    *,
    expires_at: float | None = None,
    description: str = "",
    parent: str | None = None,
    rand: Random = os.urandom,
) -> tuple[str, TokenRecord]:
    """A new token: the text to hand out once, and the record to store."""
    token_id = rand(_ID_BYTES).hex()
    secret = rand(_SECRET_BYTES).hex()
    record = TokenRecord(
        id=token_id,
        role=role,
        tenant=tenant,
        secret_hash=hash_secret(secret),
        created_at=now,
        expires_at=expires_at,
        description=description,
        parent=parent,
    )
    return f"{PREFIX}{token_id}_{secret}", record


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def split_token(text: str) -> tuple[str, str]:
    """``mht_<id>_<secret>`` -> (id, secret); 401 when it does not look like a token."""
    if not text.startswith(PREFIX):
        raise unauthorized(f"a token starts with {PREFIX!r}")
    token_id, sep, secret = text[len(PREFIX) :].partition("_")
    if not sep or not token_id or not secret or not (token_id + secret).isascii():
        raise unauthorized("a token reads mht_<id>_<secret>")
    return token_id, secret


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        raise unauthorized("send 'Authorization: Bearer <token>'")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("send 'Authorization: Bearer <token>'")
    return value.strip()


def check_token(record: TokenRecord | None, secret: str, now: float) -> TokenRecord:
    """The record when ``secret`` is its secret and it has not expired; 401 otherwise.

    The secret's hash is compared in constant time, also when the id is unknown.
    """
    expected = record.secret_hash if record is not None else _DUMMY_HASH
    matches = hmac.compare_digest(hash_secret(secret).encode(), expected.encode())
    if record is None or not matches:
        raise unauthorized("unknown or revoked token")
    if _expired(record, now):
        raise unauthorized("the token has expired")
    return record


def _expired(record: TokenRecord, now: float) -> bool:
    return record.expires_at is not None and now >= record.expires_at


def check_lineage(
    record: TokenRecord, lookup: Callable[[str], TokenRecord | None], now: float
) -> int:
    """The token's depth below its root (0: a root) when every ancestor is still there
    and unexpired; 401 otherwise. Reads at most ``MAX_DEPTH`` ancestors with ``lookup``."""
    parent = record.parent
    for depth in range(MAX_DEPTH + 1):
        if parent is None:
            return depth
        ancestor = lookup(parent)
        if ancestor is None:
            raise unauthorized("unknown or revoked token (a token it descends from is revoked)")
        if _expired(ancestor, now):
            raise unauthorized("the token has expired (a token it descends from has expired)")
        parent = ancestor.parent
    raise unauthorized(f"the token descends from more than {MAX_DEPTH} tokens")


def child_expiry(requested: float | None, parent: TokenRecord) -> float | None:
    """A child's expiry: the one asked for, capped to the parent's (None: never)."""
    if parent.expires_at is None:
        return requested
    return parent.expires_at if requested is None else min(requested, parent.expires_at)


def descendants(token_id: str, records: list[TokenRecord]) -> list[str]:
    """Ids of every token below ``token_id`` (its children, theirs, ...), in tree order."""
    children: dict[str, list[str]] = {}
    for record in records:
        if record.parent is not None:
            children.setdefault(record.parent, []).append(record.id)
    found: list[str] = []
    todo = [token_id]
    seen = {token_id}
    while todo:
        for child in sorted(children.get(todo.pop(), [])):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


@dataclass(frozen=True, slots=True)
class TokenRequest:
    role: Role
    tenant: str
    description: str
    expires_in_s: float | None


REQUEST_FIELDS = frozenset({"role", "tenant", "description", "expires_in_s"})


def parse_token_request(data: object, caller: TokenRecord) -> TokenRequest:
    """``{"role", "tenant"?, "description"?, "expires_in_s"?}`` as sent to POST /v1/tokens.

    A tenant admin creates tokens of its own tenant only (``tenant`` left out or its own);
    a fleet-wide caller may name any tenant or ``"*"`` (left out: ``"*"`` for an admin
    token, ``"default"`` otherwise). No caller grants a role above its own. Anything else
    is 400 ``field_not_allowed``.
    """
    if not isinstance(data, dict):
        raise RemoteInputError("bad_request", "the body is a JSON object")
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise field_not_allowed(unknown, f"a token request has only {sorted(REQUEST_FIELDS)}")
    role = _role(data.get("role"))
    if ROLES.index(role) > ROLES.index(caller.role):
        raise field_not_permitted(["role"], f"a {caller.role} token cannot create a {role} token")
    fleet = caller.tenant == ALL_TENANTS
    default = caller.tenant
    if fleet:
        default = ALL_TENANTS if role == "admin" else "default"
    tenant = data.get("tenant", default)
    if not fleet and tenant != caller.tenant:
        raise field_not_permitted(
            ["tenant"], f"a token of tenant {caller.tenant!r} creates tokens of that tenant only"
        )
    if tenant != ALL_TENANTS:
        tenant = validate_tenant(tenant)
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise RemoteInputError(
            "bad_request", f"description is a string of at most {MAX_DESCRIPTION} characters"
        )
    expires = data.get("expires_in_s")
    if expires is not None and (
        type(expires) not in (int, float) or not 0 < expires < 100 * 365 * 86400
    ):
        raise RemoteInputError("bad_request", "expires_in_s is a positive number of seconds")
    return TokenRequest(role, str(tenant), description, None if expires is None else float(expires))
