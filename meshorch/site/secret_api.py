"""The agent's secrets routes: status, unsealing, escrow, lock-down, rotation (docs/secrets.md)."""

from __future__ import annotations

import logging

from aiohttp import web

from meshorch.http_body import read_limited
from meshorch.secrets.keyring import parse_public_key, parse_settings
from meshorch.secrets.service import parse_unseal_key, sealed_answer
from meshorch.site.guard import caller_of
from meshorch.site.http import (
    ApiError,
    consistent_read,
    json_object,
    json_response,
    services,
)

logger = logging.getLogger(__name__)


def add_secret_routes(app: web.Application) -> None:
    """Register the secrets routes."""
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_get("/v1/secrets/status", secrets_status)
    app.router.add_post("/v1/secrets/unseal-request", unseal_request)
    app.router.add_post("/v1/secrets/rekey", rekey)
    app.router.add_post("/v1/secrets/unseal", unseal)
    app.router.add_post("/v1/secrets/escrow", escrow)
    app.router.add_post("/v1/secrets/lockdown", lockdown)
    app.router.add_post("/v1/secrets/unlock", unlock)
    app.router.add_post("/v1/secrets/rotate", rotate)
    app.router.add_put("/v1/secrets/settings", put_secret_settings)


MAX_SECRETS_BODY = 4096


ROTATE_WAIT_S = 10.0


async def _small_object(request: web.Request, fields: frozenset[str]) -> dict[str, object]:
    body = await read_limited(request.content, MAX_SECRETS_BODY)
    if len(body) > MAX_SECRETS_BODY:
        raise ApiError(413, "too_large", f"the body is limited to {MAX_SECRETS_BODY} bytes")
    data = json_object(body)
    unknown = set(data) - fields
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    return data


async def list_secrets(request: web.Request) -> web.Response:
    """Names, versions, states and data key ids; never a value."""
    await consistent_read(request)
    return json_response({"secrets": services(request).secrets.list_json()})


async def secrets_status(request: web.Request) -> web.Response:
    await consistent_read(request)
    return json_response(services(request).secrets.status_json())


def _peer(request: web.Request) -> str | None:
    """The member that signed the request (None: unsigned, while the site allows it)."""
    caller = caller_of(request)
    return caller.name if caller.kind == "peer" else None


async def unseal_request(request: web.Request) -> web.Response:
    """A peer asks for the unseal key: answered sealed to its registered host key, and
    only to the host that signed the request."""
    data = await _small_object(request, frozenset({"host_id"}))
    blob = services(request).secrets.answer_unseal_request(data.get("host_id"), _peer(request))
    return json_response(sealed_answer(blob))


async def rekey(request: web.Request) -> web.Response:
    """The leader, about to rekey, hands this host the new unseal key (sealed to it)."""
    data = await _small_object(request, frozenset({"ssk_public", "sealed_key"}))
    services(request).secrets.accept_rekey(data, _peer(request))
    return json_response({"accepted": True})


async def unseal(request: web.Request) -> web.Response:
    """The operator's unseal key, ``{"key": base64}``; checked against the keyring."""
    data = await _small_object(request, frozenset({"key"}))
    kek = parse_unseal_key(data)
    changed = await services(request).secrets.unseal(kek)
    return json_response({"sealed": False, "changed": changed})


async def escrow(request: web.Request) -> web.Response:
    """The unseal key sealed to ``{"public_key": hex X25519}`` (for escrow at the hub)."""
    data = await _small_object(request, frozenset({"public_key"}))
    public_key = parse_public_key(data.get("public_key"))
    return json_response(sealed_answer(services(request).secrets.escrow(public_key)))


async def lockdown(request: web.Request) -> web.Response:
    await _small_object(request, frozenset())
    svc = services(request)
    await svc.secrets.lockdown(f"api on {svc.host_id}")
    return json_response({"locked_down": True})


async def unlock(request: web.Request) -> web.Response:
    await _small_object(request, frozenset())
    was_locked = await services(request).secrets.unlock()
    return json_response({"locked_down": False, "changed": was_locked})


async def rotate(request: web.Request) -> web.Response:
    """Ask for a data key rotation; 200 once done (within ``wait_s``), else 202."""
    data = await _small_object(request, frozenset({"wait_s"}))
    wait_s = data.get("wait_s", ROTATE_WAIT_S)
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= 60:
        raise ApiError(400, "bad_request", "wait_s: seconds, 0 to 60")
    svc = services(request)
    before = await svc.secrets.request_rotation(f"api on {svc.host_id}")
    assert before is not None
    done = await svc.secrets.rotated_since(before, float(wait_s))
    status = svc.secrets.status_json()
    return json_response({"rotated": done, "current_data_key": status["current_data_key"]},
                         200 if done else 202)  # fmt: skip


async def put_secret_settings(request: web.Request) -> web.Response:
    data = await _small_object(request, frozenset({"rotation_interval_s"}))
    settings = parse_settings(data)
    await services(request).secrets.put_settings(settings)
    return json_response({"rotation_interval_s": settings.rotation_interval_s})
