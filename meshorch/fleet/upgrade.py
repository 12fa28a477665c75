"""Upgrading a site's agents, one host at a time, with rollback (docs/upgrades.md).

An ``agent.upgrade`` delta from the hub records the wanted release (version, sha256 of its
wheel) in ``upgrade/desired``. The leader then picks one host at a time (followers first,
itself last) in ``upgrade/current``; the Raft majority is never at risk because only one
host restarts at a time. That host:

1. gets the wheel: its own cache, a peer's (``GET /v1/releases/{digest}``), or the hub
   (a signed link request), checked against the digest;
2. drains itself and waits until nothing is placed on it;
3. installs the release beside the running one (``meshorch.releases.wheels``), records a trial
   (``meshorch.releases.launcher``) and restarts into the launcher, which runs the new
   agent and waits for it to be ready, or rolls back to the previous one.

Back up, the host undrains itself. On the new release the leader sees its version in the
host's record and moves on; after a rollback the host writes ``upgrade/failed`` with the
reason and the rollout stops there. The site report carries the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
from nacl.signing import SigningKey

from meshorch import __version__
from meshorch.apps.records import HOSTINFO_PREFIX, INST_PREFIX, decode_hostinfo, decode_placement
from meshorch.errors import RemoteInputError
from meshorch.fleet.client import HubTrust, LinkClient
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE, DRAIN_PREFIX, SYSTEM_TABLE
from raft import Delete, Put

logger = logging.getLogger(__name__)

OP = "agent.upgrade"
DESIRED_KEY = b"upgrade/desired"
CURRENT_KEY = b"upgrade/current"
FAILED_KEY = b"upgrade/failed"
CHECK_S = 1.0
HOST_TIMEOUT_S = 600.0  # a host that neither comes back upgraded nor reports a failure
DRAIN_TIMEOUT_S = 300.0
TRIAL_S = 120.0
MAX_WHEEL_BYTES = 64 * 1024 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "size": self.size}


def parse_release(data: object) -> Release:
    if not isinstance(data, dict):
        raise RemoteInputError("bad_op", "a release is {version, digest, size}")
    version, digest, size = data.get("version"), data.get("digest"), data.get("size")
    if not isinstance(version, str) or not version or len(version) > 64:
        raise RemoteInputError("bad_op", "'version' is a release version")
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise RemoteInputError("bad_op", "'digest' is the wheel's sha256, 64 hex digits")
    if type(size) is not int or not 0 < size <= MAX_WHEEL_BYTES:
        raise RemoteInputError("bad_op", f"'size' is the wheel's size, at most {MAX_WHEEL_BYTES}")
    return Release(version, digest, size)


def op_writes(op: dict[str, Any], version: int) -> list[Put]:
    release = parse_release(op)
    record = orjson.dumps({**release.to_json(), "delta": version})
    return [Put(SYSTEM_TABLE, DESIRED_KEY, record)]


def wheel_cache(data_dir: Path) -> Path:
    return data_dir / "releases" / "wheels"


class HubLink(Protocol):
    """Where a release comes from when no peer has it (``meshorch.fleet.site_link``)."""

    def hub_url(self) -> str | None: ...

    def hub_trust(self) -> HubTrust: ...

    def site_key(self) -> SigningKey | None: ...


class AgentUpgrades:
    def __init__(
        self,
        site: SiteState,
        members: Members,
        hub: HubLink,
        *,
        site_id: str,
        host_id: str,
        data_dir: Path,
        sign: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.sign = sign  # proves this host to the peers it fetches a release from
        self.site = site
        self.members = members
        self.hub = hub
        self.site_id = site_id
        self.host_id = host_id
        self.data_dir = data_dir
        self._busy = False
        self.restart_requested = asyncio.Event()  # cli: leave and exec the launcher

    def _read(self, key: bytes) -> dict[str, Any] | None:
        record = self.site.view.get(SYSTEM_TABLE, key)
        return None if record is None else dict(orjson.loads(record.value))

    def state(self) -> dict[str, Any] | None:
        """For the site report: the wanted release, the host in progress, a failure."""
        desired = self._read(DESIRED_KEY)
        if desired is None:
            return None
        versions = self.host_versions()
        failed = self._read(FAILED_KEY)
        failed = failed if failed and failed.get("version") == desired["version"] else None
        done = bool(versions) and all(v == desired["version"] for v in versions.values())
        current = self._read(CURRENT_KEY)
        return {
            "version": desired["version"],
            "state": "failed" if failed else "done" if done else "running",
            "current": None if current is None else current["host"],
            "failed": failed,
            "hosts_upgraded": sum(v == desired["version"] for v in versions.values()),
            "hosts": len(versions),
        }

    def host_versions(self) -> dict[str, str]:
        members = {m.host_id for m in self.members.members()}
        records, _ = self.site.view.scan(APPS_TABLE, HOSTINFO_PREFIX, 100_000)
        infos = (decode_hostinfo(r.value, alive=True) for _, r in records)
        return {i.host_id: i.agent_version for i in infos if i.host_id in members}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                desired = self._read(DESIRED_KEY)
                if desired is None:
                    continue
                await self._host_step(desired)
                if self.site.status().is_leader:
                    await self._leader_step(desired)
            except Exception as exc:  # tried again at the next check
                logger.warning("agent upgrade: %s", exc)

    # -- the leader: one host at a time ---------------------------------------------------

    async def _leader_step(self, desired: dict[str, Any]) -> None:
        version = desired["version"]
        failed = self._read(FAILED_KEY)
        if failed is not None and failed.get("version") == version:
            return  # stopped: an operator rolls out another release
        versions = self.host_versions()
        current = self._read(CURRENT_KEY)
        now = time.time()
        if current is not None and current.get("version") == version:
            host = current["host"]
            back = (
                host in self.members.reachable_hosts() and host not in self.members.drained_hosts()
            )
            if versions.get(host) == version and back:
                await self.site.propose([Delete(SYSTEM_TABLE, CURRENT_KEY)])
                logger.info("agent upgrade: %s runs %s", host, version)
            elif now - float(current["at"]) > HOST_TIMEOUT_S:
                reason = f"{host} did not come back on {version} within {HOST_TIMEOUT_S:g} s"
                await self._fail(host, version, reason)
            return
        pending = [h for h, v in sorted(versions.items()) if v != version]
        if not pending:
            if current is not None:
                await self.site.propose([Delete(SYSTEM_TABLE, CURRENT_KEY)])
            return
        me = self.host_id
        host = sorted(pending, key=lambda h: (h == me, h))[0]  # the leader goes last
        record = orjson.dumps({"host": host, "version": version, "at": now})
        await self.site.propose([Put(SYSTEM_TABLE, CURRENT_KEY, record)])
        logger.info("agent upgrade: %s to %s next", host, version)

    async def _fail(self, host: str, version: str, reason: str) -> None:
        record = orjson.dumps({"host": host, "version": version, "reason": reason})
        await self.site.propose(
            [Put(SYSTEM_TABLE, FAILED_KEY, record), Delete(SYSTEM_TABLE, CURRENT_KEY)]
        )
        logger.error("agent upgrade to %s stopped: %s", version, reason)

    # -- this host ----------------------------------------------------------------------

    async def _host_step(self, desired: dict[str, Any]) -> None:
        me = self.host_id
        version = desired["version"]
        current = self._read(CURRENT_KEY)
        mine = current is not None and current["host"] == me and current["version"] == version
        drain_key = DRAIN_PREFIX + me.encode()
        drained = self.site.view.get(SYSTEM_TABLE, drain_key) is not None
        # The launcher's module: loaded once an upgrade is asked for, not by every agent.
        from meshorch.releases.launcher import read_trial

        trial = read_trial(self.data_dir)
        if mine and trial is not None and trial.to_version == version:
            if trial.state == "rolled_back" and __version__ != version:
                await self._fail(me, version, f"{me} rolled back: {trial.reason}")
                await self.site.propose([Delete(SYSTEM_TABLE, drain_key)])
                return
            if __version__ == version and drained:
                await self.site.propose([Delete(SYSTEM_TABLE, drain_key)])
                logger.info("agent upgrade: back on %s, taking work again", version)
                return
        if mine and __version__ != version and not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._upgrade_self(desired))

    async def _upgrade_self(self, desired: dict[str, Any]) -> None:
        me = self.host_id
        release = parse_release(desired)
        try:
            wheel = await self._wheel(release)
            await self.site.propose([Put(SYSTEM_TABLE, DRAIN_PREFIX + me.encode(), b"upgrade")])
            await self._drained(DRAIN_TIMEOUT_S)
            releases = self.data_dir / "releases"
            # zipfile and tomllib: loaded only when a release is installed.
            from meshorch.releases.launcher import current_lib, start_trial
            from meshorch.releases.wheels import install_release

            lib = await asyncio.to_thread(install_release, wheel, releases)
            start_trial(
                self.data_dir,
                from_version=__version__,
                to_version=release.version,
                lib=lib,
                previous_lib=current_lib(),
                deadline_s=TRIAL_S,
            )
            logger.warning("agent upgrade: restarting on %s", release.version)
            self.restart_requested.set()
        except Exception as exc:
            self._busy = False
            await self._fail(me, release.version, f"{me}: {exc}")

    async def _drained(self, timeout_s: float) -> None:
        """Until no instance is placed on this host (the controller moves them)."""
        deadline = time.monotonic() + timeout_s
        for _ in iter(lambda: self._placed_here() and time.monotonic() < deadline, False):
            await asyncio.sleep(0.5)

    def _placed_here(self) -> bool:
        me = self.host_id
        records, _ = self.site.view.scan(APPS_TABLE, INST_PREFIX, 1_000_000)
        return any(decode_placement(r.value).host_id == me for _, r in records)

    async def _wheel(self, release: Release) -> Path:
        """The release's wheel: this host's cache, a peer's, or the hub's."""
        cache = wheel_cache(self.data_dir)
        path = cache / f"{release.digest}.whl"
        if path.is_file():
            return path
        data = await self._from_peers(release) or await self._from_hub(release)
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)
        return path

    async def _from_peers(self, release: Release) -> bytes | None:
        me = self.host_id
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for member in self.members.members():
                if member.host_id == me or not member.api:
                    continue
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    path = f"/v1/releases/{release.digest}"
                    headers = {} if self.sign is None else dict(self.sign("GET", path))
                    url = f"http://{member.api}{path}"
                    async with session.get(url, headers=headers) as response:
                        if response.status == 200:
                            data = await response.content.read(MAX_WHEEL_BYTES + 1)
                            if _matches(data, release):
                                return data
        return None

    async def _from_hub(self, release: Release) -> bytes:
        hub, key = self.hub.hub_url(), self.hub.site_key()
        if hub is None or key is None:
            raise RuntimeError("no peer has the release and the site has no hub link")
        async with LinkClient(hub, self.site_id, key, trust=self.hub.hub_trust()) as client:
            data = await client.fetch_release(release.digest)
        if not _matches(data, release):
            raise RuntimeError(f"the release from the hub does not match {release.digest}")
        return data


def _matches(data: bytes, release: Release) -> bool:
    return len(data) == release.size and hashlib.sha256(data).hexdigest() == release.digest
