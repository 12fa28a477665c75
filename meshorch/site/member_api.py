"""The agent's membership routes: the site's members, Raft leadership, join tokens, joining,
and the notice that tells a host it was revoked.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from meshorch.join import admission
from meshorch.join.protocol import JoinRefused, JoinRequest, check_revocation_notice
from meshorch.site.http import (
    ApiError,
    consistent_read,
    json_response,
    services,
)
from meshorch.state.tables import (
    SYSTEM_TABLE,
    parse_member_request,
    validate_host_id,
)
from raft import Put

logger = logging.getLogger(__name__)


def add_member_routes(app: web.Application) -> None:
    """Register the membership and join routes."""
    app.router.add_get("/v1/members", list_members)
    app.router.add_post("/v1/members", add_member)
    app.router.add_delete("/v1/members/{host_id}", remove_member)
    app.router.add_post("/v1/raft/step-down", step_down)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_post("/v1/join", join)
    app.router.add_post("/v1/revoked", revoked)


STEP_DOWN_WAIT_S = 3.0


async def list_members(request: web.Request) -> web.Response:
    await consistent_read(request)
    return json_response({"members": [m.to_json() for m in services(request).members.members()]})


async def add_member(request: web.Request) -> web.Response:
    member = parse_member_request(await request.read())
    svc = services(request)
    by_id = {m.host_id: m for m in svc.members.members()}
    existing = by_id.get(member.host_id)
    if existing is not None and existing.raft != member.raft:
        raise ApiError(409, "host_id_taken", f"{member.host_id} is already at {existing.raft}")
    if any(m.raft == member.raft and m.host_id != member.host_id for m in by_id.values()):
        raise ApiError(409, "address_taken", f"{member.raft} belongs to another host")
    record = member if existing is None or member.api else existing
    await svc.node.propose([Put(SYSTEM_TABLE, record.key(), record.encode())], idempotent=True)
    if member.raft not in svc.node.status().members:
        await svc.node.add_member(member.raft)
    return json_response({"member": record.to_json()})


async def remove_member(request: web.Request) -> web.Response:
    host_id = validate_host_id(request.match_info["host_id"])
    svc = services(request)
    await svc.node.barrier()
    record = next((m for m in svc.members.members() if m.host_id == host_id), None)
    if record is None:
        raise ApiError(404, "not_found", f"no member {host_id}")
    if record.raft == svc.raft_address:
        raise ApiError(409, "is_self", "ask another member to remove this host")
    await svc.admission.revoke(record)
    return json_response({"removed": record.to_json()})


async def step_down(request: web.Request) -> web.Response:
    """As leader, hand Raft leadership to a caught-up member (asked before this host is
    removed: pysyncobj cannot remove its leader). 409 ``not_leader`` on a follower;
    followers that lag are waited for a few seconds."""
    svc = services(request)
    deadline = time.monotonic() + STEP_DOWN_WAIT_S
    while svc.node.status().is_leader:
        if svc.node.step_down():
            return json_response({"stepped_down": True})
        if time.monotonic() > deadline:
            raise ApiError(409, "no_successor", "no member is caught up enough to lead")
        await asyncio.sleep(0.1)
    raise ApiError(409, "not_leader", "this host does not lead the site")


async def create_token(request: web.Request) -> web.Response:
    """``{"ttl_s": 3600, "single_use": false}`` -> a join token for this site."""
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    ttl_s = body.get("ttl_s", 3600)
    single_use = body.get("single_use", False)
    if not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool):
        raise ApiError(400, "bad_ttl", "ttl_s must be a number of seconds")
    if not isinstance(single_use, bool):
        raise ApiError(400, "bad_request", "single_use must be true or false")
    try:
        token = await services(request).admission.create_token(float(ttl_s), single_use)
    except admission.SiteNotReady as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    return json_response(token)


async def join(request: web.Request) -> web.Response:
    """A host asks to join the site (see meshorch.join.protocol for the protocol)."""
    join_request = JoinRequest.parse(await request.read())
    try:
        answer = await services(request).admission.admit(join_request, time.time())
    except admission.SiteNotReady as exc:
        raise ApiError(503, exc.code, str(exc)) from exc
    except JoinRefused as exc:
        status = 409 if exc.code in ("host_id_taken", "used_token") else 403
        if exc.code in ("wrong_site", "bad_request", "bad_json"):
            status = 400
        logger.warning("refused join of %s: %s", join_request.host_id, exc)
        raise ApiError(status, exc.code, str(exc)) from exc
    return json_response(answer)


async def revoked(request: web.Request) -> web.Response:
    """The site tells this host it was revoked (a notice signed by the site identity)."""
    svc = services(request)
    try:
        identity = svc.admission.site_identity()
    except admission.SiteNotReady as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    try:
        check_revocation_notice(
            await request.read(),
            identity.public_key,
            svc.site_id,
            svc.host_id,
            time.time(),
        )
    except JoinRefused as exc:
        raise ApiError(403, exc.code, str(exc)) from exc
    svc.on_revoked()
    return json_response({"stopping": True})
