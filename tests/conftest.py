"""Session-wide clean-up of what agents leave outside their data dirs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.secrets.service import DELIVERY_DIR, TMPFS_ROOTS
from tests import agent_token  # noqa: F401 - sets $MESHORCH_AGENT_TOKEN before any agent starts


def _delivery_dirs() -> set[Path]:
    found: set[Path] = set()
    for root in TMPFS_ROOTS:
        base = root / DELIVERY_DIR
        if base.is_dir():
            found.update(base.iterdir())
    return found


@pytest.fixture(scope="session", autouse=True)
def remove_secret_deliveries() -> Iterator[None]:
    """Agents killed by tests leave their secret files on tmpfs (a restarted agent would
    sweep them); remove the ones this run created, and only those."""
    before = _delivery_dirs()
    yield
    for path in _delivery_dirs() - before:
        shutil.rmtree(path, ignore_errors=True)
