"""Shared fixtures: a module's real site (its ``site`` fixture says how many hosts, through
``running_site``) and an admin session on it, once the site is ready."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready


def running_site(factory: pytest.TempPathFactory, hosts: int, name: str) -> Iterator[LocalSite]:
    """A site of ``hosts`` real agents on loopback for a module; its logs printed at the end."""
    local = LocalSite(hosts=hosts, site="shop", root=factory.mktemp(name))
    local.start()
    try:
        yield local
    finally:
        local.stop()
        print(local.logs())


@pytest.fixture
async def admin(site: LocalSite) -> AsyncIterator[aiohttp.ClientSession]:
    async with site.session(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await wait_ready(session, site.members)
        yield session
