"""The leader pulls the registry images the site's apps name and its catalogue lacks.

An app deployed from the hub names its image as users write it
(``registry.example.com/pos/web:1.4``). The site's Raft leader, and only it, pulls
each such image once (``SiteImages.pull``): the tag is resolved to a digest there,
the catalogue records it, and every host copies that digest from its peers. So the
uplink carries each image once per site and no host drifts to another digest of the
tag. Credentials come from the app tenant's secret named by the container's
``pull_secret`` (``{"registry", "username", "password"}``, for that registry only).

A pull is recorded in the state while it runs (``PullInProgress``) and the other hosts
copy its blobs as they arrive; if the pulling host dies, the leader takes the pull over
from the digest it had resolved, with what the others copied, and asks the registry
for the rest only (HTTP Range).

Images named ``localhost/...`` are the site's own (``meshorch image add``) and never
pulled. A failed pull is retried with a capped exponential backoff per image; the
instances waiting for it say so in their status (the reconciler's message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from meshorch.apps.records import APP_PREFIX, AppRecord, decode_app, host_protocols
from meshorch.errors import MeshorchError
from meshorch.images.reference import BadReference, parse_reference
from meshorch.images.registry import Credentials, credentials_from_secret
from meshorch.images.service import SiteImages
from meshorch.images.store import PullInProgress
from meshorch.state.ports import SiteState
from meshorch.state.protocol import FeatureUnavailable, require
from meshorch.state.tables import APPS_TABLE

logger = logging.getLogger(__name__)

TICK_S = 0.2  # a pass scans the apps only when something it depends on changed ...
FULL_PASS_S = 2.0  # ... or this long after the last one (anything it cannot observe)
RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0
PULL_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15, sock_read=60)

# (tenant, secret name) -> the secret's value; raises when it is not available.
SecretValue = Callable[[str, str], bytes]


@dataclass(frozen=True)
class WantedImage:
    ref: str
    tenant: str
    pull_secret: str | None


def pullable(ref: str) -> bool:
    """Whether the site would pull ``ref`` from a registry by itself (not a local name)."""
    try:
        parsed = parse_reference(ref)
    except BadReference:
        return False
    return parsed.registry != "localhost"


def images_to_pull(apps: Iterable[AppRecord], known: Callable[[str], bool]) -> list[WantedImage]:
    """The registry images ``apps`` name that are not ``known`` (in the catalogue), each
    once, in the order the apps name them (pure)."""
    wanted: dict[str, WantedImage] = {}
    for record in apps:
        for service in record.spec.services:
            for container in service.containers:
                ref = container.image
                if ref in wanted or known(ref) or not pullable(ref):
                    continue
                wanted[ref] = WantedImage(ref, record.tenant, container.pull_secret)
    return list(wanted.values())


@dataclass
class PassGate:
    """Whether the next pass is worth its scan of the apps (pure): what a pass decides
    from (``observed``: the apps table's change count, the reachable hosts) changed, a
    retry is due, or ``full_pass_s`` went by. So an app naming a new image is pulled
    within a tick, not a full pass, at the cost of one cheap comparison per tick."""

    full_pass_s: float
    _seen: object = None
    _last: float = float("-inf")

    def due(self, observed: object, now: float, retry_at: float) -> bool:
        if observed == self._seen and now - self._last < self.full_pass_s and now < retry_at:
            return False
        self._seen, self._last = observed, now
        return True

    def reset(self) -> None:
        self._seen, self._last = None, float("-inf")


class LeaderImagePulls:
    """On the Raft leader: pull what the apps need and the catalogue lacks."""

    def __init__(
        self,
        site: SiteState,
        images: SiteImages,
        secret_value: SecretValue,
        plain_http_registries: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site = site
        self.images = images
        self.secret_value = secret_value
        self.plain_http = frozenset(r.lower() for r in plain_http_registries)
        self.clock = clock
        self._retry: dict[str, tuple[float, float]] = {}  # ref -> (next attempt, delay)

    async def run(self) -> None:
        gate = PassGate(FULL_PASS_S)
        async with aiohttp.ClientSession(timeout=PULL_TIMEOUT) as session:
            while True:
                if not self.site.status().is_leader:
                    gate.reset()
                else:
                    # Read before the pass: a change during it makes the next tick pass.
                    observed = (
                        self.site.view.changes(APPS_TABLE),
                        frozenset(self.images.members.reachable_hosts()),
                    )
                    if gate.due(observed, self.clock(), self._retry_at()):
                        try:
                            await self.tick(session)
                        except Exception:
                            gate.reset()
                            logger.exception("image pulls failed")
                await asyncio.sleep(TICK_S)

    def _retry_at(self) -> float:
        return min((at for at, _ in self._retry.values()), default=float("inf"))

    async def tick(self, session: aiohttp.ClientSession) -> None:
        records, _ = self.site.view.scan(APPS_TABLE, APP_PREFIX, 1_000_000)
        apps = [decode_app(record.value) for _, record in records]
        wanted = images_to_pull(apps, lambda ref: self.images.find(ref) is not None)
        refs = {image.ref for image in wanted}  # a retry of what is no longer wanted is moot
        self._retry = {ref: due for ref, due in self._retry.items() if ref in refs}
        if not wanted:
            return
        try:
            require("oci_images", host_protocols(self.site.view))
        except FeatureUnavailable as exc:
            logger.info("images wait for the upgrade: %s", exc)
            return
        now = self.clock()
        pulling = self.images.pulls_in_progress()
        reachable = self.images.members.reachable_hosts()
        for image in wanted:
            under_way = pulling.get(image.ref)
            if under_way is not None and under_way.host in reachable - {self.images.host_id}:
                continue  # another host pulls it; the site's uplink carries it once
            next_attempt, delay = self._retry.get(image.ref, (0.0, RETRY_INITIAL_S / 2))
            if next_attempt > now:
                continue
            if under_way is not None:
                logger.info("taking over the pull of %s from %s", image.ref, under_way.host)
            try:
                await self._pull(session, image, under_way)
            except (MeshorchError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                delay = min(delay * 2, RETRY_MAX_S)
                self._retry[image.ref] = (self.clock() + delay, delay)
                logger.warning("image %s not pulled (again in %.0f s): %s", image.ref, delay, exc)
            else:
                self._retry.pop(image.ref, None)

    async def _pull(
        self,
        session: aiohttp.ClientSession,
        image: WantedImage,
        under_way: PullInProgress | None = None,
    ) -> None:
        """Pull ``image``; one ``under_way`` at a host gone is resumed: the digest it
        resolved, the bytes the other hosts copied from it, the rest from the registry."""
        registry = parse_reference(image.ref).api_host
        credentials: Credentials | None = None
        if image.pull_secret is not None:
            value = self.secret_value(image.tenant, image.pull_secret)
            credentials = credentials_from_secret(value, registry)
        await self.images.pull(
            session,
            image.ref,
            credentials,
            plain_http=registry.lower() in self.plain_http,
            tenant=image.tenant if credentials is not None else "",
            resolve=None if under_way is None else under_way.source,
        )
