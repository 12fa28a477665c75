"""The agent's host routes: the site's hosts with their release, draining, releases.

GET /v1/hosts                      every host: alive, drained, agent version, protocol,
                                   instances placed on it, leader
PUT /v1/hosts/{host_id}/drain      {"drained": true|false}: move its work elsewhere (it
                                   stays a member), or let it take work again
GET /v1/releases/{digest}          an agent release this host holds (peers upgrading
                                   fetch it here: meshorch.fleet.upgrade)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from meshorch.apps.records import HOSTINFO_PREFIX, INST_PREFIX, decode_hostinfo, decode_placement
from meshorch.errors import RemoteInputError
from meshorch.http_body import read_limited
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE, DRAIN_PREFIX, SYSTEM_TABLE
from raft import Delete, Put


@dataclass(frozen=True)
class HostRoutes:
    """What the host routes use: the state, the site's hosts, the wheels this host holds."""

    site: SiteState
    members: Members
    wheels: Path  # meshorch.fleet.upgrade.wheel_cache


_HOSTS: web.AppKey[HostRoutes] = web.AppKey("host_routes")


def add_host_routes(app: web.Application, hosts: HostRoutes) -> None:
    app[_HOSTS] = hosts
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_put("/v1/hosts/{host_id}/drain", put_drain)
    app.router.add_get("/v1/releases/{digest}", get_release)


def _hosts(request: web.Request) -> HostRoutes:
    return request.app[_HOSTS]


def hosts_view(site: SiteState, members: Members) -> list[dict[str, Any]]:
    view = site.view
    infos = {
        info.host_id: info
        for info in (
            decode_hostinfo(r.value, alive=True)
            for _, r in view.scan(APPS_TABLE, HOSTINFO_PREFIX, 100_000)[0]
        )
    }
    placed: dict[str, int] = {}
    for _, record in view.scan(APPS_TABLE, INST_PREFIX, 1_000_000)[0]:
        host = decode_placement(record.value).host_id
        placed[host] = placed.get(host, 0) + 1
    alive = members.reachable_hosts()
    drained = members.drained_hosts()
    status = site.status()
    leader_raft = status.leader_address
    hosts = []
    for member in sorted(members.members(), key=lambda m: m.host_id):
        info = infos.get(member.host_id)
        hosts.append(
            {
                "host_id": member.host_id,
                "alive": member.host_id in alive,
                "drained": member.host_id in drained,
                "leader": member.raft == leader_raft,
                "agent_version": None if info is None else info.agent_version or None,
                "protocol": None if info is None else info.protocol,
                "instances": placed.get(member.host_id, 0),
            }
        )
    return hosts


async def list_hosts(request: web.Request) -> web.Response:
    hosts = _hosts(request)
    await hosts.site.barrier()
    return _json({"hosts": hosts_view(hosts.site, hosts.members)})


async def put_drain(request: web.Request) -> web.Response:
    hosts = _hosts(request)
    host_id = request.match_info["host_id"]
    body = await read_limited(request.content, 1024)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteInputError("bad_json", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"drained"} or type(data["drained"]) is not bool:
        raise RemoteInputError("bad_request", 'the body must be {"drained": true|false}')
    if host_id not in {m.host_id for m in hosts.members.members()}:
        return _json({"error": {"code": "not_found", "message": f"no host {host_id!r}"}}, 404)
    key = DRAIN_PREFIX + host_id.encode()
    op = Put(SYSTEM_TABLE, key, b"1") if data["drained"] else Delete(SYSTEM_TABLE, key)
    await hosts.site.propose([op], idempotent=True)
    return _json({"host_id": host_id, "drained": data["drained"]})


async def get_release(request: web.Request) -> web.StreamResponse:
    """An agent release's wheel this host holds (peers fetch it here, not from the hub)."""
    digest = request.match_info["digest"]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise RemoteInputError("bad_digest", "a release is named by its sha256, 64 hex digits")
    path = _hosts(request).wheels / f"{digest}.whl"
    if not path.is_file():
        return _json({"error": {"code": "not_found", "message": "no such release here"}}, 404)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
