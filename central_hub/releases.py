"""Agent releases at the hub: upload a meshorch wheel, roll it out to sites by delta.

``POST /v1/releases`` (a fleet admin, the wheel as the body) checks the wheel
(``meshorch.releases.wheels.wheel_metadata``) and keeps it by its sha256; ``POST
/v1/releases/{version}/rollout`` appends an ``agent.upgrade`` delta for the chosen sites
(all by default), which upgrade host by host (``meshorch.fleet.upgrade``);
``GET /v1/link/releases/{digest}`` serves the wheel to a site (signed request).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from central_hub.errors import ApiError
from central_hub.ledger import Txn
from central_hub.model import validate_site_id
from central_hub.routing import Route, hub_of, json_response, read, read_json, token_of
from central_hub.tokens import authorize
from meshorch.fleet.delta import ALL_SITES, Target
from meshorch.releases.wheels import ReleaseError, wheel_metadata

if TYPE_CHECKING:
    from central_hub.parts import HubParts

META_PREFIX = "release/"


def _dir(hub: HubParts) -> Path:
    return hub.ledger.data_dir / "releases"


def _check_wheel(body: bytes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.whl"
        path.write_bytes(body)
        try:
            info = wheel_metadata(path)
        except ReleaseError as exc:
            raise ApiError(400, "bad_release", str(exc)) from None
    return {"version": info.version, "digest": info.digest, "size": info.size}


async def upload(request: web.Request) -> web.Response:
    hub, token = hub_of(request), token_of(request)
    authorize(token, "fleet.admin")
    body = await read(request)
    record = await asyncio.to_thread(_check_wheel, body)
    target = _dir(hub) / f"{record['digest']}.whl"

    def keep() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(body)
        partial.replace(target)

    await asyncio.to_thread(keep)

    def plan(txn: Txn) -> dict[str, Any]:
        known = hub.ledger.store.get_json("meta", META_PREFIX + record["version"])
        if known is not None and known["digest"] != record["digest"]:
            raise ApiError(409, "release_exists", f"release {record['version']} has other content")
        entry = {**record, "uploaded_at": txn.now}
        txn.put("meta", META_PREFIX + record["version"], entry)
        txn.audit(token, "release.upload", None, "release", record["version"], "ok")
        return entry

    return json_response(await hub.ledger.transact(plan), 201)


async def list_releases(request: web.Request) -> web.Response:
    hub = hub_of(request)
    authorize(token_of(request), "fleet.admin")
    found = [
        hub.ledger.store.get_json("meta", key)
        for key in hub.ledger.store.keys("meta")
        if key.startswith(META_PREFIX)
    ]
    return json_response({"releases": sorted(found, key=lambda r: r["uploaded_at"])})


async def rollout(request: web.Request) -> web.Response:
    hub, token = hub_of(request), token_of(request)
    authorize(token, "fleet.admin")
    version = request.match_info["version"]
    data = await read_json(request) if request.can_read_body else {}
    if not isinstance(data, dict) or set(data) - {"sites"}:
        raise ApiError(400, "bad_request", 'the body is {"sites": [...]} (default: every site)')
    sites = data.get("sites")
    if sites is not None and not (isinstance(sites, list) and sites):
        raise ApiError(400, "bad_request", "sites is a non-empty list of site ids")

    def plan(txn: Txn) -> dict[str, Any]:
        release = hub.ledger.store.get_json("meta", META_PREFIX + version)
        if release is None:
            raise ApiError(404, "not_found", f"no release {version!r}: upload it first")
        if sites is None:
            target = ALL_SITES
        else:
            chosen = frozenset(validate_site_id(s) for s in sites)
            for site in chosen:
                hub.sites.site(site)
            target = Target(sites=chosen)
        op = {"op": "agent.upgrade", "version": version, "digest": release["digest"],
              "size": release["size"]}  # fmt: skip
        delta = txn.delta([op], target)
        txn.audit(token, "release.rollout", None, "release", version, "ok", f"delta {delta}")
        return {"version": version, "delta": delta, "sites": sites or "all"}

    return json_response(await hub.ledger.transact(plan))


async def link_release(request: web.Request) -> web.StreamResponse:
    digest = request.match_info["digest"]
    path = _dir(hub_of(request)) / f"{digest}.whl"
    if len(digest) != 64 or not path.is_file():
        raise ApiError(404, "not_found", "no such release")
    data = await asyncio.to_thread(path.read_bytes)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ApiError(500, "corrupt_release", "the stored release does not match its digest")
    return web.Response(body=data, content_type="application/octet-stream")


RELEASES_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/releases", upload, "fleet.admin",
          "Upload a meshorch release (the wheel is the body)", response="Object", status=201),
    Route("GET", "/v1/releases", list_releases, "fleet.admin", "The uploaded releases",
          response="Object"),
    Route("POST", "/v1/releases/{version}/rollout", rollout, "fleet.admin",
          "Upgrade the agents of some sites (or all) to a release, host by host "
          "(agent.upgrade delta)", response="Object"),
    Route("GET", "/v1/link/releases/{digest}", link_release, "site",
          "A release's wheel, for a site upgrading its agents", response="Object"),
)  # fmt: skip
