"""Operator tokens: creation, checking and the one access decision (pure).

A token reads ``mht_<id>_<secret>`` (both hex). The hub stores the id, the role, the tenant
and the sha256 of the secret, never the secret. Roles rank ``viewer < deployer < admin``;
tenant ``"*"`` reaches every tenant. Every access check goes through ``authorize``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from central_hub.errors import ApiError
from central_hub.model import DEFAULT_TENANT, validate_tenant
from meshorch.errors import RemoteInputError

Role = Literal["viewer", "deployer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "deployer", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
ALL_TENANTS = "*"
PREFIX = "mht_"
_ID_BYTES = 8
_SECRET_BYTES = 32
# Compared against when the token id is unknown, so both paths do the same work.
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()
MAX_DESCRIPTION = 200

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

    def public_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "description": self.description,
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
        )


def _role(value: object) -> Role:
    for role in ROLES:
        if value == role:
            return role
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
    if record.expires_at is not None and now >= record.expires_at:
        raise unauthorized("the token has expired")
    return record


def authorize(record: TokenRecord, need: Role, tenant: str | None = None) -> None:
    """403 unless ``record`` has at least role ``need`` (and reaches ``tenant`` if given)."""
    if _RANK[record.role] < _RANK[need]:
        raise ApiError(403, "forbidden", f"needs role {need}, the token has {record.role}")
    if tenant is not None and record.tenant not in (ALL_TENANTS, tenant):
        raise ApiError(403, "forbidden", f"the token cannot reach tenant {tenant!r}")


def visible(record: TokenRecord, tenant: str) -> bool:
    """Whether a token may see objects of ``tenant`` (for listings)."""
    return record.tenant in (ALL_TENANTS, tenant)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    role: Role
    tenant: str
    description: str
    expires_in_s: float | None


_REQUEST_FIELDS = {"role", "tenant", "description", "expires_in_s"}


def parse_token_request(data: object) -> TokenRequest:
    """``{"role", "tenant"?, "description"?, "expires_in_s"?}`` as sent to POST /v1/tokens."""
    if not isinstance(data, dict):
        raise RemoteInputError("bad_request", "the body is a JSON object")
    unknown = sorted(set(data) - _REQUEST_FIELDS)
    if unknown:
        raise RemoteInputError("bad_request", f"unknown fields {unknown}")
    role = _role(data.get("role"))
    tenant = data.get("tenant", ALL_TENANTS if role == "admin" else DEFAULT_TENANT)
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
