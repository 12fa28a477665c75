"""Exceptions of the hub.

::

    HubError
    ├── HubConfigError   bad flags, settings or data directory, found before serving
    ├── ApiError         a request answered with a JSON error (status, code, message)
    └── BadStoredRecord  a stored record the hub cannot read (skipped with a warning)

Parsers of remote input raise ``meshorch.errors.RemoteInputError`` (answered 400 with its
``code``); ``InputProblems`` is the one that lists every problem found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshorch.errors import RemoteInputError


class HubError(Exception):
    """Root of every error raised by ``central_hub``."""


class HubConfigError(HubError):
    """Configuration or data directory that cannot work; the message says what to change."""


class ApiError(HubError):
    """Answered as ``{"error": {"code": code, "message": message}}`` with ``status`` (and
    ``headers``, e.g. a 429's ``Retry-After``; ``details``, an object the error carries as
    ``error.details``, e.g. what a change needing confirmation would stop)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = None if details is None else dict(details)


class InputProblems(RemoteInputError):
    """Remote input with one or more problems, every one listed in ``problems``."""

    def __init__(self, code: str, what: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "; ".join(self.problems)
        super().__init__(code, f"{what}: {lines}")


class BadStoredRecord(HubError):
    """A record of the store that does not parse (written by another version, or damaged)."""
