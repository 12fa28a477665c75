"""A real hub process for the fleet tests (``meshorch.demo.localsite.LocalHub``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshorch.demo.localsite import LocalHub


@contextmanager
def running_hub(root: Path, *extra_args: str) -> Iterator[LocalHub]:
    """A hub of fleet ``acme`` in ``root/hub``; its log is printed when it stops."""
    hub = LocalHub(root / "hub", fleet="acme", extra_args=list(extra_args))
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
        print(hub.logs())
