from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from central_hub import Hub, HubConfig
from tests.hub.helpers import Operator, Site

MakeSite = Callable[..., Awaitable[Site]]


def hub_config(data_dir: Path, **overrides: object) -> HubConfig:
    # Hub tests send many bad tokens from one address on purpose (the tenant matrix: every
    # route without a token): no rate limit on failed authentications unless a test asks
    # for one (tests/hub/test_junk_flood.py runs with the hub's defaults).
    # Plain HTTP, explicitly: TLS is tested in tests/hub/test_tls.py.
    settings: dict[str, object] = {
        "port": 0,
        "insecure_http": True,
        "tick_s": 0.02,
        "auth_failure_burst": 1e9,
        **overrides,
    }
    return HubConfig(data_dir=data_dir, **settings)  # type: ignore[arg-type]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with Hub(hub_config(tmp_path / "hub")) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def admin_token(hub: Hub) -> str:
    return hub.admin_token_path.read_text().strip()


@pytest.fixture
def admin(hub: Hub, session: aiohttp.ClientSession) -> Operator:
    return Operator(session, hub.url, admin_token(hub))


@pytest.fixture
def make_site(hub: Hub, session: aiohttp.ClientSession, admin: Operator) -> MakeSite:
    async def make(site_id: str, **labels: str) -> Site:
        site = Site(session, hub.url, site_id, hub.fleet, hub.root_key)
        await admin.ok(
            "POST",
            "/v1/sites",
            {"id": site_id, "labels": labels, "public_key": site.public_key},
            201,
        )
        return site

    return make


class Clock:
    """Wall-clock time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def clocked_hub(tmp_path: Path, clock: Clock) -> AsyncIterator[Hub]:
    config = hub_config(tmp_path / "hub", clock=clock, wave_timeout_s=60.0, heartbeat_s=3600.0)
    async with Hub(config) as running:
        yield running
