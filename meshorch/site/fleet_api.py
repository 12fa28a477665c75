"""The agent's fleet routes: the link to the hub (docs/fleet-link.md) and relayed deltas."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import APPLIED_KEEP, check_link_config
from meshorch.fleet.delta import DeltaRejected
from meshorch.site.http import (
    ApiError,
    DeltaApiError,
    consistent_read,
    json_object,
    json_response,
    services,
)

logger = logging.getLogger(__name__)

MAX_APPLIED_PAGE_BYTES = 8 * 1024 * 1024


def add_fleet_routes(app: web.Application) -> None:
    """Register the fleet link routes."""
    app.router.add_get("/v1/fleet", get_fleet)
    app.router.add_put("/v1/fleet/link", put_fleet_link)
    app.router.add_post("/v1/fleet/deltas", post_fleet_deltas)
    app.router.add_post("/v1/fleet/key", post_fleet_key)
    app.router.add_get("/v1/fleet/applied", get_fleet_applied)


ORDER_REASONS = frozenset(
    {"replay", "rollback", "gap", "chain_mismatch", "expired", "ops_missing", "proof_missing"}
)


async def get_fleet(request: web.Request) -> web.Response:
    """The site's fleet identity, link, trust state and last refusals."""
    await consistent_read(request)
    return json_response(services(request).link.status_json())


async def get_fleet_applied(request: web.Request) -> web.Response:
    """The envelopes of the last versions applied here (``apply.APPLIED_KEEP``), after
    ``?after=`` (default 0), as this site applied them, each a JSON string byte for byte:
    ``{"site", "version", "head", "kept", "envelopes", "next_after"}`` (``next_after``: the
    ``after`` of the next page, at most ``MAX_APPLIED_PAGE_BYTES`` each; null at the end)."""
    raw = request.query.get("after", "0")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise ApiError(400, "bad_after", "after must be a version: an integer >= 0")
    await consistent_read(request)
    link = services(request).link
    trust = link.trust_state()
    if trust is None:
        raise ApiError(409, "not_configured", "this site has no fleet link configured")
    envelopes: list[str] = []
    size, last = 0, None
    for version, envelope in link.applied_envelopes(int(raw)):
        if envelopes and size + len(envelope) > MAX_APPLIED_PAGE_BYTES:
            break
        envelopes.append(envelope.decode())
        size, last = size + len(envelope), version
    return json_response(
        {
            "site": link.site_id,
            "version": trust.version,
            "head": trust.head,
            "kept": APPLIED_KEEP,
            "envelopes": envelopes,
            "next_after": last if last is not None and last < trust.version else None,
        }
    )


async def put_fleet_link(request: web.Request) -> web.Response:
    """Body ``{"hub", "fleet", "root_key", "enroll_token"?, "hub_fingerprint"?,
    "hub_ca"?}``. Never changes whom the site trusts once it has a trust state: only a
    signed root.rotate delta does. The hub's TLS certificate is pinned by
    ``hub_fingerprint`` (SHA-256 hex) or checked against ``hub_ca`` (PEM)."""
    data = json_object(await request.read())
    known = {"hub", "fleet", "root_key", "enroll_token", "hub_fingerprint", "hub_ca"}
    unknown = set(data) - known
    if unknown:
        raise ApiError(400, "bad_link", f"unknown fields: {', '.join(sorted(unknown))}")
    wanted = check_link_config(
        data.get("hub"),
        data.get("fleet"),
        data.get("root_key"),
        data.get("enroll_token"),
        data.get("hub_fingerprint"),
        data.get("hub_ca"),
    )
    link = services(request).link
    try:
        stored = await link.configure(wanted)
    except RemoteInputError as exc:
        status = 400 if exc.code == "bad_link" else 409
        raise ApiError(status, exc.code, str(exc)) from exc
    trust = link.trust_state()
    return json_response(
        {"link": stored.to_json(), "trust": None if trust is None else trust.to_json()}
    )


async def post_fleet_key(request: web.Request) -> web.Response:
    """Rotate the site's key towards the hub now: 202 ``{"pending", "site_key"}``; the leader
    announces the pending key and switches to it once the hub took it (``GET /v1/fleet``
    shows ``site_key`` and ``site_key_rotation``). A pending rotation is returned as is."""
    link = services(request).link
    if link.link_config() is None:
        raise ApiError(409, "not_configured", "this site has no fleet link configured")
    try:
        pending = await link.key_rotation.request("operator")
    except RemoteInputError as exc:
        raise ApiError(409, exc.code, str(exc)) from exc
    key = link.site_key()
    current = None if key is None else bytes(key.verify_key).hex()
    return json_response({"pending": pending.public_hex, "site_key": current}, 202)


async def post_fleet_deltas(request: web.Request) -> web.Response:
    """Relay deltas: one envelope, or a JSON list of envelopes, verified and applied here.

    200 ``{"applied": [versions], "version", "head", "rejected"?}`` (a list may be applied
    in part: its verified prefix); otherwise 400/409 with the refusal's reason as the code,
    and nothing changed.
    """
    body = await request.read()
    if body.lstrip()[:1] == b"[":
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _rejected(DeltaRejected("malformed", f"not a JSON list: {exc}")) from exc
        raws = [orjson.dumps(item) for item in items]
    else:
        raws = [body]
    if not raws:
        raise ApiError(400, "malformed", "no delta given")
    outcome = await services(request).link.commit(raws)
    if outcome.conflict:
        raise ApiError(409, "conflict", "the site applied other deltas meanwhile; retry")
    if not outcome.applied:
        assert outcome.rejected is not None
        raise _rejected(outcome.rejected)
    assert outcome.state is not None
    answer: dict[str, object] = {
        "applied": outcome.applied,
        "version": outcome.state.version,
        "head": outcome.state.head,
        "op_errors": outcome.op_errors,
    }
    if outcome.rejected is not None:
        answer["rejected"] = outcome.rejected.to_json()
    return json_response(answer)


def _rejected(exc: DeltaRejected) -> ApiError:
    status = 409 if exc.reason in ORDER_REASONS else 400
    return DeltaApiError(status, exc)
