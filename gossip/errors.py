"""Exceptions of the gossip package.

GossipError
├── ConfigError                 a GossipConfig value is out of range (lists every problem)
├── LocalProtocolError          the caller misused the API (summary too large, node has left)
└── RemoteProtocolError         a peer's datagram cannot be decoded; Node.receive counts,
    │                           logs and drops it, it never propagates out of the core
    ├── UnsupportedVersionError the datagram speaks a wire version this code does not know
    ├── TruncatedPacketError    the datagram ends inside a message
    ├── OversizedPacketError    the datagram, or a field in it, exceeds a limit
    └── MalformedPacketError    anything else: unknown type, bad UTF-8, trailing bytes, ...
"""

from __future__ import annotations


class GossipError(Exception):
    """Root of every error raised by the ``gossip`` package."""


class ConfigError(GossipError, ValueError):
    """A configuration is invalid; ``problems`` names every offending field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class LocalProtocolError(GossipError):
    """The local caller asked for something the protocol cannot do."""


class RemoteProtocolError(GossipError):
    """Bytes from a peer that are not a valid packet of this wire version."""


class UnsupportedVersionError(RemoteProtocolError):
    """The first byte names a wire version this code does not speak."""


class TruncatedPacketError(RemoteProtocolError):
    """The datagram ends before the message it announces."""


class OversizedPacketError(RemoteProtocolError):
    """The datagram or one of its fields is larger than allowed."""


class MalformedPacketError(RemoteProtocolError):
    """The datagram is structurally wrong (type, encoding, counts, trailing bytes)."""
