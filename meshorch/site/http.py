"""What the agent's route modules share: the services they serve from, JSON answers, errors.

Every route module (``meshorch.site.*_api``) imports this one, never ``meshorch.site.api``
(which registers them all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from meshorch.fleet.delta import DeltaRejected
from meshorch.fleet.site_link import SiteLink
from meshorch.images.service import SiteImages
from meshorch.join.admission import Admission
from meshorch.join.password_rotation import PasswordRotation
from meshorch.promtext import Collector
from meshorch.secrets.service import SiteSecrets
from meshorch.site.host_api import HostRoutes
from meshorch.state.ports import Members, SiteState
from meshorch.streams.site import SiteStreams
from raft import ClientRequest, Op, OpResult

JSON = "application/json"
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class DeltaApiError(ApiError):
    def __init__(self, status: int, exc: DeltaRejected) -> None:
        super().__init__(status, exc.reason, exc.message)
        self.version = exc.version


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def json_object(body: bytes) -> dict[str, object]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return data


class ApiNode(SiteState, Protocol):
    """The Raft member as the API uses it: the state, client sessions' requests (resent for
    ``session_retry_s``), adding a member, stepping down."""

    session_retry_s: float

    async def propose(
        self, ops: Sequence[Op], *, idempotent: bool = False, session: ClientRequest | None = None
    ) -> list[OpResult]: ...

    async def add_member(self, address: str) -> None: ...

    def step_down(self) -> bool: ...

    def reachable(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class SiteServices:
    """What the agent's API serves from; built by the agent (``meshorch.site.agent``)."""

    site_id: str
    host_id: str
    raft_address: str | None  # None on a mesh site: the address is the overlay's
    node: ApiNode
    members: Members
    admission: Admission
    password_rotation: PasswordRotation
    secrets: SiteSecrets
    images: SiteImages
    streams: SiteStreams
    link: SiteLink
    hosts: HostRoutes
    metrics: Collector
    on_revoked: Callable[[], None]  # this host was revoked: forget the site and stop


SERVICES: web.AppKey[SiteServices] = web.AppKey("site_services")


def services(request: web.Request) -> SiteServices:
    return request.app[SERVICES]


async def consistent_read(request: web.Request) -> None:
    """A linearizable read unless ``?consistency=local`` asks for this host's view."""
    consistency = request.query.get("consistency", "linearizable")
    if consistency == "linearizable":
        await services(request).node.barrier()
    elif consistency != "local":
        raise ApiError(400, "bad_consistency", "consistency must be 'linearizable' or 'local'")
