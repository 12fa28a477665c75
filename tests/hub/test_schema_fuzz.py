"""The hub's API against its own OpenAPI document, fuzzed by schemathesis.

A real hub (its HTTP server, LMDB, ledger) runs on a thread of its own, one per caller;
state is set up so that the operations reach past their 404s (tenants, sites, apps,
secrets, tokens, more than a page of each); then schemathesis, driven only by
``/v1/openapi.json``, sends valid and invalid requests with a fleet admin's, a tenant
admin's or a viewer's token, and the site link's requests signed by an enrolled site's key.
Every check must hold: no 5xx, every status and content type documented, every answer
valid against its schema, every request the document allows accepted (not 400) and every
request it refuses refused, a 405 with ``Allow``. And the run must reach the handlers:
the operations each caller may use answer 2xx at least once.

Values no JSON Schema can describe are given real ones when the generated value is valid
by the document (an invalid one is left, to be refused): a listing's ``cursor`` (under the
hub's MAC) by one the hub gave for that listing and caller, a log query's ``regex`` (RE2's
grammar) by a valid regex, an application ``spec`` by a valid spec (docs/app-spec.md), a new
site's id by one not taken, a quota's tenant by one that exists (and a deletion of that
tenant, or of the caller's own token, goes to an id that does not exist). A
log cursor is dropped (the hub holds no logs here); the link's long-poll ``wait`` is 0.
A link request is signed by the site's key when schemathesis gave it a signature header.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from nacl.signing import SigningKey
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.engine import Status, events, from_schema

from central_hub import Hub, paging
from central_hub.model import ID_PATTERN
from meshorch.fleet.link_auth import sign_request, url_host
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import spec_text

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "unsupported_method",
    "allow_header_conformance",
]
MAX_EXAMPLES = 8  # per operation and phase: each caller's run takes 20-40 s on 2 cores
LINK_SITE = "link-site"  # the site whose key signs the link's requests
LISTINGS = ("/v1/sites", "/v1/apps", "/v1/tokens", "/v1/tenants", "/v1/secrets")
_CURSOR_RE = re.compile(paging.CURSOR_PATTERN)
_ID_RE = re.compile(ID_PATTERN)

# What every caller's answers must include: a 2xx from each of these operations at least.
READS = {
    "GET /v1/fleet", "GET /v1/apps", "GET /v1/apps/{name}",
    "GET /v1/sites", "GET /v1/sites/{id}", "GET /v1/secrets", "GET /v1/secrets/{name}",
    "GET /v1/tenants", "GET /v1/alerts", "GET /v1/logs", "GET /v1/logs/streams",
}  # fmt: skip
LINK = {
    "GET /v1/link/deltas", "GET /v1/link/snapshot", "POST /v1/link/report",
    "GET /v1/link/streams", "POST /v1/link/streams", "GET /v1/link/escrow-key",
}  # fmt: skip
MUST_REACH = {
    "admin": READS | LINK | {
        "GET /v1/deltas", "GET /v1/tokens", "POST /v1/tokens", "GET /v1/audit",
        "POST /v1/sites", "PUT /v1/sites/{id}/labels", "PUT /v1/tenants/{id}/quota",
        "POST /v1/secrets", "POST /v1/sites/{id}/lockdown", "GET /v1/releases",
    },
    # Its generated secret names and ?tenant= never name one of its secrets together.
    "tenant_admin": (READS - {"GET /v1/secrets/{name}"}) | LINK | {
        "GET /v1/tokens", "POST /v1/tokens", "POST /v1/secrets", "POST /v1/apps",
    },
    "viewer": READS | LINK,
}  # fmt: skip


class HubThread:
    """A hub serving on its own event loop and thread, for a synchronous client."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        try:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            async with Hub(hub_config(self._data_dir)) as hub:
                self.hub = hub
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def __enter__(self) -> Hub:
        self._thread.start()
        assert self._ready.wait(30), "the hub did not start"
        if self.error is not None:
            raise self.error
        assert self.hub is not None
        return self.hub

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the hub did not stop"


def _call(url: str, token: str, method: str, path: str, body: object = None) -> Any:
    response = requests.request(
        method,
        url + path,
        data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=20,
    )
    assert response.status_code < 300, (method, path, response.status_code, response.text)
    return response.json()


class SiteSignature(requests.auth.AuthBase):
    """Signs a request as the link site, over the bytes and path requests will send."""

    def __init__(self, key: SigningKey, host: str) -> None:
        self.key, self.host = key, host

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        body = body.encode() if isinstance(body, str) else body
        assert isinstance(body, bytes) and request.method is not None
        signed = sign_request(
            self.key, LINK_SITE, request.method, request.path_url, body, time.time(), host=self.host
        )
        request.headers.update(signed)
        return request


@dataclass
class RunState:
    """What the hook needs during one caller's run: its cursors, the site's signature."""

    cursors: dict[str, str] = field(default_factory=dict)
    signature: SiteSignature | None = None
    new_sites: int = 0
    own_token_id: str = ""  # the caller's token: not deleted mid-run (its later calls 401)


RUN = RunState()


def _set_up(url: str, admin: str, caller: str) -> str:
    """The state the operations can find, and the caller's token."""
    for tenant in ("acme", "blue"):
        _call(url, admin, "POST", "/v1/tenants", {"id": tenant})
    key = SigningKey.generate()
    site = {"id": LINK_SITE, "public_key": bytes(key.verify_key).hex()}
    _call(url, admin, "POST", "/v1/sites", site)
    for site_id in ("0", "shop-1"):
        _call(url, admin, "POST", "/v1/sites", {"id": site_id, "labels": {"zone": "a"}})
    for name in ("web", "shop"):
        _call(url, admin, "POST", "/v1/apps", {"spec": spec_text(name), "tenant": "acme"})
    for tenant in ("default", "acme"):
        for name in ("0", "db-password"):
            secret = {"name": name, "value": "s3cret", "tenant": tenant}
            _call(url, admin, "POST", "/v1/secrets", secret)
    tokens = {
        "admin": admin,
        "tenant_admin": _call(
            url, admin, "POST", "/v1/tokens", {"role": "admin", "tenant": "acme"}
        )["token"],
        "viewer": _call(url, admin, "POST", "/v1/tokens", {"role": "viewer", "tenant": "*"})[
            "token"
        ],
    }
    token = tokens[caller]
    _call(url, token, "GET", "/v1/fleet")  # the token works
    if caller == "tenant_admin":  # a second token of its tenant: its listing has two pages
        _call(url, token, "POST", "/v1/tokens", {"role": "viewer"})
    RUN.cursors, RUN.new_sites = {}, 0
    RUN.own_token_id = token.split("_")[1]  # mht_<id>_<secret>
    for listing in LISTINGS:
        response = requests.get(
            f"{url}{listing}?limit=1", headers={"Authorization": f"Bearer {token}"}, timeout=20
        )
        cursor = response.json().get("next_cursor") if response.status_code == 200 else None
        if cursor is not None:
            RUN.cursors[listing] = cursor
    RUN.signature = SiteSignature(key, url_host(url))
    return token


@pytest.fixture(params=["admin", "tenant_admin", "viewer"])
def caller(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A hub of its own (the admin's run deletes and revokes), its URL, the caller's name
    and token."""
    with HubThread(tmp_path / "hub") as hub:
        name = str(request.param)
        yield hub.url, name, _set_up(hub.url, admin_token(hub), name)


def _schema(url: str, token: str) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {token}"},
            "checks": {
                **{name: {"enabled": True} for name in CHECKS},
                # An invalid body past the hub's size limit is refused with 413, not 400.
                "negative_data_rejection": {
                    "enabled": True,
                    "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"],
                },
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "workers": 1,
            # Bodies whose validity no schema can state, so that a valid document can be
            # refused: a release wheel, a sealed escrow box (does it open?), a key rotation's
            # proof (a signature, a time near the hub's clock), pushed stream chunks (a binary
            # codec, sequences without gaps). The other checks still run on them; their
            # refusals are tested in tests/fleet, tests/vault, tests/streams. And the report
            # stream, a WebSocket that plain requests cannot open (426; its refusals in
            # tests/hub/test_report_stream.py).
            "operations": [
                {
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                }
                for name in (
                    "POST /v1/releases",
                    "POST /v1/link/escrow",
                    "POST /v1/link/key",
                    "POST /v1/link/streams",
                    "GET /v1/link/reports",
                )
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{url}/v1/openapi.json", config=config)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _valid_cursor(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= paging.MAX_CURSOR_CHARS
        and _CURSOR_RE.fullmatch(value) is not None
    )


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Real values for what the document cannot describe (the module docstring);
    schemathesis then re-reads whether the request is still valid or invalid."""
    path = case.operation.path
    query = dict(case.query or {})
    if "cursor" in query and (path == "/v1/logs" or _valid_cursor(query["cursor"])):
        real = RUN.cursors.get(path)
        if real is None:
            del query["cursor"]
        else:
            query["cursor"] = real
    regex = query.get("regex")
    if isinstance(regex, str) and 1 <= len(regex) <= 1000:
        query["regex"] = "err(or)?|warn"
    if path == "/v1/link/deltas":  # the long-poll answers at once
        query["wait"] = 0
    if query or case.query is not None:
        case.query = query
    body = case.body
    label = case.operation.label
    if (
        label == "POST /v1/apps"
        and isinstance(body, dict)
        and isinstance(body.get("spec"), str | dict)
    ):
        case.body = {**body, "spec": spec_text("web")}
    if label == "POST /v1/sites" and isinstance(body, dict) and _valid_id(body.get("id")):
        RUN.new_sites += 1  # a generated id may be taken (409): a new site gets a new one
        case.body = {**body, "id": f"fuzz-{RUN.new_sites}"}
    path_id = (case.path_parameters or {}).get("id")
    if label == "PUT /v1/tenants/{id}/quota" and _valid_id(path_id):
        case.path_parameters = {**case.path_parameters, "id": "blue"}  # a tenant that exists
    # What the run's later calls need stays: the quota's tenant, the caller's own token (a
    # deletion of either, in whichever order the run went, left the quota no 2xx).
    kept = label == "DELETE /v1/tenants/{id}" and path_id == "blue"
    kept = kept or (label == "DELETE /v1/tokens/{id}" and path_id == RUN.own_token_id)
    if kept:
        case.path_parameters = {**case.path_parameters, "id": "fuzz-none"}
    site = body.get("site") if isinstance(body, dict) else None
    if label == "POST /v1/link/report" and _valid_id(site):
        case.body = {**body, "site": LINK_SITE}  # a site reports for itself only
    # A request that carries a signature (a generated one) gets the site's real one; one
    # that schemathesis sent without, to see it refused, stays without.
    signed = any(h.lower() == "x-meshorch-signature" for h in (case.headers or {}))
    if path.startswith("/v1/link/") and path != "/v1/link/enroll" and signed:
        kwargs["auth"] = RUN.signature


def run_checks(schema: Any) -> tuple[list[str], set[str], int]:
    """Every failed check of a schemathesis run (operation, check, what went wrong), the
    operations that answered 2xx at least once, and how many requests were sent."""
    failures: list[str] = []
    reached: set[str] = set()
    sent = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}")
        if not isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            continue
        label = event.recorder.label
        sent += len(event.recorder.interactions)
        for interaction in event.recorder.interactions.values():
            if interaction.response is not None and interaction.response.status_code < 300:
                reached.add(label)
        for case_id, nodes in event.recorder.checks.items():
            for node in nodes:
                if node.status == Status.FAILURE:
                    info = node.failure_info
                    what = "" if info is None else f"{info.failure.title}: {info.code_sample}"
                    interaction = event.recorder.interactions.get(case_id)
                    response = None if interaction is None else interaction.response
                    answer = b"" if response is None else response.content[:300]
                    failures.append(f"{label}: {node.name}: {what[:500]} -> {answer!r}")
    return failures, reached, sent


def test_the_api_keeps_its_document(caller: tuple[str, str, str]) -> None:
    url, name, token = caller
    started = time.monotonic()
    failures, reached, sent = run_checks(_schema(url, token))
    assert not failures, "\n".join(sorted(set(failures)))
    print(
        f"\n{name}: {sent} requests in {time.monotonic() - started:.0f} s, no check failed; "
        f"{len(reached)} operations answered 2xx: {sorted(reached)}"
    )
    assert MUST_REACH[name] <= reached, sorted(MUST_REACH[name] - reached)
