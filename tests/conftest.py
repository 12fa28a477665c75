"""Session-wide clean-up of what agents leave outside their data dirs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.secrets.service import DELIVERY_DIR, TMPFS_ROOTS, delivery_root
from tests import agent_token  # noqa: F401 - sets $MESHORCH_AGENT_TOKEN before any agent starts


def _delivery_dirs() -> set[Path]:
    found: set[Path] = set()
    for root in TMPFS_ROOTS:
        base = root / DELIVERY_DIR
        if base.is_dir():
            found.update(base.iterdir())
    return found


def _ours(basetemp: Path) -> set[str]:
    """The names of the delivery dirs of every data dir this session could have made
    (each is named by a hash of its data dir's path, which lives under ``basetemp``)."""
    return {delivery_root(Path(directory)).name for directory, _, _ in os.walk(basetemp)}


@pytest.fixture(scope="session", autouse=True)
def remove_secret_deliveries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Agents killed by tests leave their secret files on tmpfs (a restarted agent would
    sweep them); remove the ones this run created, and only those: another pytest run on
    the machine may have agents running with theirs."""
    before = _delivery_dirs()
    yield
    new = _delivery_dirs() - before
    if not new:
        return
    ours = _ours(tmp_path_factory.getbasetemp())
    for path in new:
        if path.name in ours:
            shutil.rmtree(path, ignore_errors=True)
