"""Each agent makes its runtime run what the replicated state places on its host.

Every tick (a quarter second): start what is placed here and not running (after
making sure its image is here, copied from a site peer if need be), restart
what exited according to the restart policy with exponential backoff, run the
due health probes (a failing liveness probe restarts the container), stop what
is no longer placed here, and report each instance's state into Raft when it
changes. One instance of a service is one container per container of the
service, named ``{instance_id}.{container}``.

Secrets (docs/secrets.md): a container with ``secrets`` gets its secret files
written to tmpfs just before it starts (and removed when it stops); when this host
cannot deliver them (sealed, a secret missing) it is not started and its status
says why. An app gets only its own tenant's secrets: a reference to another tenant's
(in a record stored before the site refused them) keeps the instance from starting.
While the site is locked down nothing is started at all; what runs keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from meshorch.apps.health import (
    BackoffConfig,
    ProbeConfig,
    ProbeKind,
    ProbeState,
    ProbeTracker,
    RestartBackoff,
    probe_exec,
    probe_http,
    probe_tcp,
)
from meshorch.apps.records import (
    INST_PREFIX,
    AppRecord,
    InstanceReport,
    appver_key,
    decode_app,
    decode_placement,
    status_key,
)
from meshorch.apps.scheduler import Placement
from meshorch.apps.spec import ContainerSpec, ExecCheck, HttpCheck, Probe, ServiceSpec
from meshorch.images.service import SiteImages
from meshorch.images.store import OCI, ImageTransferError
from meshorch.runtime import (
    PROCESS_IMAGE,
    InstanceSpec,
    InstanceStatus,
    PortMapping,
    Runtime,
    RuntimeBackendError,
    SpecFile,
)
from meshorch.secrets.keyring import SecretUnavailable
from meshorch.secrets.service import SiteSecrets
from meshorch.state.ports import SiteState
from meshorch.state.tables import APPS_TABLE
from meshorch.streams.capture import LogCapture
from raft import Put
from raft.errors import ProposalError


class ContainerNetwork(Protocol):
    """How an instance joins the site network (``meshorch.net.app_network.AppNetwork``)."""

    def dns_servers(self, runtime: str) -> tuple[str, ...]: ...

    def dns_search(self, runtime: str) -> tuple[str, ...]: ...

    def container_uid(self, runtime: str, tenant: str) -> int | None: ...


logger = logging.getLogger(__name__)

TICK_S = 0.25
# A container that ignores SIGTERM (a busybox httpd as PID 1 does) is killed after this.
STOP_GRACE_S = 2.0
STARTUP = "#startup"  # startup probes are tracked under a suffixed id


@dataclass
class _Container:
    placement: Placement
    service: ServiceSpec
    container: ContainerSpec
    spec: InstanceSpec
    tenant: str  # the app's: the only tenant whose secrets it gets


@dataclass
class _Book:
    """What this host remembers of one container between ticks."""

    backoff: RestartBackoff
    restarts: int = 0
    started_hash: str = ""
    message: str = ""
    gave_up: bool = False


@dataclass
class _Seen:
    facts: tuple[str, bool, bool] = ("", False, False)
    since: float = field(default_factory=time.time)


class HostReconciler:
    def __init__(
        self,
        site: SiteState,
        host_id: str,
        runtime: Runtime,
        *,
        secrets: SiteSecrets,
        images: SiteImages,
        network: ContainerNetwork,
        capture: LogCapture | None,
        clock: Callable[[], float] = time.time,
    ):
        self.site = site
        self.host_id = host_id
        self.runtime = runtime
        self.secrets = secrets
        self.images = images
        self.network = network
        self.capture = capture  # instances' output into the site's streams
        self.clock = clock
        self.probes = ProbeTracker()
        self._books: dict[str, _Book] = {}
        self._seen: dict[str, _Seen] = {}
        self._specs: dict[tuple[str, str], AppRecord] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._swept = False  # secret files left by an earlier run removed

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            while True:
                try:
                    await self.tick()
                except (RuntimeBackendError, ProposalError, OSError) as exc:
                    logger.warning("reconcile: %s", exc)
                except Exception:
                    logger.exception("reconcile tick failed")
                await asyncio.sleep(TICK_S)

    # -- desired ----------------------------------------------------------------------

    def _app_version(self, app: str, version: str) -> AppRecord | None:
        cached = self._specs.get((app, version))
        if cached is None:
            record = self.site.view.get(APPS_TABLE, appver_key(app, version))
            if record is None:
                return None
            cached = self._specs[(app, version)] = decode_app(record.value)
        return cached

    def tenant_of(self, placement: Placement) -> str | None:
        record = self._app_version(placement.app, placement.version)
        return None if record is None else record.tenant

    def desired(self) -> dict[str, _Container]:
        records, _ = self.site.view.scan(APPS_TABLE, INST_PREFIX, 1_000_000)
        wanted: dict[str, _Container] = {}
        for _, record in records:
            placement = decode_placement(record.value)
            if placement.host_id != self.host_id:
                continue
            app = self._app_version(placement.app, placement.version)
            service = app.spec.service(placement.service) if app else None
            if app is None or service is None:
                continue
            for container in service.containers:
                runtime_id = f"{placement.instance_id}.{container.name}"
                spec = self._instance_spec(runtime_id, placement, container, app.tenant)
                wanted[runtime_id] = _Container(placement, service, container, spec, app.tenant)
        return wanted

    def _instance_spec(
        self, runtime_id: str, placement: Placement, container: ContainerSpec, tenant: str
    ) -> InstanceSpec:
        limits = container.resources
        runtime_image = self._image_name(container, tenant)
        image = PROCESS_IMAGE if self.runtime.name == "process" else runtime_image
        secrets = self.secrets
        with_secrets = bool(container.secrets)
        network = self.network
        return InstanceSpec(
            instance_id=runtime_id,
            image=image,
            command=container.command,
            env=dict(container.env),
            ports=tuple(PortMapping(None, p.container_port, p.protocol) for p in container.ports),
            files=tuple(SpecFile(f.path, f.content.encode()) for f in container.files),
            cpu_limit=limits.cpu_limit_millis / 1000 if limits.cpu_limit_millis else None,
            memory_limit_bytes=limits.memory_limit_bytes,
            labels={"app": placement.app, "version": placement.version},
            secrets_dir=str(secrets.instance_dir(runtime_id)) if with_secrets else None,
            secret_env=dict.fromkeys((r.env for r in container.secrets if r.env), "(unset)"),
            secrets_tag=secrets.versions_tag(container.secrets, tenant) if with_secrets else "",
            dns_servers=network.dns_servers(self.runtime.name),
            dns_search=network.dns_search(self.runtime.name),
            user=network.container_uid(self.runtime.name, tenant),
        )

    # -- one tick -----------------------------------------------------------------------

    async def tick(self) -> None:
        if not self.site.status().ready:
            return  # a host catching up must not act on placements that moved away
        wanted = self.desired()
        actual = {s.instance_id: s for s in await self.runtime.list()}
        if not self._swept:
            await asyncio.to_thread(self.secrets.remove_stale, actual)
            self._swept = True
        for runtime_id, status in actual.items():
            if runtime_id not in wanted and runtime_id not in self._retiring:
                # In the background: a slow stop must not delay starting moved instances.
                task = asyncio.create_task(self._retire(runtime_id, status))
                self._retiring[runtime_id] = task
                task.add_done_callback(functools.partial(self._retired, runtime_id))
        started = [
            await self._converge(runtime_id, item, actual.get(runtime_id))
            for runtime_id, item in wanted.items()
        ]
        stopped = await self._run_probes(wanted)
        if any(started) or stopped:  # list again only when this tick changed something
            actual = {s.instance_id: s for s in await self.runtime.list()}
        self._capture_logs(wanted, actual)
        await self._report(wanted, actual)

    def _capture_logs(
        self, wanted: dict[str, _Container], actual: dict[str, InstanceStatus]
    ) -> None:
        """Follow the output of every instance here, also those found running at start."""
        capture = self.capture
        if capture is None:
            return
        for runtime_id, item in wanted.items():
            tenant = self.tenant_of(item.placement)
            if runtime_id in actual and tenant is not None:
                capture.follow(runtime_id, tenant, item.placement.app)

    def _retired(self, runtime_id: str, _task: asyncio.Task[None]) -> None:
        self._retiring.pop(runtime_id, None)

    async def _retire(self, runtime_id: str, status: InstanceStatus) -> None:
        logger.info("stopping %s: no longer placed here", runtime_id)
        if status.running:
            await self.runtime.stop(runtime_id, timeout_s=STOP_GRACE_S)
        with contextlib.suppress(RuntimeBackendError):
            await self.runtime.remove(runtime_id)
        if self.capture is not None:
            self.capture.forget(runtime_id)  # after draining what it wrote
        await asyncio.to_thread(self.secrets.remove, runtime_id)
        self.probes.remove(runtime_id)
        self.probes.remove(runtime_id + STARTUP)
        self._books.pop(runtime_id, None)

    def _book(self, runtime_id: str, service: ServiceSpec) -> _Book:
        book = self._books.get(runtime_id)
        if book is None:
            policy = service.restart
            config = BackoffConfig(
                initial_s=policy.backoff_initial_s, max_s=max(policy.backoff_max_s, 0.0)
            )
            book = self._books[runtime_id] = _Book(RestartBackoff(config))
        return book

    async def _converge(
        self, runtime_id: str, item: _Container, status: InstanceStatus | None
    ) -> bool:
        """Start what should run; True when this started (or restarted) something."""
        retiring = self._retiring.get(runtime_id)
        if retiring is not None:  # placed here again while being stopped: let it finish
            with contextlib.suppress(Exception):
                await retiring
            status = None
        now = self.clock()
        book = self._book(runtime_id, item.service)
        if status is not None and status.spec_hash == item.spec.spec_hash and status.running:
            return False
        try:  # nothing starts under lock-down, nor without the secrets it needs
            self.secrets.check_deliverable(item.container.secrets, item.tenant)
        except SecretUnavailable as exc:
            book.message = str(exc)
            return False
        if status is not None and status.spec_hash == item.spec.spec_hash:
            # It exited: the restart policy and the backoff decide.
            policy = item.service.restart.policy
            if policy == "never" or (policy == "on-failure" and status.exit_code == 0):
                book.gave_up = True
                book.message = f"exited with {status.exit_code}; restart policy {policy}"
                return False
            book.backoff.record_exit(now)
            delay = book.backoff.next_delay_s(now)
            if delay > 0:
                book.message = f"exited with {status.exit_code}; restart in {delay:.1f}s"
                return False
            book.restarts += 1
        if not await self._ensure_image(item, book):
            return False
        spec = item.spec
        if item.container.secrets:
            try:
                env = self.secrets.materialise(
                    runtime_id, item.container.secrets, item.tenant, item.spec.user
                )
            except SecretUnavailable as exc:
                book.message = str(exc)
                return False
            spec = dataclasses.replace(spec, secret_env=env)
        await self.runtime.start(spec)
        book.backoff.record_start(now)
        book.started_hash = item.spec.spec_hash
        book.gave_up = False
        book.message = ""
        self._track_probes(runtime_id, item.container, now)
        logger.info("started %s (%s)", runtime_id, item.placement.version)
        return True

    def _image_name(self, container: ContainerSpec, tenant: str) -> str:
        """What the runtime runs: a pulled image by the digest the site pinned (a new pull
        of the tag changes the spec hash, so the instances move to it), else the spec's."""
        manifest = self.images.find(container.image, tenant)
        return container.image if manifest is None else manifest.runtime_name()

    async def _ensure_image(self, item: _Container, book: _Book) -> bool:
        name = item.spec.image
        if self.runtime.name == "process" or await self.runtime.has_image(name):
            return True
        images = self.images
        ref = item.container.image
        # An image pulled with another tenant's credentials is as good as absent (and the
        # message does not say it exists).
        manifest = images.find(ref, item.tenant)
        if manifest is None:
            book.message = (
                f"image {ref} is not in the site's catalogue (meshorch image add or pull)"
            )
            return False
        try:
            await images.ensure(self._session, manifest)
        except ImageTransferError as exc:
            book.message = f"image {ref} not copied yet: {exc}"
            return False
        if manifest.runtime_name() != name:  # pulled again since this spec was made
            return False
        if manifest.kind == OCI:
            layout = await images.oci_layout(manifest)
            try:
                await self.runtime.load_image(layout, name)
            finally:
                await asyncio.to_thread(shutil.rmtree, layout, True)
        else:
            await self.runtime.load_image(images.blobs.path(manifest.digest), name)
        return True

    def _track_probes(self, runtime_id: str, container: ContainerSpec, now: float) -> None:
        self.probes.remove(runtime_id)
        self.probes.remove(runtime_id + STARTUP)
        probes = container.probes
        for kind, probe, key in (
            (ProbeKind.READINESS, probes.readiness, runtime_id),
            (ProbeKind.LIVENESS, probes.liveness, runtime_id),
            (ProbeKind.READINESS, probes.startup, runtime_id + STARTUP),
        ):
            if probe is not None:
                self.probes.add(key, kind, _probe_config(probe), now)

    # -- probes ---------------------------------------------------------------------------

    def _probe_of(self, key: str, kind: ProbeKind, wanted: dict[str, _Container]) -> Probe | None:
        runtime_id = key.removesuffix(STARTUP)
        item = wanted.get(runtime_id)
        if item is None:
            return None
        probes = item.container.probes
        if key.endswith(STARTUP):
            return probes.startup
        return probes.liveness if kind == ProbeKind.LIVENESS else probes.readiness

    async def _run_probes(self, wanted: dict[str, _Container]) -> bool:
        """Run the due probes; True when a failing liveness probe stopped something."""
        now = self.clock()
        due = self.probes.take_due(now)
        stopped = False
        if not due:
            return stopped

        async def run(key: str, kind: ProbeKind) -> tuple[str, ProbeKind, bool] | None:
            probe = self._probe_of(key, kind, wanted)
            if probe is None:
                return None
            runtime_id = key.removesuffix(STARTUP)
            if kind == ProbeKind.LIVENESS and not self._started(runtime_id):
                return None  # the startup probe holds liveness back
            check = probe.check
            if isinstance(check, HttpCheck):
                ok = await probe_http("127.0.0.1", check.port, check.path, probe.timeout_s)
            elif isinstance(check, ExecCheck):
                ok = await probe_exec(self.runtime, runtime_id, check.command, probe.timeout_s)
            else:
                ok = await probe_tcp("127.0.0.1", check.port, probe.timeout_s)
            return key, kind, ok

        for outcome in await asyncio.gather(*(run(k, kind) for k, kind in due)):
            if outcome is None:
                continue
            key, kind, ok = outcome
            state = self.probes.record(key, kind, ok, self.clock())
            if kind == ProbeKind.LIVENESS and state == ProbeState.FAILING:
                runtime_id = key
                logger.warning("%s failed its liveness probe: restarting it", runtime_id)
                book = self._books.get(runtime_id)
                if book is not None:
                    book.message = "liveness probe failed"
                await self.runtime.stop(runtime_id, timeout_s=STOP_GRACE_S)
                stopped = True
        return stopped

    def _started(self, runtime_id: str) -> bool:
        status = self.probes.status(runtime_id + STARTUP, ProbeKind.READINESS)
        return status is None or status.state == ProbeState.PASSING

    def _ready(self, runtime_id: str) -> bool:
        if not self._started(runtime_id):
            return False
        status = self.probes.status(runtime_id, ProbeKind.READINESS)
        return status is None or status.state == ProbeState.PASSING

    # -- reports --------------------------------------------------------------------------

    async def _report(
        self, wanted: dict[str, _Container], actual: dict[str, InstanceStatus]
    ) -> None:
        by_instance: dict[str, list[str]] = {}
        for runtime_id, item in wanted.items():
            by_instance.setdefault(item.placement.instance_id, []).append(runtime_id)
        writes = []
        now = self.clock()
        for instance_id, runtime_ids in by_instance.items():
            placement = wanted[runtime_ids[0]].placement
            states, ready, restarts, messages = [], True, 0, []
            for runtime_id in runtime_ids:
                status = actual.get(runtime_id)
                book = self._books.get(runtime_id)
                running = status is not None and status.running
                if book is not None:
                    restarts += book.restarts
                    if book.message:
                        messages.append(f"{runtime_id}: {book.message}")
                if running:
                    states.append("running")
                    ready = ready and self._ready(runtime_id)
                else:
                    ready = False
                    states.append("failed" if book and book.gave_up else "starting")
            state = next((s for s in ("failed", "starting") if s in states), "running")
            if state == "starting" and restarts:
                state = "backoff"
            seen = self._seen.setdefault(instance_id, _Seen())
            facts = (placement.version, ready, state == "failed")
            if facts != seen.facts:
                seen.facts, seen.since = facts, now
            report = InstanceReport(
                instance_id, self.host_id, placement.version, state, ready,
                restarts, seen.since, "; ".join(messages)[:500],
            )  # fmt: skip
            # Compared with the replicated record, not a local cache: a report
            # overwritten by a host that came back with stale placements is fixed.
            stored = self.site.view.get(APPS_TABLE, status_key(instance_id))
            known = InstanceReport.decode(stored.value) if stored else None
            if not report.same_facts(known):
                writes.append(Put(APPS_TABLE, status_key(instance_id), report.encode()))
        if writes:
            await self.site.propose(writes, idempotent=True)


def _probe_config(probe: Probe) -> ProbeConfig:
    return ProbeConfig(
        period_s=probe.period_s,
        timeout_s=probe.timeout_s,
        initial_delay_s=probe.initial_delay_s,
        failure_threshold=probe.failure_threshold,
    )
