"""Sizes as the agent (``--memory``) and the hub (``--logs-max-bytes``) read them."""

from __future__ import annotations

import pytest

from meshorch.errors import ConfigurationError
from meshorch.sizes import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512Mi", 512 << 20), ("512MiB", 512 << 20), ("2Gi", 2 << 30), ("1G", 10**9),
     ("1TB", 10**12), ("1.5Ki", 1536), ("4096", 4096), ("4096B", 4096), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "Mi", "-1Mi", "nan", "inf", "12 apples", "1PiB"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(ConfigurationError, match="bad size"):
        parse_size(text)
