"""Access tokens of a site's operators: the token, the record kept of it, the check (pure).

A token reads ``moat1.<id>.<secret>``. The replicated state keeps, under
``access/<id>``, its role, tenant, expiry and the SHA-256 of the secret, never the secret:
whoever reads a host's state (a stolen disk) cannot use what it finds. Tokens are made by an
admin (``POST /v1/access-tokens``, ``meshorch access-token create``), on the root-only socket
to begin with. An agent may also be given one bootstrap token by file
(``--operator-token-file``), known to that agent only and kept hashed in memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from meshorch.errors import RemoteInputError
from meshorch.site.authz import ROLES, Role

TOKEN_PREFIX = "moat1."
RECORD_PREFIX = b"access/"
MAX_TTL_S = 366 * 24 * 3600.0
MAX_TOKENS = 1000  # per site: bounds the table a stranger's guesses are checked against


class AccessRefused(RemoteInputError):
    """A token that is malformed, unknown, expired or revoked (401)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


@dataclass(frozen=True, slots=True)
class AccessRecord:
    token_id: str
    secret_sha256: str
    role: Role
    tenant: str | None  # None: site-wide
    expires_at: float | None  # None: until revoked
    created_at: float

    def key(self) -> bytes:
        return RECORD_PREFIX + self.token_id.encode()

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, **self.to_json(), "secret_sha256": self.secret_sha256})

    def to_json(self) -> dict[str, Any]:
        """What listings show: never the hash."""
        return {
            "id": self.token_id,
            "role": self.role,
            "tenant": self.tenant,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
        }

    @staticmethod
    def decode(raw: bytes) -> AccessRecord:
        data = orjson.loads(raw)
        role = data["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        return AccessRecord(
            str(data["id"]),
            str(data["secret_sha256"]),
            role,
            data.get("tenant"),
            data.get("expires_at"),
            float(data["created_at"]),
        )

    def matches(self, secret: bytes, now: float) -> bool:
        fresh = self.expires_at is None or now < self.expires_at
        return fresh and hmac.compare_digest(self.secret_sha256, _digest(secret))


@dataclass(frozen=True, slots=True)
class AccessToken:
    token_id: str
    secret: bytes

    def encode(self) -> str:
        return f"{TOKEN_PREFIX}{self.token_id}.{_b64(self.secret)}"

    @staticmethod
    def parse(text: str) -> AccessToken:
        if not text.startswith(TOKEN_PREFIX):
            raise AccessRefused("bad_token", "not a meshorch access token (expected 'moat1.…')")
        token_id, sep, secret_text = text[len(TOKEN_PREFIX) :].partition(".")
        if not sep or len(token_id) != 16 or not all(c in "0123456789abcdef" for c in token_id):
            raise AccessRefused("bad_token", "the access token is damaged")
        try:
            secret = base64.urlsafe_b64decode(secret_text + "=" * (-len(secret_text) % 4))
        except (binascii.Error, ValueError):
            raise AccessRefused("bad_token", "the access token is damaged") from None
        if len(secret) != 32:
            raise AccessRefused("bad_token", "the access token is damaged")
        return AccessToken(token_id, secret)


def new_token(
    role: Role, tenant: str | None, ttl_s: float | None, now: float
) -> tuple[AccessToken, AccessRecord]:
    token = AccessToken(secrets.token_hex(8), secrets.token_bytes(32))
    expires = None if ttl_s is None else now + ttl_s
    record = AccessRecord(token.token_id, _digest(token.secret), role, tenant, expires, now)
    return token, record


def parse_create_request(data: dict[str, object]) -> tuple[Role, str | None, float | None]:
    """``{"role", "tenant"?, "ttl_s"?}``; every problem named."""
    unknown = set(data) - {"role", "tenant", "ttl_s"}
    if unknown:
        raise RemoteInputError("bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    role = data.get("role")
    if role not in ROLES:
        raise RemoteInputError("bad_role", f"role: one of {', '.join(ROLES)}")
    tenant = data.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise RemoteInputError("bad_tenant", "tenant: a tenant name, or absent for site-wide")
    ttl = data.get("ttl_s")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S
    ):
        raise RemoteInputError("bad_ttl", f"ttl_s: seconds, at most {MAX_TTL_S:g}")
    if tenant is not None and role == "admin":
        raise RemoteInputError("bad_role", "a tenant's token is an operator or a viewer")
    return role, tenant, None if ttl is None else float(ttl)


def load_or_create_bootstrap(path: Path, now: float) -> tuple[AccessToken, AccessRecord]:
    """The agent's bootstrap admin token: read from ``path``, or made there (mode 0600)."""
    if path.exists():
        token = AccessToken.parse(path.read_text().strip())
    else:
        token = AccessToken(secrets.token_hex(8), secrets.token_bytes(32))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token.encode() + "\n")
    return token, AccessRecord(token.token_id, _digest(token.secret), "admin", None, None, now)


TOKEN_ENV = "MESHORCH_AGENT_TOKEN"  # the command line's token for an agent's TCP API


def harness_token() -> str:
    """The admin token of the agents a harness (the demo, the lab, tests) starts:
    ``$MESHORCH_AGENT_TOKEN`` when set, so command lines run meanwhile inherit it; else new."""
    given = os.environ.get(TOKEN_ENV, "").strip()
    if given:
        AccessToken.parse(given)  # a damaged one fails here, not at every request
        return given
    return AccessToken(secrets.token_hex(8), secrets.token_bytes(32)).encode()
