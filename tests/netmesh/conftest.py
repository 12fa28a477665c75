from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netmesh.labnet import LabNet


@pytest.fixture
def labnet() -> Iterator[LabNet]:
    net = LabNet()
    try:
        yield net
    finally:
        net.cleanup()
