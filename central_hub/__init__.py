"""The central hub: operators declare applications and placement; the hub turns them into
signed, versioned deltas that sites fetch over their own outbound link.

Entry points: ``Hub`` (an async context manager) with ``HubConfig``, and ``cli.main``
(``python -m central_hub``). See ``central_hub.service`` for the life cycle and
``docs/fleet-link.md`` for the site link.
"""

from central_hub.config import HubConfig
from central_hub.errors import ApiError, HubConfigError, HubError
from central_hub.service import Hub

__all__ = ["ApiError", "Hub", "HubConfig", "HubConfigError", "HubError"]
