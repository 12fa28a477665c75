"""The hub's API against its own OpenAPI document, fuzzed by schemathesis.

A real hub (its HTTP server, LMDB, ledger) runs on a thread of its own; state is set up so
that the operations reach past their 404s (a tenant, a site, an application, a secret);
then schemathesis, driven only by ``/v1/openapi.json``, sends valid and invalid requests
with a fleet admin's, a tenant admin's and a viewer's token. Every check must hold: no 5xx,
every status and content type documented, every answer valid against its schema, every
request the document allows accepted (not 400) and every request it refuses refused, a
405 with ``Allow``.

Two values no JSON Schema can describe are left out of the generated requests: ``cursor``
(an opaque value under the hub's MAC: only a previous page gives one; tests/hub/test_paging.py
tests forged ones) and ``regex`` (RE2's grammar; tests/hub/test_log_queries.py). An
application spec (docs/app-spec.md) generated as text or object is replaced by a valid one,
so the rest of the request is what is fuzzed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from schemathesis.engine import Status, events, from_schema

from central_hub import Hub
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
MAX_EXAMPLES = 8  # per operation and phase: the three runs take about a minute on 2 cores


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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The hub's URL and the three tokens, with state every operation can find."""
    with HubThread(tmp_path_factory.mktemp("fuzz") / "hub") as hub:
        url, admin = hub.url, admin_token(hub)
        _call(url, admin, "POST", "/v1/tenants", {"id": "acme"})
        _call(url, admin, "POST", "/v1/sites", {"id": "0", "labels": {"zone": "a"}})
        _call(url, admin, "POST", "/v1/apps", {"spec": spec_text("web"), "tenant": "acme"})
        for tenant in ("default", "acme"):
            secret = {"name": "0", "value": "s3cret", "tenant": tenant}
            _call(url, admin, "POST", "/v1/secrets", secret)
        tenant_admin = _call(url, admin, "POST", "/v1/tokens", {"role": "admin", "tenant": "acme"})
        viewer = _call(url, admin, "POST", "/v1/tokens", {"role": "viewer", "tenant": "*"})
        yield {
            "url": url,
            "admin": admin,
            "tenant_admin": tenant_admin["token"],
            "viewer": viewer["token"],
        }


def _schema(url: str, token: str) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {token}"},
            "checks": {name: {"enabled": True} for name in CHECKS},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "workers": 1,
            # A release is a wheel: bytes no schema describes (tests/fleet upload real ones).
            "operations": [
                {
                    "include-path": "/v1/releases",
                    "include-method": "POST",
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                }
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{url}/v1/openapi.json", config=config)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """What no JSON Schema describes is given real values (see the module docstring);
    schemathesis then re-reads whether the request is still valid or invalid."""
    if case.query:
        case.query = {k: v for k, v in case.query.items() if k not in ("cursor", "regex")}
    body = case.body
    is_app = case.operation.label == "POST /v1/apps" and isinstance(body, dict)
    if is_app and isinstance(body.get("spec"), str | dict):
        case.body = {**body, "spec": spec_text("web")}


def run_checks(schema: Any) -> tuple[list[str], int]:
    """Every failed check of a schemathesis run (operation, check, what went wrong), and
    how many checks ran."""
    failures: list[str] = []
    ran = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}")
        if not isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            continue
        for nodes in event.recorder.checks.values():
            for node in nodes:
                ran += 1
                if node.status == Status.FAILURE:
                    info = node.failure_info
                    what = "" if info is None else f"{info.failure.title}: {info.code_sample}"
                    failures.append(f"{event.recorder.label}: {node.name}: {what[:500]}")
    return failures, ran


@pytest.mark.parametrize("caller", ["admin", "tenant_admin", "viewer"])
def test_the_api_keeps_its_document(fleet: dict[str, str], caller: str) -> None:
    failures, ran = run_checks(_schema(fleet["url"], fleet[caller]))
    assert not failures, "\n".join(sorted(set(failures)))
    assert ran > 1000  # the run did reach the operations
