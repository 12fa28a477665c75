"""Sizes as people write them: ``512Mi``, ``2GiB``, ``1G``, ``1TB`` or plain bytes (pure)."""

from __future__ import annotations

from meshorch.errors import ConfigurationError

# Longest suffix first ("MiB" before "Mi" before "M"); binary and decimal, the "B" optional.
_UNITS = (
    *(
        (prefix + suffix, factor)
        for prefix, factor in (
            ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40),
            ("K", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12),
        )
        for suffix in ("B", "")
    ),
    ("B", 1),
)  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes; ConfigurationError for anything else than a size."""
    number, factor = text, 1
    for unit, unit_factor in _UNITS:
        if text.endswith(unit):
            number, factor = text[: -len(unit)], unit_factor
            break
    try:
        value = float(number) * factor
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ConfigurationError(f"bad size {text!r}: use e.g. 512Mi, 2GiB or bytes")
    return int(value)
