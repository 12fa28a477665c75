"""The fixtures the secret tests share: one local site and a driver for its API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite
from tests.secrets.helpers import Driver, new_site


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    local = new_site(tmp_path_factory.mktemp("site"))
    local.start()
    try:
        yield local
    finally:
        local.stop()
        print(local.logs())


@pytest.fixture
async def driver(site: LocalSite) -> AsyncIterator[Driver]:
    async with site.session(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield Driver(site, session)
