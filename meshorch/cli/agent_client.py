"""A blocking call to an agent's API for the command line (one request, JSON both ways)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson

from meshorch.errors import ConfigurationError


def call_agent(api: str, method: str, path: str, body: object | None = None) -> dict[str, Any]:
    """``api`` is HOST:PORT. Refusals and unreachable agents become ConfigurationError
    with the agent's own error code and message."""
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(f"http://{api}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return dict(orjson.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            error = orjson.loads(exc.read())["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = str(exc)
        raise ConfigurationError(f"the agent at {api} refused: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigurationError(f"cannot reach the agent at {api}: {exc}") from exc
