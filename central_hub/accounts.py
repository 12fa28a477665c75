"""Tenants, their quotas, and the operators' tokens (the ``tenants`` and ``tokens`` databases).

``Accounts`` plans its changes against the ledger (``central_hub.ledger``); the pure rules
are ``central_hub.tenancy`` (tenant records, quota ops) and ``central_hub.tokens`` (token
records, the policy check). Another tenant's tenant or token answers 404, as everywhere.
"""

from __future__ import annotations

from typing import Any

from central_hub import store, tenancy, tokens
from central_hub.authguard import FailedAuth
from central_hub.errors import ApiError
from central_hub.ledger import Ledger, Txn
from central_hub.model import DEFAULT_TENANT, is_id, plain_key
from central_hub.paging import scan_bound
from central_hub.store import Store, put_json
from central_hub.tenancy import unknown_tenant
from central_hub.tokens import TokenRecord
from meshorch.fleet.delta import ALL_SITES


def adopt_tenants(store: Store, now: float) -> None:
    """Tenant records for ``default`` and for every tenant the stored apps and tokens
    name (data kept before tenants were)."""
    named = {DEFAULT_TENANT}
    named |= {str(app.get("tenant", DEFAULT_TENANT)) for app in store.values_json("apps")}
    named |= {str(t["tenant"]) for t in store.values_json("tokens")}
    missing = sorted(named - set(store.keys("tenants")) - {tokens.ALL_TENANTS})
    if missing:
        writes = [put_json("tenants", t, tenancy.new_tenant(t, "", now)) for t in missing]
        store.commit(writes, sync=True)


class Accounts:
    """Tenants, quotas and tokens (see the module docstring)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.failures = FailedAuth(ledger)  # failed authentications (central_hub.authguard)

    # -- tenants --------------------------------------------------------------------------

    def _tenant(self, token: TokenRecord, tenant_id: str, action: str) -> dict[str, Any]:
        what = f"tenant {tenant_id!r}"
        found = self.ledger.store.get_json("tenants", tenant_id) if is_id(tenant_id) else None
        tokens.authorize(token, action, tenant_id if found is None else found["id"], what=what)
        if found is None:
            raise ApiError(404, "not_found", f"no {what}")
        return dict(found)

    def require_tenant(self, tenant: str) -> None:
        """404 ``unknown_tenant`` unless ``tenant`` exists (objects of unknown tenants
        cannot be created)."""
        if not is_id(tenant) or self.ledger.store.get_json("tenants", tenant) is None:
            raise unknown_tenant(tenant)

    async def create_tenant(
        self, token: TokenRecord, tenant_id: str, description: str
    ) -> dict[str, Any]:
        tokens.authorize(token, "tenants.create")

        def plan(txn: Txn) -> dict[str, Any]:
            if self.ledger.store.get_json("tenants", tenant_id) is not None:
                raise ApiError(409, "tenant_exists", f"tenant {tenant_id!r} exists")
            record = tenancy.new_tenant(tenant_id, description, txn.now)
            txn.put("tenants", tenant_id, record)
            txn.changed("tenant", tenant_id, tenant_id)
            return record

        return await self.ledger.transact(plan)

    def list_tenants(self, token: TokenRecord) -> list[dict[str, Any]]:
        return self.page_tenants(token, None, 2**62)[0]

    def page_tenants(
        self, token: TokenRecord, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the tenants the token reaches after id ``after`` (paging)."""
        return self.ledger.store.page(
            "tenants", after, lambda t: tokens.reaches(token, t["id"]), limit, scan_bound(limit)
        )

    def get_tenant(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        return self._tenant(token, tenant_id, "tenants.read")

    async def delete_tenant(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        def plan(txn: Txn) -> dict[str, Any]:
            record = self._tenant(token, tenant_id, "tenants.delete")
            if tenant_id == DEFAULT_TENANT:
                raise ApiError(409, "default_tenant", "the tenant 'default' always exists")
            for db in tenancy.OWNED_DBS:
                if db in store.DBS and any(
                    r.get("tenant") == tenant_id for r in self.ledger.store.values_json(db)
                ):
                    raise ApiError(
                        409, "tenant_in_use", f"tenant {tenant_id!r} still owns {db}: delete them"
                    )
            held = self.ledger.store.values_json("tokens")
            revoked = [t["id"] for t in held if t["tenant"] == tenant_id]
            for token_id in revoked:
                txn.delete("tokens", token_id)
            if record.get("quota") is not None:
                txn.delta([tenancy.quota_op(tenant_id, None)], ALL_SITES)
            txn.delete("tenants", tenant_id)
            txn.changed("tenant", tenant_id, tenant_id, f"revoked {len(revoked)} token(s)")
            return {"deleted": tenant_id, "revoked_tokens": revoked}

        return await self.ledger.transact(plan)

    async def set_quota(
        self, token: TokenRecord, tenant_id: str, quota: dict[str, int | None] | None
    ) -> dict[str, Any]:
        def plan(txn: Txn) -> dict[str, Any]:
            record = self._tenant(token, tenant_id, "tenants.quota")
            record["quota"] = quota
            txn.put("tenants", tenant_id, record)
            version = txn.delta([tenancy.quota_op(tenant_id, quota)], ALL_SITES)
            txn.changed("quota", tenant_id, tenant_id, f"quota {quota}")
            return {"tenant": tenant_id, "quota": quota, "delta": version}

        return await self.ledger.transact(plan)

    def get_quota(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        record = self._tenant(token, tenant_id, "tenants.read")
        return {"tenant": tenant_id, "quota": record.get("quota")}

    # -- tokens ---------------------------------------------------------------------------

    def _token(self, token_id: str) -> TokenRecord | None:
        raw = self.ledger.store.get_json("tokens", token_id) if plain_key(token_id) else None
        return None if raw is None else TokenRecord.from_json(raw)

    def authenticate(self, header: str | None) -> TokenRecord:
        """The token of an ``Authorization`` header: its secret, its expiry and those of
        its ancestors checked (``tokens.check_lineage``); 401 otherwise."""
        token_id, secret = tokens.split_token(tokens.bearer(header))
        now = self.ledger.now()
        record = tokens.check_token(self._token(token_id), secret, now)
        tokens.check_lineage(record, self._token, now)
        return record

    async def create_token(
        self, caller: TokenRecord, request: tokens.TokenRequest
    ) -> tuple[str, TokenRecord]:
        tokens.authorize(caller, "tokens.create", request.tenant, what="such tenant")

        def plan(txn: Txn) -> tuple[str, TokenRecord]:
            if request.tenant != tokens.ALL_TENANTS:
                self.require_tenant(request.tenant)
            # The caller is the parent: still there (not revoked since it authenticated),
            # and the chain below the root stays within MAX_DEPTH.
            if self._token(caller.id) is None:
                raise tokens.unauthorized("unknown or revoked token")
            if tokens.check_lineage(caller, self._token, txn.now) + 1 > tokens.MAX_DEPTH:
                raise ApiError(
                    400,
                    "token_chain_too_deep",
                    f"a token is at most {tokens.MAX_DEPTH} tokens below a root token: "
                    "create this one with a token nearer the root",
                )
            asked = None if request.expires_in_s is None else txn.now + request.expires_in_s
            text, record = tokens.new_token(
                request.role,
                request.tenant,
                txn.now,
                expires_at=tokens.child_expiry(asked, caller),
                description=request.description,
                parent=caller.id,
            )
            txn.put("tokens", record.id, record.to_json())
            txn.changed("token", record.id, record.tenant, f"role {record.role}")
            return text, record

        return await self.ledger.transact(plan)

    def list_tokens(self, caller: TokenRecord, tenant: str | None = None) -> list[TokenRecord]:
        return self.page_tokens(caller, tenant, None, 2**62)[0]

    def page_tokens(
        self, caller: TokenRecord, tenant: str | None, after: str | None, limit: int
    ) -> tuple[list[TokenRecord], str | None]:
        """A page of the tokens the caller reaches (of ``tenant`` only, when given) after
        id ``after`` (paging)."""

        def mine(record: dict[str, Any]) -> bool:
            owner = str(record["tenant"])
            return tokens.reaches(caller, owner) and (tenant is None or owner == tenant)

        found, last = self.ledger.store.page("tokens", after, mine, limit, scan_bound(limit))
        return [TokenRecord.from_json(r) for r in found], last

    async def delete_token(self, caller: TokenRecord, token_id: str) -> list[str]:
        """Revoke the token and every token below it, in one transaction (a crash leaves
        all of them or none); the descendants' ids are returned. Descendants are of the
        token's tenant or narrower, so a caller that reaches the token reaches them."""

        def plan(txn: Txn) -> list[str]:
            raw = self.ledger.store.get_json("tokens", token_id) if plain_key(token_id) else None
            tenant = None if raw is None else str(raw["tenant"])
            tokens.authorize(caller, "tokens.delete", tenant, what=f"token {token_id!r}")
            if raw is None:
                raise ApiError(404, "not_found", f"no token {token_id!r}")
            held = [TokenRecord.from_json(r) for r in self.ledger.store.values_json("tokens")]
            below = tokens.descendants(token_id, held)
            owners = {t.id: t.tenant for t in held}
            txn.delete("tokens", token_id)
            txn.changed("token", token_id, tenant, f"revoked with {len(below)} descendant(s)")
            for child in below:
                txn.delete("tokens", child)
                txn.changed("token", child, owners[child], f"revoked with ancestor {token_id}")
            return below

        return await self.ledger.transact(plan)
