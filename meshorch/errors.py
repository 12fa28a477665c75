"""Exceptions of the orchestrator domain and its services.

MeshorchError
├── ConfigurationError     bad flags, files or settings, found before starting
├── RemoteInputError       a peer or client sent something invalid (answered, logged)
└── ServiceError           a service could not start or stopped unexpectedly
"""

from __future__ import annotations


class MeshorchError(Exception):
    """Root of every error raised by the ``meshorch`` package."""


class ConfigurationError(MeshorchError):
    """Configuration that cannot work; the message says what to change."""


class RemoteInputError(MeshorchError):
    """Input from the network that is invalid. ``code`` is a stable, machine-readable tag."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServiceError(MeshorchError):
    """A service failed at run time."""
