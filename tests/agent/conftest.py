from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from tests.agent_token import HEADERS


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    local = LocalSite(hosts=3, site="test", root=tmp_path_factory.mktemp("site"))
    local.start()
    try:
        yield local
    finally:
        local.stop()
        print(local.logs())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout, headers=HEADERS) as client:
        yield client


@pytest.fixture
async def ready_site(site: LocalSite, session: aiohttp.ClientSession) -> LocalSite:
    await wait_ready(session, site.members)
    return site
