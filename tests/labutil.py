"""Gate for lab tests: they need root, network namespaces and some tools.

Outside CI a missing prerequisite skips the test with the reason; with
MESHORCH_REQUIRE_LAB=1 (set by .ci/run) it fails instead, so a green CI run
always means the lab tests really ran.
"""

from __future__ import annotations

import os
import shutil

import pytest

LAB_REQUIRED = os.environ.get("MESHORCH_REQUIRE_LAB") == "1"


def require_lab(*tools: str) -> None:
    """Skip (or fail under MESHORCH_REQUIRE_LAB=1) unless root and all tools exist."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            problems.append(f"tool {tool!r} not found on PATH")
    if not problems:
        return
    message = "lab prerequisites missing: " + "; ".join(problems)
    if LAB_REQUIRED:
        pytest.fail(message + " (MESHORCH_REQUIRE_LAB=1)", pytrace=False)
    pytest.skip(message)
