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
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from meshorch.apps.records import HOSTINFO_PREFIX, INST_PREFIX, decode_hostinfo, decode_placement
from meshorch.errors import RemoteInputError
from meshorch.fleet.upgrade import wheel_cache
from meshorch.http_body import read_limited
from meshorch.state.tables import APPS_TABLE, DRAIN_PREFIX, SYSTEM_TABLE
from raft import Delete, Put

if TYPE_CHECKING:
    from meshorch.site.agent import Agent

_AGENT_OF: web.AppKey[Any] = web.AppKey("host_agent_of")


def add_host_routes(app: web.Application, agent_of: Any) -> None:
    app[_AGENT_OF] = agent_of
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_put("/v1/hosts/{host_id}/drain", put_drain)
    app.router.add_get("/v1/releases/{digest}", get_release)


def _agent(request: web.Request) -> Agent:
    agent: Agent = request.app[_AGENT_OF](request)
    return agent


def hosts_view(agent: Agent) -> list[dict[str, Any]]:
    view = agent.raft.view
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
    alive = agent.reachable_hosts()
    drained = agent.drained_hosts()
    status = agent.raft.status()
    leader_raft = status.leader_address
    hosts = []
    for member in sorted(agent.members(), key=lambda m: m.host_id):
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
    agent = _agent(request)
    await agent.raft.barrier()
    return _json({"hosts": hosts_view(agent)})


async def put_drain(request: web.Request) -> web.Response:
    agent = _agent(request)
    host_id = request.match_info["host_id"]
    body = await read_limited(request.content, 1024)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteInputError("bad_json", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"drained"} or type(data["drained"]) is not bool:
        raise RemoteInputError("bad_request", 'the body must be {"drained": true|false}')
    if host_id not in {m.host_id for m in agent.members()}:
        return _json({"error": {"code": "not_found", "message": f"no host {host_id!r}"}}, 404)
    key = DRAIN_PREFIX + host_id.encode()
    op = Put(SYSTEM_TABLE, key, b"1") if data["drained"] else Delete(SYSTEM_TABLE, key)
    await agent.raft.propose([op], idempotent=True)
    return _json({"host_id": host_id, "drained": data["drained"]})


async def get_release(request: web.Request) -> web.StreamResponse:
    """An agent release's wheel this host holds (peers fetch it here, not from the hub)."""
    digest = request.match_info["digest"]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise RemoteInputError("bad_digest", "a release is named by its sha256, 64 hex digits")
    path = wheel_cache(_agent(request)) / f"{digest}.whl"
    if not path.is_file():
        return _json({"error": {"code": "not_found", "message": "no such release here"}}, 404)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
