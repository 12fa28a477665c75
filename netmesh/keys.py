"""WireGuard key pairs (Curve25519), sealed boxes and fingerprints.

Keys travel as WireGuard spells them: standard base64 of the 32 raw bytes
(44 characters, one ``=`` of padding), so they can be handed to ``wg``
unchanged and compared with ``wg show`` output.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from netmesh.errors import InvalidKeyError, KeyFileError, UnsealError

logger = logging.getLogger(__name__)

KEY_LEN = 32
DEFAULT_KEY_FILE = "wireguard.key"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A Curve25519 key pair in WireGuard's base64 format."""

    # repr=False so a logged or printed KeyPair never leaks the secret.
    private_key_b64: str = field(repr=False)
    public_key_b64: str


def decode_key(key_b64: str) -> bytes:
    """Decode a WireGuard base64 key to its 32 raw bytes, or raise InvalidKeyError."""
    text = key_b64.strip()
    # WireGuard keys are exactly 44 chars; checking first rejects long garbage cheaply.
    if len(text) != 44:
        raise InvalidKeyError(f"key must be 44 base64 characters, got {len(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidKeyError(f"key is not valid base64: {exc}") from exc
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"key must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    """Encode 32 raw key bytes in WireGuard's base64 format."""
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"key must be {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def _clamp(raw: bytes) -> bytes:
    # Same clamping as `wg genkey`, so our files look like the tool's own.
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key_from_private(private_key_b64: str) -> str:
    """Return the public key for a private key (what `wg pubkey` prints)."""
    private = PrivateKey(decode_key(private_key_b64))
    return encode_key(bytes(private.public_key))


def keypair_from_private(private_key_b64: str) -> KeyPair:
    """Build a KeyPair from a private key alone."""
    return KeyPair(
        private_key_b64=private_key_b64.strip(),
        public_key_b64=public_key_from_private(private_key_b64),
    )


def generate_keypair() -> KeyPair:
    """Create a fresh random key pair."""
    raw = _clamp(bytes(PrivateKey.generate()))
    return keypair_from_private(encode_key(raw))


def load_or_create_keypair(
    directory: str | os.PathLike[str], name: str = DEFAULT_KEY_FILE
) -> KeyPair:
    """Load the private key file ``directory/name``, creating it (mode 0600) if absent.

    The file holds the private key in base64 plus a newline, like `wg genkey`.
    """
    folder = Path(directory)
    path = folder / name
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {folder}: {exc}") from exc
    if path.exists():
        return _load_key_file(path)
    pair = generate_keypair()
    if not _write_private_key(path, pair.private_key_b64):
        # Another process won the race; its key is the one that counts.
        return _load_key_file(path)
    logger.info("created WireGuard key %s (public key %s)", path, pair.public_key_b64)
    return pair


def _load_key_file(path: Path) -> KeyPair:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if mode & 0o077:
        # A readable secret is already compromised-ish; tighten it and say so.
        logger.warning("key file %s had mode %o; setting 0600", path, mode)
        try:
            path.chmod(0o600)
        except OSError as exc:
            raise KeyFileError(f"cannot chmod key file {path}: {exc}") from exc
    try:
        return keypair_from_private(text)
    except InvalidKeyError as exc:
        raise KeyFileError(f"key file {path} does not hold a WireGuard key: {exc}") from exc


def _write_private_key(path: Path, private_key_b64: str) -> bool:
    """Create the key file; return False if it already existed (left untouched)."""
    # Write to a 0600 temp file and rename: no window where the key is readable
    # by others, and no half-written key file after a crash.
    try:
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file in {path.parent}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(private_key_b64 + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        # O_EXCL-like semantics: never clobber a key another process just wrote.
        os.link(tmp, path)
    except FileExistsError:
        logger.debug("key file %s appeared concurrently; keeping it", path)
        return False
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def seal(message: bytes, recipient_public_b64: str) -> bytes:
    """Encrypt ``message`` so only the holder of the recipient's private key can read it."""
    recipient = PublicKey(decode_key(recipient_public_b64))
    return bytes(SealedBox(recipient).encrypt(message))


def unseal(sealed: bytes, private_key: KeyPair | str) -> bytes:
    """Open a sealed box with our private key (a KeyPair or its base64 private key)."""
    private_b64 = private_key.private_key_b64 if isinstance(private_key, KeyPair) else private_key
    box = SealedBox(PrivateKey(decode_key(private_b64)))
    try:
        return box.decrypt(sealed)
    except (CryptoError, ValueError, TypeError) as exc:
        raise UnsealError(f"cannot unseal {len(sealed)} bytes: not sealed to this key") from exc


def fingerprint(public_key_b64: str) -> str:
    """Short pin for a public key: hex of the first 16 bytes of its SHA-256."""
    return hashlib.sha256(decode_key(public_key_b64)).digest()[:16].hex()
