"""Exceptions of the WireGuard mesh substrate.

NetmeshError
├── KeyMaterialError          keys and sealed boxes
│   ├── InvalidKeyError       not a 32-byte key in WireGuard's base64
│   ├── KeyFileError          a key file that cannot be read, written or parsed
│   └── UnsealError           sealed bytes that do not open with our key
├── AddressError              overlay address plan
│   ├── AddressPoolExhausted  no free host address left in the plan
│   ├── InvalidAddressError   outside the plan, reserved, or not an address
│   └── AddressInUseError     already given to another host
├── WireGuardError            interface reconciler
│   ├── BackendUnavailableError  neither kernel WireGuard nor wireguard-go works
│   ├── CommandError          a `wg` / `ip` command failed
│   └── StateParseError       `wg show dump` / `ip -j addr` output we cannot read
└── DiscoveryError            mDNS discovery
    ├── RemoteRecordError     a peer's TXT record is malformed (remote input)
    └── DiscoveryTimeout      not enough peers showed up in time
"""

from __future__ import annotations

from collections.abc import Sequence


class NetmeshError(Exception):
    """Root of every error raised by the ``netmesh`` package."""


class KeyMaterialError(NetmeshError):
    """A key or sealed message is unusable."""


class InvalidKeyError(KeyMaterialError):
    """The text is not a 32-byte key in WireGuard's base64 format."""


class KeyFileError(KeyMaterialError):
    """A key file could not be read, written or parsed."""


class UnsealError(KeyMaterialError):
    """Sealed bytes are garbage, truncated, or sealed to another key."""


class AddressError(NetmeshError):
    """An overlay address plan rejected a request."""


class AddressPoolExhausted(AddressError):
    """Every usable host address of the plan is taken."""


class InvalidAddressError(AddressError):
    """The address is not a usable host address of the plan."""


class AddressInUseError(AddressError):
    """The address is already allocated to someone else."""


class WireGuardError(NetmeshError):
    """The WireGuard interface could not be brought to the desired state."""


class BackendUnavailableError(WireGuardError):
    """Neither kernel WireGuard nor wireguard-go can create the interface."""


class CommandError(WireGuardError):
    """An external command failed.

    ``argv`` never contains secrets: private keys go through stdin.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip() or "(no stderr)"
        super().__init__(f"command {' '.join(self.argv)!r} exited {returncode}: {detail}")


class StateParseError(WireGuardError):
    """Output of `wg show dump` or `ip -j addr show` could not be parsed."""


class DiscoveryError(NetmeshError):
    """mDNS discovery failed."""


class RemoteRecordError(DiscoveryError):
    """A discovered TXT record is malformed; it is logged, counted and ignored."""


class DiscoveryTimeout(DiscoveryError, TimeoutError):
    """Fewer peers than asked for were discovered before the deadline."""
