"""The command line against a real agent: through its socket with no credential, over TCP
only with an access token, and a refusal that says what is missing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.site.access import TOKEN_ENV


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    local = LocalSite(hosts=1, site="cli", root=tmp_path_factory.mktemp("cli"))
    local.start()
    try:

        async def ready() -> None:
            async with local.session() as session:
                await wait_ready(session, local.members)

        asyncio.run(ready())
        yield local
    finally:
        local.stop()
        print(local.logs())


def meshorch(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    argv = [sys.executable, "-m", "meshorch", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def test_the_cli_on_the_host_uses_the_socket_and_elsewhere_a_token(site: LocalSite) -> None:
    host = site.members[0]
    socket_path = str(host.data_dir / "agent.sock")
    made = meshorch("access-token", "create", "--role", "viewer", "--agent", socket_path)
    assert made.returncode == 0, made.stderr
    viewer = made.stdout.strip()
    assert viewer.startswith("moat1.") and "viewer, site-wide" in made.stderr
    listed = meshorch("access-token", "list", "--agent", socket_path)
    assert listed.returncode == 0 and viewer.split(".")[1] in listed.stdout

    stranger = meshorch("app", "list", "--agent", host.api)
    assert stranger.returncode != 0
    assert "unauthenticated" in stranger.stderr and "Traceback" not in stranger.stderr
    read = meshorch("app", "list", "--agent", host.api, token=viewer)
    assert read.returncode == 0 and read.stdout.startswith("APP"), read.stderr
    write = meshorch("access-token", "create", "--role", "admin", "--agent", host.api,
                     token=viewer)  # fmt: skip
    assert write.returncode != 0 and "forbidden" in write.stderr, write.stderr
