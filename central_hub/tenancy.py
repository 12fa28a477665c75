"""Tenants at the hub: records, request bodies and the quota op (pure).

A tenant record (LMDB ``tenants``, id -> JSON)::

    {"id": "blue", "description": "...", "created_at": 1700000000.0,
     "quota": null | {"cpu_millis": 4000 | null, "memory_bytes": ... | null,
                      "instances": ... | null}}

The tenant ``default`` always exists; objects stored before tenants were kept belong to it.
"""

from __future__ import annotations

from typing import Any

from central_hub.authz import only_fields
from central_hub.errors import ApiError
from central_hub.model import validate_tenant
from meshorch.apps.quotas import QUOTA_FIELDS, parse_quota

MAX_DESCRIPTION = 200
TENANT_FIELDS = frozenset({"id", "description"})
# Databases whose records name their tenant: a tenant owning any of them cannot be deleted
# (those the store does not have are skipped).
OWNED_DBS: tuple[str, ...] = ("apps", "secrets")


def new_tenant(tenant_id: str, description: str, now: float) -> dict[str, Any]:
    return {"id": tenant_id, "description": description, "created_at": now, "quota": None}


def parse_tenant_request(data: object) -> tuple[str, str]:
    """``{"id", "description"?}`` of POST /v1/tenants."""
    body = only_fields(data, TENANT_FIELDS, "a tenant")
    tenant_id = validate_tenant(body.get("id"))
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ApiError(
            400, "bad_request", f"description is a string of at most {MAX_DESCRIPTION} characters"
        )
    return tenant_id, description


def parse_quota_request(data: object) -> dict[str, int | None] | None:
    """``{"cpu_millis", "memory_bytes", "instances"}`` of PUT /v1/tenants/{id}/quota: each
    an integer or null (unlimited; a field left out is null). None when all are null."""
    body = only_fields(data, QUOTA_FIELDS, "a quota")
    # JSON has one number type: 5.0 is the integer 5 (as the API's JSON Schema reads it).
    body = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in body.items()}
    quota = parse_quota(body)
    if quota.unlimited:
        return None
    return quota.to_json()


def quota_op(tenant: str, quota: dict[str, int | None] | None) -> dict[str, Any]:
    """The ``tenant.quota`` delta operation (all null: no quota)."""
    values = quota or {}
    return {"op": "tenant.quota", "tenant": tenant, **{n: values.get(n) for n in QUOTA_FIELDS}}


def unknown_tenant(tenant: str) -> ApiError:
    return ApiError(404, "unknown_tenant", f"no tenant {tenant!r}: a fleet admin creates it first")
