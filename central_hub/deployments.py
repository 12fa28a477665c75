"""Applications and their deployments (the ``apps`` and ``deployments`` databases).

``Deployments`` places an application version (``central_hub.placement``), starts a
deployment wave by wave (``central_hub.waves``, the pure state machine) and appends the
``app.put``/``app.delete`` deltas; ``advance``, run by the hub's driver in a transaction,
steps every running deployment from the sites' reports (``central_hub.reports``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from central_hub import fleetview, interlock, placement, tokens, waves
from central_hub.accounts import Accounts
from central_hub.errors import ApiError, InputProblems
from central_hub.ledger import Ledger, Txn
from central_hub.model import DEFAULT_TENANT, is_id, plain_key
from central_hub.paging import scan_bound
from central_hub.reports import Reports
from central_hub.store import Store
from central_hub.tokens import TokenRecord
from meshorch.apps.spec import AppSpec, foreign_secrets, to_json
from meshorch.fleet.delta import Target

logger = logging.getLogger(__name__)


# A change of a running deployment's progress alone is written at most this often.
PROGRESS_WRITE_S = 1.0


@dataclass(slots=True)
class _Working:
    """A running deployment as the driver steps it: the stored records it was read from
    (raw, to tell when they change) and its progress since (maybe not written yet)."""

    app_raw: bytes
    app: dict[str, Any]
    dep_raw: bytes
    dep: waves.Deployment
    written_at: float  # when the stored record was read (written by the last step)
    fresh: bool = True  # no step since it was read: every site of the wave is looked at
    # ``dep``'s current wave has just started (every site of it updating): of a fresh copy,
    # only the sites that report the deployed version are looked at.
    wave_started: bool = False
    unwritten: bool = False  # ``dep`` has progress the stored record has not
    current_wave: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.current_wave:
            self.current_wave = frozenset(self.dep.waves[self.dep.wave])


def name_unavailable(name: str) -> ApiError:
    """A new app's name that another tenant holds: 409 ``app_exists``, worded the same
    whoever holds it and naming nobody (the tenant's own app would be updated instead)."""
    return ApiError(409, "app_exists", f"the application name {name!r} is not available")


class Deployments:
    """Applications, deployments and the rollout step (see the module docstring).
    ``on_activate`` is called when a deployment starts (the hub wakes its driver)."""

    def __init__(
        self,
        ledger: Ledger,
        accounts: Accounts,
        reports: Reports,
        wave_timeout_s: float,
        on_activate: Callable[[], None] | None = None,
        thresholds: interlock.Thresholds | None = None,
    ) -> None:
        self.ledger = ledger
        self.accounts = accounts
        self.reports = reports
        self.wave_timeout_s = wave_timeout_s
        self.on_activate = on_activate
        self.thresholds = thresholds or interlock.Thresholds()  # of the deletion interlock
        self.active: set[str] = set()  # apps whose current deployment may be running
        # The running deployments as the driver last stepped them, and the sites that
        # reported since (``advance``).
        self._working: dict[str, _Working] = {}
        self._reported_sites: set[str] = set()
        # The sites whose latest report lists an app at a version ((app, version) -> sites):
        # built by ``warm`` (or when a wave first starts), then kept up to date by the
        # reports, O(apps) each.
        self._reporting: dict[tuple[str, str], set[str]] | None = None
        reports.listeners.append(self._reported)
        # Every registered site's labels, for placement: read by ``warm`` (or at the first
        # deployment), then kept up to date by the sites' changes (``site_changed``), O(1) each.
        self._labels: dict[str, Mapping[str, str]] | None = None

    def restore(self, store: Store) -> None:
        self.active = set(store.keys("apps"))  # narrowed by the first rollout step

    def warm(self) -> None:
        """Build the sites' labels and the index of reported versions now, before the hub
        serves: O(sites) each (3,000 sites: 6 and 14 ms), else paid by the first deployment's
        request and the driver's first step of it. Both are kept up to date from then on."""
        self.site_labels()
        self._reported_versions()

    def site_changed(self, site: str) -> None:
        """A site was registered, changed or deleted (``Sites.listeners``)."""
        if self._labels is None:
            return
        record = self.ledger.store.get_json("sites", site)
        if record is None:
            self._labels.pop(site, None)
        else:
            self._labels[site] = record["labels"]

    def site_labels(self) -> Mapping[str, Mapping[str, str]]:
        """Every registered site's labels (site id -> labels)."""
        if self._labels is None:
            records = self.ledger.store.values_json("sites")
            self._labels = {site["id"]: site["labels"] for site in records}
        return self._labels

    def _activate(self, app: str) -> None:
        self.active.add(app)
        if self.on_activate is not None:
            self.on_activate()

    # -- reading --------------------------------------------------------------------------

    def deployment_or_none(self, deployment_id: str | None) -> waves.Deployment | None:
        if deployment_id is None:
            return None
        raw = self.ledger.store.get_json("deployments", deployment_id)
        return None if raw is None else waves.Deployment.from_json(raw)

    def _app(self, token: TokenRecord, name: str, action: str = "apps.read") -> dict[str, Any]:
        app = self.ledger.store.get_json("apps", name) if is_id(name) else None
        what = f"application {name!r}"
        if app is None:
            raise ApiError(404, "not_found", f"no {what}")
        app.setdefault("tenant", DEFAULT_TENANT)
        tokens.authorize(token, action, app["tenant"], what=what)
        return dict(app)

    def _status(self, site: str, app: str) -> waves.AppStatus | None:
        return fleetview.app_status(self.reports.latest(site), app)

    def _statuses(
        self, dep: waves.Deployment, sites: Collection[str]
    ) -> dict[str, waves.AppStatus | None]:
        """The sites' statuses of ``dep``'s app for a step; a report of another version is
        as good as none to it (the site is updating), and is not decoded."""
        latest, app, version = self.reports.latest, dep.app, dep.version
        statuses: dict[str, waves.AppStatus | None] = {}
        for site in sites:
            report = latest(site)
            status = None if report is None else report["apps"].get(app)
            if status is not None and str(status["version"]) == version:
                statuses[site] = fleetview.app_status(report, app)
            else:
                statuses[site] = None
        return statuses

    def list_apps(self, token: TokenRecord, tenant: str | None = None) -> list[dict[str, Any]]:
        return self.page_apps(token, tenant, None, 2**62)[0]

    def page_apps(
        self, token: TokenRecord, tenant: str | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of ``GET /v1/apps`` (``central_hub.paging``): the token's tenant's
        applications (of ``tenant`` only, when given) after name ``after``, and the last
        name read (None: nothing follows)."""

        def mine(app: dict[str, Any]) -> bool:
            owner = app.setdefault("tenant", DEFAULT_TENANT)
            return tokens.reaches(token, owner) and tenant in (None, owner)

        apps, last = self.ledger.store.page("apps", after, mine, limit, scan_bound(limit))
        found = []
        for app in apps:
            # Its id and state only: not the progress of each of its sites.
            dep_id = app["deployment"]
            dep = None if dep_id is None else self.ledger.store.get_json("deployments", dep_id)
            found.append(
                {
                    "name": app["name"],
                    "tenant": app["tenant"],
                    "version": app["version"],
                    "digest": app["digest"],
                    "deployment": None if dep is None else {"id": dep["id"], "state": dep["state"]},
                    "sites": app["sites"],
                }
            )
        return found, last

    def get_app(self, token: TokenRecord, name: str) -> dict[str, Any]:
        app = self._app(token, name)
        dep = self.deployment_or_none(app["deployment"])
        sites = sorted(set(app["sites"]) | set(() if dep is None else dep.sites))
        status = {}
        for site in sites:
            found = self._status(site, name)
            status[site] = (
                None
                if found is None
                else {"version": found.version, "state": found.state, "message": found.message}
            )
        return {
            "name": app["name"],
            "tenant": app["tenant"],
            "version": app["version"],
            "digest": app["digest"],
            "spec": app["spec"],
            "placement": app["placement"],
            "deployment": None if dep is None else dep.to_json(),
            "sites": status,
        }

    def get_deployment(self, token: TokenRecord, deployment_id: str) -> dict[str, Any]:
        dep = self.deployment_or_none(deployment_id) if plain_key(deployment_id) else None
        what = f"deployment {deployment_id!r}"
        if dep is None:
            raise ApiError(404, "not_found", f"no {what}")
        tokens.authorize(token, "apps.read", dep.tenant, what=what)
        return dep.to_json()

    # -- changes --------------------------------------------------------------------------

    def _issue_wave(
        self, txn: Txn, app: dict[str, Any], dep: waves.Deployment, sites: Sequence[str]
    ) -> waves.Deployment:
        """Append the app.put delta of a wave; records which sites now have the app."""
        if not sites:
            return dep
        op = {"op": "app.put", "spec": app["spec"], "tenant": app.get("tenant", DEFAULT_TENANT)}
        version = txn.delta([op], Target(sites=frozenset(sites)))
        known = set(app["sites"])
        new = [site for site in dict.fromkeys(sites) if site not in known]
        if new:  # both runs sorted: the sort merges them in O(sites)
            app["sites"] = sorted([*app["sites"], *new])
        txn.put("apps", app["name"], app)
        return replace(dep, deltas=(*dep.deltas, version))

    @staticmethod
    def owner(token: TokenRecord, tenant: str | None) -> str:
        """The tenant a new app of ``token`` belongs to: ``tenant`` when given (a tenant
        token may give only its own: 403 ``field_not_allowed``), else the token's
        (``default`` for a fleet-wide token)."""
        if tenant is None:
            return DEFAULT_TENANT if tokens.is_fleet(token) else token.tenant
        if not tokens.reaches(token, tenant):
            raise tokens.field_not_permitted(
                ["tenant"], f"a token of tenant {token.tenant!r} deploys to that tenant only"
            )
        return tenant

    def confirm_removals(
        self,
        losing: Mapping[str, Collection[str]],
        confirm: int | None,
        what: str,
        *,
        tenant: str | None = None,
        emptying_counts: bool = True,
        apps: Mapping[str, dict[str, Any]] | None = None,
    ) -> int | None:
        """In a transaction's plan, before its writes: the deletion interlock for a change
        that stops the applications ``losing`` (site -> names) holds, or 409
        (``central_hub.interlock``); the ``confirmed`` stamp for its operations.
        ``emptying_counts``: a site left running nothing needs confirming (not for a
        decommission, whose purpose it is), counting the apps of ``tenant`` only if given
        (the caller's, for a tenant token). ``apps``: every application by name, when the
        caller has read them already."""
        if not losing and confirm is None:
            return None
        if apps is None:
            apps = {app["name"]: app for app in self.ledger.store.values_json("apps")}
        if tenant is not None:
            apps = {n: a for n, a in apps.items() if a.get("tenant", DEFAULT_TENANT) == tenant}
        by_app: dict[str, set[str]] = {}
        for site, names in losing.items():
            for name in names:
                by_app.setdefault(name, set()).add(site)
        removals = [
            interlock.Removal(name, frozenset(sites), len(apps.get(name, {}).get("sites", ())))
            for name, sites in by_app.items()
        ]
        emptied = (
            interlock.left_empty(losing, ((n, a["sites"]) for n, a in apps.items()))
            if emptying_counts
            else frozenset()
        )
        assessment = interlock.assess(removals, emptied, self.thresholds, tenant or "")
        return interlock.confirmation(assessment, confirm, what)

    async def deploy(
        self,
        token: TokenRecord,
        spec: AppSpec,
        digest: str,
        policy: placement.Policy,
        tenant: str | None,
        confirm: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Start a deployment; (202, deployment), or (200, the same one) when repeated.

        Refused before anything is read: 400 ``foreign_secret`` when the spec references a
        secret of another tenant (``spec`` was parsed for ``tenant``: see ``owner``).
        A name held by another tenant answers 409 ``app_exists`` naming nobody: names
        are one namespace at the sites (docs/tenants.md)."""
        tenant = self.owner(token, tenant)
        tokens.authorize(token, "apps.write", tenant)
        problems = foreign_secrets(spec, tenant)
        if problems:
            raise InputProblems("foreign_secret", "the application spec", problems)
        store = self.ledger.store

        def plan(txn: Txn) -> tuple[int, dict[str, Any]]:
            self.accounts.require_tenant(tenant)
            app = store.get_json("apps", spec.name)
            if app is not None:
                if app.get("tenant", DEFAULT_TENANT) != tenant:
                    raise name_unavailable(spec.name)
                known = app["versions"].get(spec.version)
                if known is not None and known != digest:
                    raise ApiError(
                        409,
                        "version_exists",
                        f"version {spec.version!r} of {spec.name!r} was deployed with another "
                        "spec: give the changed spec a new version",
                    )
            current = None if app is None else self._current(spec.name, app["deployment"])
            if (
                current is not None
                and current.digest == digest
                and dict(current.placement) == policy.to_json()
                and current.state in ("running", "succeeded")
            ):
                return 200, current.to_json()
            targets = placement.select(policy, self.site_labels())
            seq = int(store.get_json("meta", "deployment_seq") or 0) + 1
            dep_id = f"dep-{seq}"
            dep, first = waves.start(
                dep_id,
                spec.name,
                spec.version,
                digest,
                tenant,
                policy.to_json(),
                placement.plan_waves(targets, policy.max_parallel),
                txn.now,
            )
            if current is not None and current.state == "running":
                old = waves.supersede(current, f"superseded by {dep_id}", txn.now)
                txn.put("deployments", old.id, old.to_record())
            had = set() if app is None else set(app["sites"])
            removed = sorted(had - set(targets))
            gone = set(removed)
            confirmed = self.confirm_removals(
                {site: (spec.name,) for site in removed},
                confirm,
                f"this placement of {spec.name}",
                tenant=None if tokens.is_fleet(token) else tenant,
            )
            record = {
                "name": spec.name,
                "tenant": tenant,
                "version": spec.version,
                "digest": digest,
                "spec": to_json(spec),
                "placement": policy.to_json(),
                "deployment": dep_id,
                "sites": [] if app is None else sorted(s for s in app["sites"] if s not in gone),
                "versions": {**({} if app is None else app["versions"]), spec.version: digest},
                "created_at": txn.now if app is None else app["created_at"],
                "updated_at": txn.now,
            }
            txn.put("apps", spec.name, record)
            dep = self._issue_wave(txn, record, dep, first)
            if removed:
                op = interlock.stamp({"op": "app.delete", "name": spec.name}, confirmed)
                version = txn.delta([op], Target(sites=frozenset(removed)))
                dep = replace(dep, deltas=(*dep.deltas, version))
            answer = dep.to_json()
            dep_raw = orjson.dumps(dep.to_record())
            txn.put("deployments", dep_id, orjson.Fragment(dep_raw))
            txn.put("meta", "deployment_seq", seq)
            confirmation = "" if confirmed is None else f", confirmed: stops at {confirmed} site(s)"
            txn.changed(
                "app", spec.name, tenant, f"deployment {dep_id} of {spec.version}{confirmation}"
            )
            if dep.state == "running":
                # The driver steps this copy (every site of the wave first): nothing to read.
                work = _Working(
                    orjson.dumps(record), record, dep_raw, dep, txn.now, wave_started=True
                )
                txn.after.append(lambda: self._working.__setitem__(spec.name, work))
            txn.after.append(lambda: self._activate(spec.name))
            return 202, answer

        return await self.ledger.transact(plan)

    async def delete_app(
        self, token: TokenRecord, name: str, confirm: int | None = None
    ) -> dict[str, Any]:
        def plan(txn: Txn) -> dict[str, Any]:
            app = self._app(token, name, "apps.delete")
            losing = {site: (name,) for site in app["sites"]}
            whose = None if tokens.is_fleet(token) else app["tenant"]
            confirmed = self.confirm_removals(losing, confirm, f"deleting {name}", tenant=whose)
            dep = self._current(name, app["deployment"])
            if dep is not None and dep.state == "running":
                old = waves.supersede(dep, "application deleted", txn.now)
                txn.put("deployments", old.id, old.to_record())
            version = None
            if app["sites"]:
                op = {"op": "app.delete", "name": name, "tenant": app["tenant"]}
                op = interlock.stamp(op, confirmed)
                version = txn.delta([op], Target(sites=frozenset(app["sites"])))
            txn.delete("apps", name)
            confirmation = "" if confirmed is None else f", confirmed: {confirmed} site(s)"
            txn.changed("app", name, app["tenant"], f"deleted{confirmation}")
            return {"deleted": name, "delta": version, "sites": app["sites"]}

        return await self.ledger.transact(plan)

    def drop_site(self, txn: Txn, site_id: str) -> None:
        """In ``txn``: a deleted site leaves every deployment and application."""
        for app in self.ledger.store.values_json("apps"):
            dep = self._current(app["name"], app["deployment"])
            if dep is not None and site_id in dep.progress:
                dep, issue = waves.drop_site(dep, site_id, txn.now)
                dep = self._issue_wave(txn, app, dep, issue)
                txn.put("deployments", dep.id, dep.to_record())
            if site_id in app["sites"]:
                app["sites"] = [s for s in app["sites"] if s != site_id]
                txn.put("apps", app["name"], app)

    def _reported(
        self, site: str, previous: Mapping[str, Any] | None, report: Mapping[str, Any]
    ) -> None:
        if self._working:
            self._reported_sites.add(site)
        if self._reporting is not None:
            self._index_report(self._reporting, site, previous, report)

    @staticmethod
    def _index_report(
        reporting: dict[tuple[str, str], set[str]],
        site: str,
        previous: Mapping[str, Any] | None,
        report: Mapping[str, Any],
    ) -> None:
        if previous is not None:
            for app, status in previous["apps"].items():
                key = (app, str(status["version"]))
                sites = reporting.get(key)
                if sites is not None:
                    sites.discard(site)
                    if not sites:
                        del reporting[key]
        for app, status in report["apps"].items():
            reporting.setdefault((app, str(status["version"])), set()).add(site)

    def _reporting_version(self, dep: waves.Deployment) -> set[str]:
        """The sites whose latest report lists ``dep``'s app at its version (maybe sites
        deleted since, too)."""
        return self._reported_versions().get((dep.app, dep.version), set())

    def _reported_versions(self) -> dict[tuple[str, str], set[str]]:
        if self._reporting is None:
            self._reporting = {}
            for site, report in self.reports.all().items():
                self._index_report(self._reporting, site, None, report)
        return self._reporting

    def _current(self, name: str, deployment_id: str | None) -> waves.Deployment | None:
        """``deployment_or_none``, from the driver's copy while the stored record is the
        one it was read from (or written as): its progress is at least as new."""
        work = self._working.get(name)
        store = self.ledger.store
        if (
            work is not None
            and deployment_id == work.dep.id
            and store.get("deployments", deployment_id.encode()) == work.dep_raw
        ):
            return work.dep
        return self.deployment_or_none(deployment_id)

    def _running(self, name: str, now: float) -> _Working | None:
        """The running deployment of app ``name``, from the working copy while the stored
        records are those it was read from (no decoding: a record of a deployment to
        10,000 sites is about 0.5 MB of JSON), else read again (every site of its
        current wave to be looked at). None: no deployment of the app is running."""
        store = self.ledger.store
        app_raw = store.get("apps", name.encode())
        work = self._working.get(name)
        if work is not None and app_raw == work.app_raw:
            dep_raw = store.get("deployments", work.dep.id.encode())
            if dep_raw == work.dep_raw:
                return work
        self._working.pop(name, None)
        if app_raw is None:
            return None
        app = orjson.loads(app_raw)
        dep_id = app["deployment"]
        dep_raw = None if dep_id is None else store.get("deployments", dep_id.encode())
        if dep_raw is None:
            return None
        dep = waves.Deployment.from_json(orjson.loads(dep_raw))
        if dep.state != "running":
            return None
        work = self._working[name] = _Working(app_raw, app, dep_raw, dep, now)
        return work

    def advance(self, txn: Txn) -> None:
        """In ``txn``: step every running deployment (the hub's driver, every tick).

        O(sites whose report changed) a tick for a deployment whose wave goes on: only
        their progress is computed again, and a change of progress alone (no new wave, no
        end) is written at most every ``PROGRESS_WRITE_S`` (it is derived from the
        reports, which a new leader has again within seconds)."""
        reported, self._reported_sites = self._reported_sites, set()
        try:
            self._advance(txn, reported)
        except Exception:
            self._working.clear()  # the sites that reported are not all stepped: read again
            raise

    def _advance(self, txn: Txn, reported: set[str]) -> None:
        for name in sorted(self.active):
            work = self._running(name, txn.now)
            if work is None:
                self.active.discard(name)
                continue
            dep = work.dep
            current = dep.waves[dep.wave]
            sites: Collection[str] | None = None  # every site of the wave
            if work.fresh and work.wave_started:
                # A site not at the version is updating, as the wave's start left it.
                wave = work.current_wave
                sites = [site for site in self._reporting_version(dep) if site in wave]
            elif not work.fresh and len(reported) <= len(current):
                sites = [site for site in reported if site in work.current_wave]
            work.fresh = False
            statuses = self._statuses(dep, current if sites is None else sites)
            stepped, issue = waves.step(dep, statuses, txn.now, self.wave_timeout_s, sites)
            if stepped is dep and not work.unwritten:
                continue
            moved_on = issue or stepped.state != dep.state or stepped.wave != dep.wave
            if not moved_on and txn.now - work.written_at < PROGRESS_WRITE_S:
                work.dep = stepped  # written with the next change, or in a moment
                work.unwritten = work.unwritten or stepped is not dep
                continue
            app = dict(work.app)
            stepped = self._issue_wave(txn, app, stepped, issue)
            dep_raw = orjson.dumps(stepped.to_record())
            txn.put("deployments", stepped.id, orjson.Fragment(dep_raw))
            if stepped.state != "running":
                self._working.pop(name, None)
                logger.info(
                    "deployment %s of %s: %s %s", dep.id, dep.app, stepped.state, stepped.reason
                )
                continue
            # Kept as written (no decoding next tick; should the commit fail, the stored
            # records differ and are read again).
            app_raw = orjson.dumps(app) if issue else work.app_raw
            same_wave = stepped.wave == dep.wave
            self._working[name] = _Working(
                app_raw,
                app,
                dep_raw,
                stepped,
                txn.now,
                fresh=not same_wave,
                wave_started=not same_wave,
                current_wave=work.current_wave if same_wave else frozenset(),
            )
