"""The hub's audit log: entries and their reading (pure).

An append-only LMDB database ``audit``: key the big-endian u64 sequence number, value one
JSON entry::

    {"seq": 7, "at": 1700000000.0,
     "actor": {"token": "1f2e...", "role": "operator", "tenant": "blue"},
     "action": "apps.write", "tenant": "blue",
     "object": {"type": "app", "id": "web"},
     "outcome": "ok", "detail": ""}

One entry per change (written in the same transaction as the change), per refused request
(outcome ``refused 401`` / ``refused 403``, actor null when no token was recognised) and per
secret access request. ``tenant`` is the tenant the entry belongs to (``"*"``: fleet
infrastructure); a tenant admin reads its tenant's entries, a fleet admin every entry.
Entries never hold token texts or secret values: only ids, names and outcomes.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any

from central_hub.authz import ALL_TENANTS, Principal

MAX_DETAIL = 500
MAX_ID = 200

# Who the current request is (its token, or None, and the policy action); set by the API's
# route guard, read by the service so every change is audited with its actor.
CALLER: contextvars.ContextVar[tuple[Principal | None, str] | None] = contextvars.ContextVar(
    "hub_caller", default=None
)


def actor(token: Principal | None) -> dict[str, Any] | None:
    if token is None:
        return None
    return {"token": getattr(token, "id", None), "role": token.role, "tenant": token.tenant}


def entry(
    token: Principal | None,
    action: str,
    tenant: str | None,
    object_type: str,
    object_id: str,
    outcome: str,
    detail: str,
    now: float,
) -> dict[str, Any]:
    """An entry without its sequence number (the store assigns it)."""
    return {
        "at": now,
        "actor": actor(token),
        "action": action,
        "tenant": tenant if tenant is not None else ALL_TENANTS,
        "object": {"type": object_type, "id": object_id[:MAX_ID]},
        "outcome": outcome,
        "detail": detail[:MAX_DETAIL],
    }


def select(
    entries: Iterable[dict[str, Any]], reader_tenant: str, wanted: str | None, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` entries the reader may see: a fleet reader (``"*"``) every entry,
    or those of ``wanted`` when given; a tenant reader those of its tenant."""
    found = []
    for item in entries:
        tenant = item.get("tenant")
        if reader_tenant != ALL_TENANTS and tenant != reader_tenant:
            continue
        if wanted is not None and tenant != wanted:
            continue
        found.append(item)
        if len(found) >= limit:
            break
    return found
