"""Helpers of the tests of a replicated hub with real replica processes
(``bench.hubcluster``): a site's signed report, sent to one replica, and how many requests
of a route a replica's hub handled itself."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey

from bench.hubcluster import Cluster, Replica
from central_hub.front import SERVED_BY_HEADER
from meshorch.fleet.link_auth import sign_request, url_host

REPORT = "/v1/link/report"


async def route_count(running: Cluster, url: str, path: str) -> int:
    """The requests of ``path`` the hub at ``url`` handled itself (its route histogram)."""
    fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
    async with running.session.get(url + "/metrics", ssl=fingerprint) as resp:
        assert resp.status == 200
        text = await resp.text()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if "_count{" in line and f'"{path}"' in line
    )


def site_report(site: str, applied: int = 0, app_version: str | None = None) -> dict[str, Any]:
    apps = {}
    if app_version is not None:
        apps["pos"] = {"version": app_version, "desired": 1, "ready": 1, "state": "healthy"}
    return {
        "v": 1, "site": site, "time": time.time(), "applied_version": applied,
        "applied_head": "", "rejections": [], "hosts": [{"host_id": "h1", "alive": True,
        "instances": [], "agent_version": "1", "protocol": 9}], "apps": apps,
    }  # fmt: skip


async def send_report(
    running: Cluster,
    replica: Replica,
    key: SigningKey,
    site: str,
    body: bytes,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    local: bool = True,
) -> tuple[int, Any]:
    """A signed report request to ``replica`` (signed for ``host``, by default its own);
    ``local``: answered by the front of ``replica`` itself, not by a leader's hub."""
    signed_for = host or url_host(replica.url)
    if headers is None:
        headers = sign_request(key, site, "POST", REPORT, body, time.time(), host=signed_for)
    fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
    async with running.session.post(
        replica.url + REPORT, data=body, headers=headers, ssl=fingerprint
    ) as resp:
        # Answered by a follower itself: no leader's hub says it served it.
        served_by = resp.headers.get(SERVED_BY_HEADER)
        assert not local or served_by is None, served_by
        return resp.status, orjson.loads(await resp.read())
