"""How the hosts of a site sign their requests to each other's peer routes (pure).

Each host has an Ed25519 peer key (``peer.key`` in its data directory) and records the public
half in its member record. A peer request carries the sending host's id, the time and a
signature over ``METHOD\\nPATH?QUERY\\nTIME\\nHOST``; the receiver looks the host up in the
replicated state, so a removed or revoked host's signatures stop working at once. Bodies are
not covered: the peer routes' answers are either public to the site (image blobs, release
wheels) or sealed to the key the receiver has on record for the named host (unseal answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from raft.durable import write_durably

HOST_HEADER = "X-Meshorch-Host"
TIME_HEADER = "X-Meshorch-Host-Time"
SIGNATURE_HEADER = "X-Meshorch-Host-Signature"
MAX_CLOCK_SKEW_S = 120.0
KEY_FILE = "peer.key"


class PeerAuthError(Exception):
    """A peer request that must be refused."""


def _message(method: str, path_qs: str, time_text: str, host_id: str) -> bytes:
    return f"{method.upper()}\n{path_qs}\n{time_text}\n{host_id}".encode()


class PeerSigner:
    """Signs this host's requests to its peers."""

    def __init__(
        self, host_id: str, key: SigningKey, clock: Callable[[], float] = time.time
    ) -> None:
        self.host_id = host_id
        self.key = key
        self.clock = clock

    @property
    def public_key_hex(self) -> str:
        return bytes(self.key.verify_key).hex()

    def headers(self, method: str, path_qs: str) -> dict[str, str]:
        time_text = f"{self.clock():.3f}"
        message = _message(method, path_qs, time_text, self.host_id)
        signature = self.key.sign(message).signature.hex()
        return {HOST_HEADER: self.host_id, TIME_HEADER: time_text, SIGNATURE_HEADER: signature}


def claimed_host(headers: Mapping[str, str]) -> str | None:
    return headers.get(HOST_HEADER) or None


def verify(
    public_key_hex: str, headers: Mapping[str, str], method: str, path_qs: str, now: float
) -> None:
    """Raise PeerAuthError unless the headers prove the request comes from that key."""
    host_id = headers.get(HOST_HEADER, "")
    time_text = headers.get(TIME_HEADER, "")
    try:
        sent_at = float(time_text)
        signature = bytes.fromhex(headers.get(SIGNATURE_HEADER, ""))
        key = VerifyKey(bytes.fromhex(public_key_hex))
    except ValueError:
        raise PeerAuthError("malformed time, signature or key") from None
    if not abs(now - sent_at) <= MAX_CLOCK_SKEW_S:  # also refuses NaN
        raise PeerAuthError(f"request time is {now - sent_at:+.0f} s away from this host's")
    try:
        key.verify(_message(method, path_qs, time_text, host_id), signature)
    except (BadSignatureError, ValueError):
        raise PeerAuthError("the signature does not match the host's peer key") from None


def load_or_create_key(data_dir: Path) -> SigningKey:
    """This host's peer key, made on first use (readable by the agent's user only)."""
    path = data_dir / KEY_FILE
    if path.exists():
        return SigningKey(bytes.fromhex(path.read_text().strip()))
    key = SigningKey.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    write_durably(path, bytes(key).hex().encode())  # never an empty key after a power cut
    return key
