"""Sites: registration, enrollment, labels, decommission and deletion, reports, fleet views.

``Sites`` owns the ``sites`` database: a site is registered with its public key or an
enrollment token (single use, ``enroll``), reports its state over its link
(``record_report``, kept by ``central_hub.reports``) and is seen by operators through the
fleet view (``central_hub.fleetview``: ``list_sites``, ``get_site``). Deleting a site takes
it out of every deployment (``central_hub.deployments``); a decommissioned site that says
it is done is forgotten. ``gossip_info`` is the site's gossip certificate (the hub's
gossip member, ``central_hub.gossip``, when it runs).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from central_hub import fleetview, interlock, tokens
from central_hub.deployments import Deployments
from central_hub.errors import ApiError
from central_hub.gossip import HubGossip
from central_hub.ledger import Ledger, Txn
from central_hub.model import DEFAULT_TENANT, is_id
from central_hub.paging import Selector, scan_bound
from central_hub.reports import Reports
from central_hub.store import Store
from central_hub.tokens import TokenRecord
from meshorch.fleet.delta import Target
from meshorch.fleet.gossip import HUB_ID

logger = logging.getLogger(__name__)

ENROLL_PREFIX = "mhe_"
MAX_PREVIOUS_KEYS = 32  # keys a site rotated away from, refused as its next key


def site_or_none(store: Store, site_id: str) -> dict[str, Any] | None:
    return store.get_json("sites", site_id) if is_id(site_id) else None


def require_site(store: Store, site_id: str) -> dict[str, Any]:
    """The site's record; 404 ``not_found`` when it is not registered."""
    record = site_or_none(store, site_id)
    if record is None:
        raise ApiError(404, "not_found", f"no site {site_id!r}")
    return dict(record)


@dataclass(frozen=True, slots=True)
class SiteTimes:
    """How long an enrollment token holds, when a silent site is stale, and how long a
    rejection stays in a site's view (``HubConfig``'s settings of the same names)."""

    enroll_ttl_s: float
    site_stale_s: float
    rejection_window_s: float


def _no_secrets(site_id: str) -> dict[str, Any]:
    return {}


def _no_gossip() -> HubGossip | None:
    return None


class Sites:
    """The fleet's sites (see the module docstring). ``secrets`` gives the secrets part
    of a site's detail (``VaultService.site_view``); ``gossip`` the hub's gossip member
    while it runs."""

    def __init__(
        self,
        ledger: Ledger,
        reports: Reports,
        deployments: Deployments,
        times: SiteTimes,
        *,
        secrets: Callable[[str], dict[str, Any]] = _no_secrets,
        gossip: Callable[[], HubGossip | None] = _no_gossip,
    ) -> None:
        self.ledger = ledger
        self.reports = reports
        self.deployments = deployments
        self.times = times
        self.secrets = secrets
        self.gossip = gossip
        # Called with a site's id once a change of it is committed (registered, labels,
        # key, decommission, deleted): placement's labels, the vault and the alerts update.
        self.listeners: list[Callable[[str], None]] = [deployments.site_changed]

    def _changed(self, txn: Txn, site_id: str) -> None:
        def notify() -> None:
            for listener in self.listeners:
                listener(site_id)

        txn.after.append(notify)

    def site(self, site_id: str) -> dict[str, Any]:
        """The site's record; 404 when it is not registered."""
        return require_site(self.ledger.store, site_id)

    def site_public_key(self, site_id: str) -> str | None:
        record = site_or_none(self.ledger.store, site_id)
        return None if record is None else record.get("public_key")

    # -- changes --------------------------------------------------------------------------

    async def register_site(
        self, site_id: str, labels: Mapping[str, str], public_key: str | None
    ) -> dict[str, Any]:
        def plan(txn: Txn) -> dict[str, Any]:
            if self.ledger.store.get_json("sites", site_id) is not None:
                raise ApiError(409, "site_exists", f"site {site_id!r} is registered")
            record: dict[str, Any] = {
                "id": site_id,
                "labels": dict(labels),
                "public_key": public_key,
                "enroll_hash": None,
                "enroll_expires_at": None,
                "created_at": txn.now,
            }
            answer: dict[str, Any] = {"id": site_id, "labels": dict(labels)}
            if public_key is None:
                secret = os.urandom(24).hex()
                record["enroll_hash"] = tokens.hash_secret(secret)
                record["enroll_expires_at"] = txn.now + self.times.enroll_ttl_s
                answer["enroll_token"] = ENROLL_PREFIX + secret
                answer["enroll_expires_at"] = record["enroll_expires_at"]
            answer["public_key"] = public_key
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None)
            self._changed(txn, site_id)
            return answer

        return await self.ledger.transact(plan)

    async def set_site_labels(self, site_id: str, labels: Mapping[str, str]) -> dict[str, Any]:
        def plan(txn: Txn) -> dict[str, Any]:
            record = self.site(site_id)
            record["labels"] = dict(labels)
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "labels")
            self._changed(txn, site_id)
            return {"id": site_id, "labels": dict(labels)}

        return await self.ledger.transact(plan)

    async def delete_site(self, site_id: str) -> None:
        def plan(txn: Txn) -> None:
            self.site(site_id)
            txn.delete("sites", site_id)
            txn.changed("site", site_id, None, "deleted")
            self._changed(txn, site_id)
            if self.ledger.store.get_json("reports", site_id) is not None:
                txn.delete("reports", site_id)
            self.deployments.drop_site(txn, site_id)

            def forget_report() -> None:
                self.reports.forget(site_id)
                gossip = self.gossip()
                if gossip is not None:
                    gossip.forget(site_id)

            txn.after.append(forget_report)

        await self.ledger.transact(plan)

    async def enroll(self, site_id: str, public_key: str, token: str) -> None:
        def plan(txn: Txn) -> None:
            record = site_or_none(self.ledger.store, site_id)
            expected = None if record is None else record.get("enroll_hash")
            secret = token[len(ENROLL_PREFIX) :] if token.startswith(ENROLL_PREFIX) else ""
            matches = hmac.compare_digest(
                tokens.hash_secret(secret).encode(), str(expected or "-" * 64).encode()
            )
            if record is None or expected is None or not matches or not secret:
                raise ApiError(403, "bad_enroll_token", "unknown, used or wrong enrollment token")
            if txn.now >= float(record["enroll_expires_at"]):
                raise ApiError(403, "bad_enroll_token", "the enrollment token has expired")
            record.update(public_key=public_key, enroll_hash=None, enroll_expires_at=None)
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "enrolled")
            self._changed(txn, site_id)

        await self.ledger.transact(plan)

    async def rotate_key(self, site_id: str, signer: str, new_key: str) -> dict[str, Any]:
        """Bind ``new_key`` to the site in place of ``signer``, the key the request was
        verified with (checked again under the ledger's lock: two rotations signed by the
        same key cannot both win). A rotation to the key already held answers success and
        changes nothing; one back to a key the site had is refused."""

        def plan(txn: Txn) -> dict[str, Any]:
            record = self.site(site_id)
            current = record.get("public_key")
            if current != signer:
                raise ApiError(401, "bad_site_signature", "the site's key changed meanwhile")
            if new_key == current:
                return {"site": site_id, "public_key": current, "rotated": False}
            previous = [str(k) for k in record.get("previous_keys", [])]
            if new_key in previous:
                raise ApiError(409, "key_reused", "the site had this key before")
            record.update(
                public_key=new_key,
                previous_keys=[*previous, current][-MAX_PREVIOUS_KEYS:],
                key_rotated_at=txn.now,
                key_rotations=int(record.get("key_rotations", 0)) + 1,
            )
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, f"key rotated to {new_key[:16]}")
            self._changed(txn, site_id)
            return {"site": site_id, "public_key": new_key, "rotated": True}

        answer = await self.ledger.transact(plan)
        if answer["rotated"]:
            logger.warning("site %s rotated its key to %s", site_id, new_key[:16])
        return answer

    async def set_key(self, site_id: str, public_key: str) -> dict[str, Any]:
        """An operator binds the site's key (``PUT /v1/sites/{id}/key``): to take a site back
        from whoever rotated its key first. Keys the site had before are refused."""

        def plan(txn: Txn) -> dict[str, Any]:
            record = self.site(site_id)
            current = record.get("public_key")
            if public_key == current:
                return {"site": site_id, "public_key": current, "rotated": False}
            previous = [str(k) for k in record.get("previous_keys", [])]
            if public_key in previous:
                raise ApiError(409, "key_reused", "the site had this key before")
            if current is not None:
                previous.append(current)
            record.update(
                public_key=public_key,
                previous_keys=previous[-MAX_PREVIOUS_KEYS:],
                enroll_hash=None,
                enroll_expires_at=None,
                key_rotated_at=txn.now,
                key_rotations=int(record.get("key_rotations", 0)) + 1,
            )
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, f"key set by an operator to {public_key[:16]}")
            self._changed(txn, site_id)
            return {"site": site_id, "public_key": public_key, "rotated": True}

        return await self.ledger.transact(plan)

    async def decommission_site(
        self, token: TokenRecord, site_id: str, confirm: int | None = None
    ) -> dict[str, Any]:
        """Send ``site.decommission``: the site stops its work and wipes its secrets, then
        says so in a report, and the hub forgets it (``record_report``). The deletion
        interlock holds for the applications it stops (``central_hub.interlock``)."""
        tokens.authorize(token, "sites.delete")

        def plan(txn: Txn) -> dict[str, Any]:
            record = self.site(site_id)
            apps = {a["name"]: a for a in self.ledger.store.values_json("apps")}
            running = [name for name, app in apps.items() if site_id in app["sites"]]
            confirmed = self.deployments.confirm_removals(
                {site_id: running} if running else {},
                confirm,
                f"decommissioning {site_id}",
                emptying_counts=False,
                apps=apps,
            )
            op = interlock.stamp({"op": "site.decommission"}, confirmed)
            version = txn.delta([op], Target(sites=frozenset({site_id})))
            record["decommission"] = {"delta": version, "requested_at": txn.now}
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "decommissioning")
            self._changed(txn, site_id)
            return {"site": site_id, "delta": version, "state": "requested"}

        return await self.ledger.transact(plan)

    async def record_report(self, site_id: str, report: dict[str, Any]) -> int:
        """Keep a site's report; the answer is the head of the delta log."""
        ending = report.get("decommission")
        if (
            ending
            and ending["state"] == "done"
            and (record := site_or_none(self.ledger.store, site_id))
            and record.get("decommission")
        ):  # the site's record read only then: a report is taken thousands of times a second
            logger.warning("site %s is decommissioned: forgetting it", site_id)
            await self.delete_site(site_id)
            return self.ledger.head.version
        await self.reports.record(site_id, report)
        return self.ledger.head.version

    # -- the fleet view -------------------------------------------------------------------

    def _gossip_of(self, site_id: str) -> tuple[dict[str, Any], float] | None:
        gossip = self.gossip()
        return None if gossip is None else gossip.summary_of(site_id)

    def _summary(
        self, site: Mapping[str, Any], now: float, visible: set[str] | None
    ) -> dict[str, Any]:
        t = self.times
        return fleetview.site_summary(
            site,
            *self.reports.view_args(site["id"]),
            now,
            t.site_stale_s,
            t.rejection_window_s,
            gossip=self._gossip_of(site["id"]),
            visible_apps=visible,
        )

    def list_sites(self, token: TokenRecord | None = None) -> list[dict[str, Any]]:
        """Every site's summary; a tenant token's ``counts`` cover its tenant's apps only
        (None: the hub's own, fleet-wide view). O(sites): for the metrics' scrape; the
        API pages (``page_sites``)."""
        now = self.ledger.now()
        visible = None if token is None else self._visible_apps(token)
        return [
            self._summary(site, now, visible) for site in self.ledger.store.values_json("sites")
        ]

    def page_sites(
        self, token: TokenRecord, after: str | None, limit: int, selector: Selector
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of ``GET /v1/sites`` (``central_hub.paging``): the summaries of at most
        ``limit`` sites after id ``after`` whose labels match ``selector``, and the last
        id read (None: no site follows)."""
        now = self.ledger.now()
        visible = self._visible_apps(token)
        found, last = self.ledger.store.page(
            "sites", after, lambda site: selector.matches(site["labels"]), limit, scan_bound(limit)
        )
        return [self._summary(site, now, visible) for site in found], last

    def summary(self, site_id: str) -> dict[str, Any] | None:
        """One site's fleet-wide summary (None: not registered), for the alerts."""
        site = site_or_none(self.ledger.store, site_id)
        return None if site is None else self._summary(site, self.ledger.now(), None)

    def site_ids(self) -> list[str]:
        return self.ledger.store.keys("sites")

    def _visible_apps(self, token: TokenRecord) -> set[str] | None:
        """The applications a tenant token sees at sites (None: a fleet token, all)."""
        if tokens.is_fleet(token):
            return None
        return {
            app["name"]
            for app in self.ledger.store.values_json("apps")
            if tokens.reaches(token, app.get("tenant", DEFAULT_TENANT))
        }

    def get_site(self, token: TokenRecord, site_id: str) -> dict[str, Any]:
        """One site. A tenant token sees the site's health, and of its hosts' instances and
        apps only those of its tenant's applications (no gossip summary, no rejections)."""
        mine = self._visible_apps(token)
        detail = self._site_detail(site_id, mine)
        if mine is None:
            return detail
        detail["apps"] = {k: v for k, v in detail["apps"].items() if k in mine}
        for host in detail["hosts"]:
            host["instances"] = [i for i in host["instances"] if i["app"] in mine]
        detail.update(gossip=None, rejections=[])
        return detail

    def _site_detail(self, site_id: str, visible: set[str] | None) -> dict[str, Any]:
        t = self.times
        detail = fleetview.site_detail(
            self.site(site_id),
            *self.reports.view_args(site_id),
            self.ledger.now(),
            t.site_stale_s,
            t.rejection_window_s,
            gossip=self._gossip_of(site_id),
            visible_apps=visible,
        )
        gossip = self.gossip()
        if gossip is not None:
            detail["gossip_member"] = gossip.member_state(site_id)
        detail["secrets"] = self.secrets(site_id)
        return detail

    def gossip_info(self, site_id: str) -> dict[str, Any]:
        """``GET /v1/link/gossip`` for an authenticated site."""
        gossip = self.gossip()
        if gossip is None:
            raise ApiError(404, "gossip_disabled", "this hub does not gossip")
        if site_id == HUB_ID:
            raise ApiError(409, "reserved_id", f"{HUB_ID!r} is the hub's gossip id")
        key = self.site_public_key(site_id)
        if key is None:  # deleted since the request was verified
            raise ApiError(404, "not_found", f"no site {site_id!r}")
        return gossip.certificate_for(site_id, key)
