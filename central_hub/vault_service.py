"""The hub's secrets service: secrets kept in the store, sent to sites, lock-down, escrow.

``VaultService`` keeps the vault's records in the store's ``meta`` database (the layout is
in ``central_hub.vault``, with the pure rules it applies), seals each secret to its target
sites' keys in ``secret.put`` deltas (``distribute``, run by the hub's driver while a
secret waits for a site), sends lock-down, unlock and rotation deltas, and holds the sites'
escrowed unseal keys until an operator approves an unseal. Every vault change and every
access to a secret or an unseal key is audited in the transaction that makes it.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from central_hub import tokens
from central_hub.errors import ApiError
from central_hub.ledger import Ledger, Txn
from central_hub.paging import scan_bound
from central_hub.reports import Reports
from central_hub.sites import require_site
from central_hub.tokens import TokenRecord
from central_hub.vault import (
    ESCROW_PREFIX,
    LOCK_PREFIX,
    SECRET_PREFIX,
    UNSEAL_APPROVAL_S,
    UNSEAL_PREFIX,
    Distribution,
    HubKeys,
    SecretRequest,
    approval_valid,
    b64,
    check_access,
    delete_op,
    escrow_context,
    fleet_wide,
    locked_down,
    new_version,
    parse_escrow_upload,
    plan_distribution,
    public_secret,
    put_op,
    secret_record_key,
    secret_value,
    sign_escrow_key,
    site_secret_status,
    targets_of,
)
from meshorch.fleet.delta import Target
from meshorch.secrets.keyring import DEFAULT_TENANT, open_sealed, seal, unwrap, wrap


class VaultService:
    """The hub's secrets: the store, distribution, lock-down, escrow (module docstring)."""

    def __init__(self, ledger: Ledger, reports: Reports) -> None:
        self.ledger = ledger
        self.reports = reports
        self._keys: HubKeys | None = None
        # What distribution must look at again (the driver's check costs O(these), not
        # O(sites)): sites whose labels, registration or reported secrets key changed
        # (site -> a change number), and every site once after the start.
        self._pending: dict[str, int] = {}
        self._pending_all = 1
        self._changes = 1
        reports.listeners.append(self._reported)

    def site_changed(self, site: str) -> None:
        """A site was registered, deleted or relabelled (``Sites.listeners``)."""
        self._changes += 1
        self._pending[site] = self._changes

    def _reported(
        self, site: str, previous: Mapping[str, Any] | None, report: Mapping[str, Any]
    ) -> None:
        before = None if previous is None else previous.get("secrets_public_key")
        if report.get("secrets_public_key") != before:
            self.site_changed(site)

    def open(self) -> None:
        """Read or create the key files (in the thread that opens the data dir)."""
        self._keys = HubKeys.load_or_create(self.ledger.data_dir, self.ledger.kek)

    @property
    def keys(self) -> HubKeys:
        if self._keys is None:
            raise ApiError(503, "stopping", "the hub is not started")
        return self._keys

    def audit(
        self,
        token: TokenRecord | None,
        action: str,
        tenant: str | None,
        object_type: str,
        object_id: str,
        outcome: str = "ok",
        detail: str = "",
    ) -> None:
        """The one call site of the hub's audit log for every vault change and every
        secret or unseal-key access (called while a change is planned, the entry joins
        that change's transaction)."""
        self.ledger.audit(token, action, tenant, object_type, object_id, outcome, detail)

    # -- reading --------------------------------------------------------------------------

    def _report(self, site: str) -> dict[str, Any] | None:
        return self.reports.latest(site)

    def _sites(self) -> dict[str, dict[str, str]]:
        return {s["id"]: s["labels"] for s in self.ledger.store.values_json("sites")}

    def _site_keys(self, sites: Iterable[str]) -> dict[str, str | None]:
        return {s: (self._report(s) or {}).get("secrets_public_key") for s in sites}

    def _records(self) -> list[dict[str, Any]]:
        """Every secret's record (a range read of the ``meta`` keys of secrets)."""
        return [dict(r) for _, r in self.ledger.store.values_with_prefix("meta", SECRET_PREFIX)]

    def _some_sites(self, sites: Iterable[str]) -> dict[str, dict[str, str]]:
        """The labels of those of ``sites`` that are registered."""
        store, found = self.ledger.store, {}
        for site in sites:
            record = store.get_json("sites", site)
            if record is not None:
                found[site] = record["labels"]
        return found

    def _meta(self, key: str) -> Any:
        return self.ledger.store.get_json("meta", key)

    def _plan(
        self,
        record: Mapping[str, Any],
        sites: Mapping[str, Mapping[str, str]],
        only: Collection[str] | None = None,
    ) -> Distribution:
        targets = targets_of(record["placement"], sites)
        return plan_distribution(record, targets, self._site_keys(targets), only)

    def _view(self, record: Mapping[str, Any], sites: Mapping[str, Mapping[str, str]]) -> Any:
        targets = targets_of(record["placement"], sites)
        return {
            **public_secret(record),
            "targets": targets,
            "sites": {s: site_secret_status(record, s, self._report(s)) for s in targets},
        }

    def _tenant_of(self, token: TokenRecord, tenant: str | None) -> str:
        if tenant is not None:
            return tenant
        return DEFAULT_TENANT if fleet_wide(token) else token.tenant

    def _secret(self, token: TokenRecord, tenant: str, name: str) -> dict[str, Any]:
        what = f"secret {tenant}/{name}"  # another tenant's answers as an absent one
        check_access(token, "secrets.read", tenant, what=what)
        record = self._meta(secret_record_key(tenant, name))
        if record is None:
            raise ApiError(404, "not_found", f"no {what}")
        return dict(record)

    def list_secrets(self, token: TokenRecord) -> list[dict[str, Any]]:
        return self.page_secrets(token, None, 2**62)[0]

    def page_secrets(
        self, token: TokenRecord, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of ``GET /v1/secrets`` (``central_hub.paging``): the secrets of the
        token's tenants after the record key ``after``, and the last key read."""
        found, last = self.ledger.store.page(
            "meta",
            after,
            lambda r: tokens.reaches(token, r["tenant"]),
            limit,
            scan_bound(limit),
            prefix=SECRET_PREFIX,
        )
        if not found:
            return [], last
        sites = self._sites()
        return [self._view(r, sites) for r in found], last

    def get_secret(self, token: TokenRecord, name: str, tenant: str | None) -> dict[str, Any]:
        record = self._secret(token, self._tenant_of(token, tenant), name)
        return dict(self._view(record, self._sites()))

    # -- distribution ---------------------------------------------------------------------

    def _distribute(
        self,
        txn: Txn,
        record: dict[str, Any],
        sites: Mapping[str, Mapping[str, str]],
        only: Collection[str] | None = None,
    ) -> bool:
        plan = self._plan(record, sites, only)
        if plan.put:
            value = secret_value(self.keys.master, record)
            to = Target(sites=frozenset(plan.put))
            version = txn.delta([put_op(record, value, plan.put)], to)
            for site, key in plan.put.items():
                record["issued"][site] = {
                    "version": record["version"],
                    "key": key,
                    "delta": version,
                }
        if plan.delete:
            txn.delta([delete_op(record)], Target(sites=frozenset(plan.delete)))
            for site in plan.delete:
                del record["issued"][site]
        return bool(plan)

    def _scope(self) -> tuple[dict[str, dict[str, str]], Collection[str] | None]:
        """The sites distribution must look at (labels) and ``only`` for the plans."""
        if self._pending_all:
            return self._sites(), None
        return self._some_sites(self._pending), set(self._pending)

    def _settled(self, pending_all: int, pending: Mapping[str, int]) -> None:
        """Forget the changes looked at, unless they changed again meanwhile."""
        if self._pending_all == pending_all:
            self._pending_all = 0
        for site, change in pending.items():
            if self._pending.get(site) == change:
                del self._pending[site]

    def needs_distribution(self) -> bool:
        """Whether a secret waits for a site (the driver's check, outside the lock): O(1)
        when no site changed since the last look, O(changed sites x secrets) otherwise."""
        if not self._pending_all and not self._pending:
            return False
        pending_all, pending = self._pending_all, dict(self._pending)
        records = self._records()
        if records:
            sites, only = self._scope()
            if any(self._plan(r, sites, only) for r in records):
                return True
        self._settled(pending_all, pending)
        return False

    def distribute(self, txn: Txn) -> None:
        """Seal every secret to the target sites that do not have its version yet (of
        the sites changed since the last distribution)."""
        pending_all, pending = self._pending_all, dict(self._pending)
        sites, only = self._scope()
        txn.after.append(lambda: self._settled(pending_all, pending))
        for record in self._records():
            if self._distribute(txn, record, sites, only):
                txn.put("meta", secret_record_key(record["tenant"], record["name"]), record)
                name, version = record["name"], record["version"]
                self.audit(None, "secrets.distribute", record["tenant"], "secret", name,
                           detail=f"version {version} to {sorted(record['issued'])}")  # fmt: skip

    async def put_secret(
        self, token: TokenRecord, request: SecretRequest
    ) -> tuple[int, dict[str, Any]]:
        tenant = self._tenant_of(token, request.tenant)
        if request.tenant is not None and not tokens.reaches(token, request.tenant):
            # Mass assignment, as for applications: a body may not name another tenant.
            raise tokens.field_not_permitted(
                ["tenant"], f"a token of tenant {token.tenant!r} writes that tenant only"
            )
        check_access(token, "secrets.write", tenant)

        def plan(txn: Txn) -> tuple[int, dict[str, Any]]:
            key = secret_record_key(tenant, request.name)
            previous = self._meta(key)
            record = new_version(previous, self.keys.master, request, tenant, txn.now)
            sites = self._sites()
            self._distribute(txn, record, sites)
            txn.put("meta", key, record)
            self.audit(token, "secrets.write", tenant, "secret", request.name,
                       detail=f"version {record['version']}")  # fmt: skip
            return (201 if previous is None else 200), dict(self._view(record, sites))

        return await self.ledger.transact(plan)

    async def delete_secret(
        self, token: TokenRecord, name: str, tenant: str | None
    ) -> dict[str, Any]:
        chosen = self._tenant_of(token, tenant)

        def plan(txn: Txn) -> dict[str, Any]:
            record = self._secret(token, chosen, name)
            check_access(token, "secrets.write", chosen)
            sent = sorted(record["issued"])
            version = None
            if sent:
                version = txn.delta([delete_op(record)], Target(sites=frozenset(sent)))
            txn.delete("meta", secret_record_key(chosen, name))
            self.audit(token, "secrets.delete", chosen, "secret", name)
            return {"deleted": name, "tenant": chosen, "delta": version, "sites": sent}

        return await self.ledger.transact(plan)

    # -- lock-down, unlock, rotation -------------------------------------------------------

    def _check_site(self, site: str) -> None:
        require_site(self.ledger.store, site)  # 404 when unknown

    def is_locked_down(self, site: str) -> bool:
        return locked_down(self._meta(LOCK_PREFIX + site), self._report(site))

    async def site_op(self, token: TokenRecord, site: str, op: str) -> dict[str, Any]:
        """``site.lockdown``, ``site.unlock`` or ``secrets.rotate`` to one site."""
        check_access(token, "fleet.lockdown")

        def plan(txn: Txn) -> dict[str, Any]:
            self._check_site(site)
            version = txn.delta([{"op": op}], Target(sites=frozenset({site})))
            answer: dict[str, Any] = {"site": site, "op": op, "delta": version}
            if op in ("site.lockdown", "site.unlock"):
                locked = op == "site.lockdown"
                txn.put("meta", LOCK_PREFIX + site,
                        {"locked_down": locked, "delta": version, "at": txn.now})  # fmt: skip
                if locked and self._meta(UNSEAL_PREFIX + site) is not None:
                    txn.delete("meta", UNSEAL_PREFIX + site)
                answer["locked_down"] = locked
            self.audit(token, op, None, "site", site, detail=f"delta {version}")
            return answer

        return await self.ledger.transact(plan)

    # -- escrow and unseal -------------------------------------------------------------

    async def approve_unseal(self, token: TokenRecord, site: str) -> dict[str, Any]:
        check_access(token, "fleet.lockdown")

        def plan(txn: Txn) -> dict[str, Any]:
            self._check_site(site)
            if self.is_locked_down(site):
                raise ApiError(409, "locked_down", f"site {site} is locked down: unlock it first")
            if self._meta(ESCROW_PREFIX + site) is None:
                raise ApiError(409, "no_escrow", f"the hub holds no unseal key of site {site}")
            approval = {"approved_at": txn.now, "expires_at": txn.now + UNSEAL_APPROVAL_S,
                        "by": token.id}  # fmt: skip
            txn.put("meta", UNSEAL_PREFIX + site, approval)
            self.audit(token, "site.unseal.approve", None, "site", site)
            return {"site": site, **approval}

        return await self.ledger.transact(plan)

    def escrow_key_info(self, site: str) -> dict[str, Any]:
        """``GET /v1/link/escrow-key``: the escrow key signed by the fleet root key, and
        what the hub holds for this site."""
        public = self.keys.escrow_public_hex
        root = self.ledger.signing_keys[0]
        escrow = self._meta(ESCROW_PREFIX + site)
        return {
            "public_key": public,
            "signature": sign_escrow_key(root, public),
            "signed_by": bytes(root.verify_key).hex(),
            "escrowed": None if escrow is None else escrow["ssk_public"],
            "unseal_approved": approval_valid(self._meta(UNSEAL_PREFIX + site), self.ledger.now()),
            "locked_down": self.is_locked_down(site),
        }

    async def upload_escrow(self, site: str, data: object) -> dict[str, Any]:
        blob, ssk = parse_escrow_upload(data, self.keys.escrow)

        def plan(txn: Txn) -> dict[str, Any] | None:
            if self.is_locked_down(site):
                self.audit(None, "site.escrow", None, "site", site, "refused 409", "locked_down")
                return None
            wrapped = wrap(self.keys.master, escrow_context(site), blob)
            txn.put("meta", ESCROW_PREFIX + site,
                    {"wrapped": b64(wrapped), "ssk_public": ssk, "at": txn.now})  # fmt: skip
            self.audit(None, "site.escrow", None, "site", site, detail=f"ssk {ssk[:16]}")
            return {"site": site, "escrowed": ssk}

        answer = await self.ledger.transact(plan)
        if answer is None:
            raise ApiError(409, "locked_down", f"site {site} is locked down")
        return answer

    async def unseal_request(self, site: str, ephemeral: bytes) -> dict[str, Any]:
        def plan(txn: Txn) -> tuple[dict[str, Any] | None, ApiError | None]:
            refusal = None
            if self.is_locked_down(site):
                refusal = ApiError(409, "locked_down", f"site {site} is locked down")
            elif not approval_valid(self._meta(UNSEAL_PREFIX + site), txn.now):
                why = "no operator approved an unseal of this site (within 10 min)"
                refusal = ApiError(403, "unseal_not_approved", why)
            escrow = self._meta(ESCROW_PREFIX + site)
            if refusal is None and escrow is None:
                refusal = ApiError(409, "no_escrow", "the hub holds no unseal key of this site")
            if refusal is not None:
                outcome = f"refused {refusal.status}"
                self.audit(None, "site.unseal", None, "site", site, outcome, refusal.code)
                return None, refusal
            blob = unwrap(
                self.keys.master, escrow_context(site), base64.b64decode(escrow["wrapped"])
            )
            kek = open_sealed(self.keys.escrow, blob)
            txn.delete("meta", UNSEAL_PREFIX + site)  # one unseal per approval
            self.audit(None, "site.unseal", None, "site", site, detail="unseal key sent")
            return {"sealed_key": b64(seal(ephemeral, kek))}, None

        answer, refusal = await self.ledger.transact(plan)
        if refusal is not None:
            raise refusal
        assert answer is not None
        return answer

    def site_view(self, site: str) -> dict[str, Any]:
        """The secrets part of ``GET /v1/sites/{id}``."""
        report = self._report(site) or {}
        state = report.get("secrets_state") or {}
        lock = self._meta(LOCK_PREFIX + site)
        escrow = self._meta(ESCROW_PREFIX + site)
        approval = self._meta(UNSEAL_PREFIX + site)
        return {
            "locked_down": locked_down(lock, report),
            "lockdown": lock,
            "reported_locked_down": state.get("locked_down"),
            "sealed": state.get("sealed"),
            "initialized": state.get("initialized"),
            "public_key": report.get("secrets_public_key"),
            "escrowed": None if escrow is None else escrow["ssk_public"],
            "unseal_approved_until": (
                approval["expires_at"] if approval_valid(approval, self.ledger.now()) else None
            ),
        }
