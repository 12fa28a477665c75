"""The hub's key files at rest, sealed with a key-encryption key (KEK) the operator gives.

The data directory holds the hub's keys: ``fleet-root.key`` (and, during a root rotation,
``fleet-root.key.new``; old ones as ``fleet-root.key.<n>.retired``), ``secrets.key``,
``escrow.key``, ``gossip.key`` and the self-signed certificate's ``tls.key``
(``LOCAL_KEY_FILES``: each replica of a replicated hub has its own). Each is written
sealed (``nacl.secret.SecretBox``) with the KEK, so a copy of the data directory or of
its backup holds no key::

    meshorch-sealed-key 1 kek=<KEK id, 16 hex>
    <base64 of nonce + ciphertext of the file's plain text>

The KEK is 32 random bytes, hex or base64, from ``--kek-file PATH`` or the environment
variable ``MESHORCH_HUB_KEK``; its id (``Kek.id``) is a hash of it, so a file says which
KEK sealed it and a wrong KEK is named as such. Without a KEK (``kek=None``: the library
default, ``meshorch hub --insecure-no-kek``) files are written in plain text, and a sealed
file is refused. A plain-text file is read as such, and sealed at the first start with a
KEK (``seal_plain_files``).

``rotate`` re-seals every key file under a new KEK, crash-safely: each file is written
sealed anew to ``NAME.kek-new`` (fsync'd), then the marker ``kek-rotation`` (the new KEK's
id) is written durably, then each ``.kek-new`` is renamed over its file, the directory
fsync'd and the marker removed. ``recover`` (at every start, and before a rotation)
finishes a rotation whose marker exists (it needs the new KEK) and discards ``.kek-new``
files written before the marker (the old files are all intact then).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from central_hub.errors import HubConfigError
from raft.durable import fsync_directory, write_durably

logger = logging.getLogger(__name__)

KEK_ENV = "MESHORCH_HUB_KEK"
KEK_BYTES = 32
MAGIC = "meshorch-sealed-key"
FORMAT_VERSION = 1
PENDING_SUFFIX = ".kek-new"
ROTATION_MARKER = "kek-rotation"
PLAIN_KEY_FILES = (
    "fleet-root.key",
    "fleet-root.key.new",
    "secrets.key",
    "escrow.key",
    "gossip.key",
)
# Key files of this data dir only: never replicated between hub replicas.
LOCAL_KEY_FILES = ("tls.key",)


@dataclass(frozen=True)
class Kek:
    """A key-encryption key; ``source`` says where it came from (for messages)."""

    key: bytes
    source: str = "KEK"

    @property
    def id(self) -> str:
        return hashlib.blake2b(self.key, digest_size=8, person=b"meshorch-kek").hexdigest()


def parse_kek(text: str, source: str) -> Kek:
    """32 bytes as 64 hex characters or base64 (surrounding white space ignored)."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 2 * KEK_BYTES:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEK_BYTES:
        raise HubConfigError(
            f"{source}: not a KEK (32 random bytes as 64 hex characters or base64; "
            "make one with `meshorch hub new-kek PATH`)"
        )
    return Kek(raw, source)


def read_kek_file(path: Path) -> Kek:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise HubConfigError(f"cannot read the KEK file {path}: {exc}") from None
    return parse_kek(text, f"KEK file {path}")


def default_kek_path(data_dir: Path) -> Path:
    """``DATA_DIR.kek``: beside the data dir, not in it (a copy of the dir lacks it)."""
    return data_dir.parent / (data_dir.name + ".kek")


def kek_from_env() -> Kek | None:
    text = os.environ.get(KEK_ENV)
    return None if not text else parse_kek(text, f"${KEK_ENV}")


def new_kek_file(path: Path) -> Kek:
    """Create ``path`` (0600, not overwritten) holding a new random KEK in hex."""
    raw = os.urandom(KEK_BYTES)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise HubConfigError(f"{path} exists: a KEK file is never overwritten") from None
    except OSError as exc:
        raise HubConfigError(f"cannot create the KEK file {path}: {exc}") from None
    try:
        os.write(fd, (raw.hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return Kek(raw, f"KEK file {path}")


# -- durable writes -------------------------------------------------------------------------


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) atomically and durably."""
    write_durably(path, text.encode(), 0o600)


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``path`` (0600, replacing a leftover) and fsync it; not the directory."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- sealed files -----------------------------------------------------------------------------


def seal_text(text: str, kek: Kek) -> str:
    box = SecretBox(kek.key)
    sealed = base64.b64encode(bytes(box.encrypt(text.encode()))).decode()
    return f"{MAGIC} {FORMAT_VERSION} kek={kek.id}\n{sealed}\n"


def sealed_by(data: str) -> str | None:
    """The KEK id in a sealed file's header; None for a plain-text file."""
    if not data.startswith(MAGIC + " "):
        return None
    header = data.split("\n", 1)[0].split()
    if len(header) != 3 or header[1] != str(FORMAT_VERSION) or not header[2].startswith("kek="):
        return "?"
    return header[2][4:]


def open_text(path: Path, data: str, kek: Kek | None) -> str:
    """The plain text of a key file's content ``data`` (plain text is returned as is)."""
    sealer = sealed_by(data)
    if sealer is None:
        return data
    if sealer == "?":
        raise HubConfigError(f"{path}: a sealed key file of an unknown format (a newer meshorch?)")
    if kek is None:
        raise HubConfigError(
            f"{path} is sealed by KEK {sealer}, and no KEK was given: give the KEK that "
            f"sealed it with --kek-file PATH or ${KEK_ENV}"
        )
    if sealer != kek.id:
        raise HubConfigError(
            f"{path} is sealed by KEK {sealer}, not by the KEK given ({kek.source}, "
            f"id {kek.id}): wrong KEK"
        )
    try:
        sealed = base64.b64decode(data.split("\n", 1)[1].strip(), validate=True)
        return SecretBox(kek.key).decrypt(sealed).decode()
    except (CryptoError, binascii.Error, ValueError, IndexError):
        raise HubConfigError(
            f"{path} does not open with KEK {kek.id} ({kek.source}): the file is damaged"
        ) from None


def read_key_text(path: Path, kek: Kek | None, what: str = "key") -> str:
    """The plain text of the key file ``path``, stripped; HubConfigError saying why not."""
    try:
        data = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise HubConfigError(f"cannot read the {what} {path}: {exc}") from None
    return open_text(path, data, kek).strip()


def write_key_text(path: Path, text: str, kek: Kek | None) -> None:
    """Write a key file: sealed with ``kek``, plain text without one; atomic and durable."""
    write_secret_file(path, text if kek is None else seal_text(text, kek))


# -- the data directory's key files -------------------------------------------------------------


def key_files(data_dir: Path) -> list[Path]:
    """Every key file of the data directory, sorted."""
    names = PLAIN_KEY_FILES + LOCAL_KEY_FILES
    found = [data_dir / name for name in names if (data_dir / name).is_file()]
    found += [p for p in data_dir.glob("fleet-root.key.*.retired") if p.is_file()]
    return sorted(found)


def check_open(data_dir: Path, kek: Kek | None) -> None:
    """Raise HubConfigError, naming the file and why, unless every key file opens."""
    for path in key_files(data_dir):
        read_key_text(path, kek)


def seal_plain_files(data_dir: Path, kek: Kek) -> list[Path]:
    """Seal with ``kek`` every key file still in plain text (a data dir of an older hub or
    of one run without a KEK); returns them."""
    sealed = []
    for path in key_files(data_dir):
        data = path.read_text()
        if sealed_by(data) is None:
            write_key_text(path, data, kek)
            sealed.append(path)
    if sealed:
        logger.warning(
            "sealed %d plain-text key file(s) of %s with KEK %s (%s): %s",
            len(sealed), data_dir, kek.id, kek.source, ", ".join(p.name for p in sealed),
        )  # fmt: skip
    return sealed


def recover(data_dir: Path, kek: Kek | None) -> None:
    """Finish or discard a KEK rotation a crash interrupted (module docstring)."""
    pending = sorted(data_dir.glob("*" + PENDING_SUFFIX))
    marker = data_dir / ROTATION_MARKER
    if not marker.exists():
        for path in pending:  # written before the marker: the old files are intact
            logger.warning("discarding %s of a KEK rotation that did not complete", path)
            path.unlink()
        if pending:
            fsync_directory(data_dir)
        return
    target = marker.read_text().strip()
    if kek is None or kek.id != target:
        given = "no KEK was given" if kek is None else f"the KEK given is {kek.id}"
        raise HubConfigError(
            f"{data_dir} is in the middle of a KEK rotation to KEK {target} ({marker} "
            f"exists), and {given}: start with the new KEK, or run `meshorch hub rotate-kek` "
            "again with the same --old and --new"
        )
    for path in pending:
        read_key_text(path, kek)  # each must open before any is put in place
    for path in pending:
        os.replace(path, path.with_name(path.name.removesuffix(PENDING_SUFFIX)))
    fsync_directory(data_dir)
    marker.unlink()
    fsync_directory(data_dir)
    if pending:
        logger.warning("finished the KEK rotation to %s a crash interrupted", target)


def rotate(data_dir: Path, old: Kek | None, new: Kek) -> list[Path]:
    """Re-seal every key file of ``data_dir`` with ``new`` (module docstring); ``old``
    opens them (plain-text files need none). The caller holds the data dir's lock."""
    marker = data_dir / ROTATION_MARKER
    if marker.exists() and marker.read_text().strip() == new.id:
        recover(data_dir, new)  # a crash after the marker: only the renames are left
    else:
        recover(data_dir, old)
    files = key_files(data_dir)
    texts = [read_key_text(path, old) for path in files]  # all open before anything is written
    for path, text in zip(files, texts, strict=True):
        write_new_file(
            path.with_name(path.name + PENDING_SUFFIX), seal_text(text + "\n", new).encode()
        )
    fsync_directory(data_dir)
    write_new_file(marker, (new.id + "\n").encode())
    fsync_directory(data_dir)
    recover(data_dir, new)
    return files
