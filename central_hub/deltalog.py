"""The fleet root key on disk and the head of the delta log.

The root key is ``DATA_DIR/fleet-root.key``: the hex of the raw 32-byte Ed25519 seed, mode
0600, sealed with the hub's KEK (``central_hub.keyfiles``). A rotation is crash-safe in
three steps: the new key is written to ``fleet-root.key.new``; the ``root.rotate`` delta
and the new public key are committed to the store in one transaction; then the old file
becomes ``fleet-root.key.<n>.retired`` and the new one ``fleet-root.key``.
``recover_root_key`` finishes or discards a rotation that a crash interrupted, using the
store's record of which key is the root.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from central_hub.errors import HubConfigError
from central_hub.keyfiles import Kek, read_key_text, write_key_text
from central_hub.keyfiles import write_secret_file as write_secret_file
from meshorch.fleet.delta import DELTA_V1, GENESIS_HASH, Target, key_id, next_delta, sign
from raft.durable import fsync_directory

logger = logging.getLogger(__name__)

KEY_FILE = "fleet-root.key"
NEW_KEY_FILE = "fleet-root.key.new"


def retired_name(rotation: int) -> str:
    return f"{KEY_FILE}.{rotation}.retired"


@dataclass(frozen=True, slots=True)
class Head:
    version: int = 0
    hash: str = GENESIS_HASH
    issued_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "hash": self.hash, "issued_at": self.issued_at}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Head:
        return Head(int(data["version"]), str(data["hash"]), float(data["issued_at"]))


def build_delta(
    head: Head,
    fleet: str,
    ops: Sequence[Mapping[str, Any]],
    target: Target,
    now: float,
    ttl_s: float,
    keys: Sequence[SigningKey],
    format: int = DELTA_V1,
) -> tuple[bytes, Head]:
    """Sign the delta after ``head`` (of ``format``); returns the envelope (the full view)
    and the new head."""
    delta = next_delta(fleet, head.version, head.hash, ops, target, now, ttl_s, format)
    envelope, signed = sign(delta, keys)
    return envelope, Head(signed.version, signed.digest, now)


# -- key files ----------------------------------------------------------------------------


def read_key(path: Path, kek: Kek | None = None, what: str = "fleet root key") -> SigningKey:
    text = read_key_text(path, kek, what)
    try:
        return SigningKey(bytes.fromhex(text))
    except ValueError as exc:
        raise HubConfigError(f"cannot read the {what} {path}: {exc}") from None


def load_or_create_root_key(data_dir: Path, kek: Kek | None = None) -> SigningKey:
    path = data_dir / KEY_FILE
    if path.exists():
        return read_key(path, kek)
    key = SigningKey.generate()
    write_key_text(path, bytes(key).hex() + "\n", kek)
    logger.info("created the fleet root key %s", path)
    return key


def write_new_key(data_dir: Path, kek: Kek | None = None) -> SigningKey:
    key = SigningKey.generate()
    write_key_text(data_dir / NEW_KEY_FILE, bytes(key).hex() + "\n", kek)
    return key


def finish_rotation(data_dir: Path, rotation: int) -> None:
    """Retire the old key file and put the new one in place (after the commit)."""
    if (data_dir / KEY_FILE).exists():
        os.replace(data_dir / KEY_FILE, data_dir / retired_name(rotation))
    os.replace(data_dir / NEW_KEY_FILE, data_dir / KEY_FILE)
    fsync_directory(data_dir)


def recover_root_key(
    data_dir: Path, root_key: str, rotation: int, kek: Kek | None = None
) -> SigningKey:
    """The key whose public half is ``root_key``, finishing an interrupted rotation."""
    new_path = data_dir / NEW_KEY_FILE
    if new_path.exists():
        if key_id(read_key(new_path, kek)) == root_key:
            logger.warning("finishing the root key rotation a restart interrupted")
            finish_rotation(data_dir, rotation)
        else:
            logger.warning("discarding %s of a rotation that was never committed", new_path)
            new_path.unlink()
    key = read_key(data_dir / KEY_FILE, kek)
    if key_id(key) != root_key:
        raise HubConfigError(
            f"{data_dir / KEY_FILE} holds key {key_id(key)[:16]}..., but the fleet's root "
            f"key is {root_key[:16]}...: restore the right key file"
        )
    return key
