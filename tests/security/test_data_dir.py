"""The agent's data dir is its own: another user of the host reads nothing below it (the
Raft journal and the LMDB view hold the whole site state, the site's fleet key included),
even where every directory above it is open to all."""

from __future__ import annotations

import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from tests.labutil import require_lab


@pytest.fixture
def open_root() -> Iterator[Path]:
    require_lab()  # root: to run a command as another user
    root = Path(tempfile.mkdtemp(prefix="meshorch-open-"))
    root.chmod(0o755)  # anyone may walk down to the data dirs
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_as(user: str | None, path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cat", str(path)], user=user, capture_output=True, check=False)


async def test_another_user_of_the_host_reads_nothing_of_the_site_state(
    open_root: Path,
) -> None:
    site = LocalSite(hosts=1, site="shop", root=open_root / "site")
    data_dir = site.members[0].data_dir
    data_dir.mkdir(parents=True, mode=0o755)  # as an operator might have made it
    site.start()
    try:
        async with site.session(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await wait_ready(session, site.members)
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for path in (data_dir / "raft" / "raft.journal", data_dir / "raft" / "view" / "data.mdb"):
            assert read_as(None, path).returncode == 0  # the agent's user reads it
            stranger = read_as("nobody", path)
            assert stranger.returncode != 0 and b"Permission denied" in stranger.stderr
    finally:
        site.stop()
