"""meshorch: an orchestrator for containerised applications at edge sites."""

import sys

__version__ = "0.1.0"

# aiohttp keeps its signal and middleware lists in frozenlist's FrozenList, whose C++ build
# loads libstdc++ into the process: 0.9 MiB of an agent's resident memory (VmRSS 49.4 ->
# 48.4 MiB, 2026-12-06) for a few lists frozen at startup. Unless frozenlist is imported already, it
# takes its pure Python FrozenList, the same class (what FROZENLIST_NO_EXTENSIONS=1 does,
# without an environment that every instance the agent starts would inherit).
if "frozenlist" not in sys.modules:
    sys.modules["frozenlist._frozenlist"] = None  # type: ignore[assignment]
