"""Rollout of one deployment across its sites, wave by wave (pure).

All state transitions of a deployment live here; the service feeds in the sites' latest
reports and the time and issues the deltas this module asks for::

    start()  ->  running ──every site of the last wave healthy──>  succeeded
                    │  └──a site reports failed for the version──>  failed
                    │  └──wave_timeout_s without all healthy─────>  failed
                    └──a newer deployment of the app / app deleted>  superseded

A site of the current wave is done when its report says ``apps[name].version`` is the
deployed version and ``state == "healthy"``. Then the next wave is issued (the caller
appends an ``app.put`` delta targeting exactly those sites).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

State = Literal["running", "succeeded", "failed", "superseded"]
SiteState = Literal["pending", "updating", "healthy", "failed"]
_STATES: tuple[State, ...] = ("running", "succeeded", "failed", "superseded")
_SITE_STATES: tuple[SiteState, ...] = ("pending", "updating", "healthy", "failed")


@dataclass(frozen=True, slots=True)
class AppStatus:
    """What one site reports about one application."""

    version: str
    state: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class SiteProgress:
    state: SiteState = "pending"
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message}


# A site's progress without a message, shared: a deployment to 10,000 sites holds one per
# site, and building (or decoding) that many frozen instances costs milliseconds.
PLAIN: dict[str, SiteProgress] = {state: SiteProgress(state) for state in _SITE_STATES}
PENDING, UPDATING, HEALTHY = PLAIN["pending"], PLAIN["updating"], PLAIN["healthy"]


# How a deployment's record stores each site's state: one letter (``Deployment.to_record``).
_LETTER: dict[SiteState, str] = {"pending": "p", "updating": "u", "healthy": "h", "failed": "f"}
_PLAIN_OF_LETTER = {letter: PLAIN[state] for state, letter in _LETTER.items()}


def _progress_of(data: Mapping[str, Any]) -> SiteProgress:
    message = data["message"]
    if not message:
        return PLAIN[data["state"]]  # KeyError: not a site state
    state = next(s for s in _SITE_STATES if s == data["state"])
    return SiteProgress(state, str(message))


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    app: str
    version: str
    digest: str
    tenant: str
    placement: Mapping[str, Any]
    waves: tuple[tuple[str, ...], ...]
    created_at: float
    state: State = "running"
    reason: str = ""
    wave: int = 0  # index of the current wave
    wave_started_at: float = 0.0
    updated_at: float = 0.0
    progress: Mapping[str, SiteProgress] = field(default_factory=dict)
    deltas: tuple[int, ...] = ()  # versions of the deltas issued for it

    @property
    def sites(self) -> list[str]:
        return [site for wave in self.waves for site in wave]

    def to_json(self) -> dict[str, Any]:
        """As the API shows it: every site's progress an object of its own."""
        progress = self.progress
        return {
            **self._fields(),
            "progress": {
                site: {"state": (p := progress[site]).state, "message": p.message}
                for site in sorted(progress)
            },
        }

    def to_record(self) -> dict[str, Any]:
        """As the hub stores it: each site's state one letter, one string a wave in the
        wave's order (``states``), and the messages there are by site. A running
        deployment is written again every second or so: at 10,000 sites its progress
        takes 10 KB this way, 500 KB as ``to_json`` shows it."""
        progress = self.progress
        return {
            **self._fields(),
            "states": ["".join(_LETTER[progress[site].state] for site in w) for w in self.waves],
            "messages": {
                site: message for site in sorted(progress) if (message := progress[site].message)
            },
        }

    def _fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "version": self.version,
            "digest": self.digest,
            "tenant": self.tenant,
            "placement": dict(self.placement),
            "state": self.state,
            "reason": self.reason,
            "waves": [list(w) for w in self.waves],
            "wave": self.wave,
            "wave_started_at": self.wave_started_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "deltas": list(self.deltas),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Deployment:
        """From ``to_record`` (or ``to_json``: records written before ``to_record``)."""
        state = next(s for s in _STATES if s == data["state"])
        waves = tuple(tuple(str(s) for s in w) for w in data["waves"])
        if "states" in data:
            progress = _progress_of_letters(waves, data["states"], data["messages"])
        else:
            progress = {str(site): _progress_of(p) for site, p in data["progress"].items()}
        return Deployment(
            id=str(data["id"]),
            app=str(data["app"]),
            version=str(data["version"]),
            digest=str(data["digest"]),
            tenant=str(data["tenant"]),
            placement=dict(data["placement"]),
            waves=waves,
            created_at=float(data["created_at"]),
            state=state,
            reason=str(data["reason"]),
            wave=int(data["wave"]),
            wave_started_at=float(data["wave_started_at"]),
            updated_at=float(data["updated_at"]),
            progress=progress,
            deltas=tuple(int(v) for v in data["deltas"]),
        )


def _progress_of_letters(
    waves: Sequence[Sequence[str]], states: Sequence[str], messages: Mapping[str, str]
) -> dict[str, SiteProgress]:
    """ValueError if the letters do not match the waves, KeyError if one is not a state."""
    progress: dict[str, SiteProgress] = {}
    for wave, letters in zip(waves, states, strict=True):
        progress.update(zip(wave, map(_PLAIN_OF_LETTER.__getitem__, letters), strict=True))
    for site, message in messages.items():
        if message:
            progress[site] = SiteProgress(progress[site].state, str(message))
    return progress


def start(
    deployment_id: str,
    app: str,
    version: str,
    digest: str,
    tenant: str,
    placement: Mapping[str, Any],
    waves: Sequence[Sequence[str]],
    now: float,
) -> tuple[Deployment, list[str]]:
    """A new deployment and the sites of its first wave (to issue now; may be empty)."""
    planned = tuple(tuple(w) for w in waves if w)
    first = list(planned[0]) if planned else []
    progress = dict.fromkeys((site for wave in planned for site in wave), PENDING)
    progress.update(dict.fromkeys(first, UPDATING))
    deployment = Deployment(
        id=deployment_id,
        app=app,
        version=version,
        digest=digest,
        tenant=tenant,
        placement=dict(placement),
        waves=planned,
        created_at=now,
        state="running" if planned else "succeeded",
        reason="" if planned else "no site matches the placement",
        wave_started_at=now,
        updated_at=now,
        progress=progress,
    )
    return deployment, first


def step(
    deployment: Deployment,
    statuses: Mapping[str, AppStatus | None],
    now: float,
    wave_timeout_s: float,
    sites: Collection[str] | None = None,
) -> tuple[Deployment, list[str]]:
    """Advance a running deployment: its new state and the sites of a wave to issue now.

    ``statuses`` maps a site to its latest report of this application (None: no report).
    ``sites``: the sites of the current wave whose report may have changed since a step
    over the whole wave returned ``deployment``, or since its wave started (None: every
    site of the wave); the others keep their progress, and the step costs O(``sites``)
    unless they all turned healthy.
    ``deployment`` itself is returned when nothing changed.
    """
    if deployment.state != "running":
        return deployment, []
    current = deployment.waves[deployment.wave]
    before = deployment.progress
    progress: dict[str, SiteProgress] | None = None  # copied at the first change
    looked_at = current if sites is None else sites
    for site in looked_at:
        site_progress = _site_progress(deployment, statuses.get(site))
        known = before.get(site)
        if known is not site_progress and known != site_progress:
            if progress is None:
                progress = dict(before)
            progress[site] = site_progress
    moved = progress is not None
    changed = deployment if progress is None else replace(deployment, progress=progress)
    now_progress = changed.progress
    if sites is not None and not moved:
        # As a step over the wave, or its start, left it: nothing failed, some waiting.
        if now - deployment.wave_started_at >= wave_timeout_s:
            return _timed_out(changed, now), []
        return changed, []
    # A site not looked at did not fail (a step over the wave would have ended it, a start
    # left it updating): only the sites looked at can fail now; the first of the wave is named.
    failing = {site for site in looked_at if now_progress[site].state == "failed"}
    if failing:
        site = next(site for site in current if site in failing)
        message = now_progress[site].message or "no message"
        return _finish(changed, "failed", f"site {site} failed: {message}", now), []
    if all(now_progress[site].state == "healthy" for site in looked_at) and all(
        now_progress[site].state == "healthy" for site in current
    ):
        if deployment.wave + 1 >= len(deployment.waves):
            return _finish(changed, "succeeded", "", now), []
        following = deployment.waves[deployment.wave + 1]
        started = dict(now_progress)
        started.update(dict.fromkeys(following, UPDATING))
        advanced = replace(
            changed,
            wave=deployment.wave + 1,
            wave_started_at=now,
            updated_at=now,
            progress=started,
        )
        return advanced, list(following)
    if now - deployment.wave_started_at >= wave_timeout_s:
        return _timed_out(changed, now), []
    if moved:
        changed = replace(changed, updated_at=now)
    return changed, []


def _timed_out(deployment: Deployment, now: float) -> Deployment:
    current, progress = deployment.waves[deployment.wave], deployment.progress
    waiting = [site for site in current if progress[site].state != "healthy"]
    return _finish(deployment, "failed", f"timeout waiting for sites {', '.join(waiting)}", now)


def _site_progress(deployment: Deployment, status: AppStatus | None) -> SiteProgress:
    if status is None or status.version != deployment.version:
        return UPDATING
    if status.state == "healthy":
        return HEALTHY
    if status.state == "failed":
        return SiteProgress("failed", status.message)
    return SiteProgress("updating", status.message) if status.message else UPDATING


def _finish(deployment: Deployment, state: State, reason: str, now: float) -> Deployment:
    return replace(deployment, state=state, reason=reason, updated_at=now)


def supersede(deployment: Deployment, reason: str, now: float) -> Deployment:
    """Stop a running deployment because something newer replaced it."""
    if deployment.state != "running":
        return deployment
    return _finish(deployment, "superseded", reason, now)


def drop_site(deployment: Deployment, site: str, now: float) -> tuple[Deployment, list[str]]:
    """Forget a site removed from the fleet; returns the deployment and a wave to issue now
    (when the site was all that was left of the current wave)."""
    if site not in deployment.progress:
        return deployment, []
    kept: list[tuple[str, ...]] = []
    index = deployment.wave
    for i, wave in enumerate(deployment.waves):
        rest = tuple(s for s in wave if s != site)
        if rest:
            kept.append(rest)
        elif i < deployment.wave:
            index -= 1
    progress = {s: p for s, p in deployment.progress.items() if s != site}
    changed = replace(deployment, waves=tuple(kept), progress=progress, updated_at=now)
    if deployment.state != "running":
        return replace(changed, wave=max(0, min(index, len(kept) - 1))), []
    if deployment.waves[deployment.wave] != (site,):
        return replace(changed, wave=index), []  # the current wave goes on without the site
    if index >= len(kept):  # the current wave was the last and is now empty
        return _finish(replace(changed, wave=max(0, len(kept) - 1)), "succeeded", "", now), []
    following = kept[index]  # the current wave emptied: the next one starts now
    progress.update(dict.fromkeys(following, UPDATING))
    started = replace(changed, wave=index, wave_started_at=now, progress=progress)
    return started, list(following)
