"""Keys: WireGuard base64 format, key files, sealed boxes, fingerprints."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from netmesh import (
    InvalidKeyError,
    KeyFileError,
    NetmeshError,
    UnsealError,
    fingerprint,
    generate_keypair,
    keypair_from_private,
    load_or_create_keypair,
    public_key_from_private,
    seal,
    unseal,
)
from tests.labutil import LAB_REQUIRED


def _need_wg() -> str:
    wg = shutil.which("wg")
    if wg is None:
        msg = "`wg` (wireguard-tools) not installed"
        if LAB_REQUIRED:
            pytest.fail(msg + " (MESHORCH_REQUIRE_LAB=1)", pytrace=False)
        pytest.skip(msg)
    return wg


def test_generated_keys_are_wireguard_base64() -> None:
    pair = generate_keypair()
    for key in (pair.private_key_b64, pair.public_key_b64):
        assert len(key) == 44 and key.endswith("=")
        assert len(base64.b64decode(key, validate=True)) == 32
    assert public_key_from_private(pair.private_key_b64) == pair.public_key_b64
    raw = base64.b64decode(pair.private_key_b64)
    # Clamped like `wg genkey`.
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64 == 64


def test_keypair_repr_hides_private_key() -> None:
    pair = generate_keypair()
    assert pair.private_key_b64 not in repr(pair)
    assert pair.public_key_b64 in repr(pair)


def test_public_key_matches_wg_pubkey() -> None:
    wg = _need_wg()
    pair = generate_keypair()
    out = subprocess.run(
        [wg, "pubkey"],
        input=pair.private_key_b64 + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == pair.public_key_b64


def test_wg_genkey_is_accepted() -> None:
    wg = _need_wg()
    private = subprocess.run(
        [wg, "genkey"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    public = subprocess.run(
        [wg, "pubkey"],
        input=private + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert keypair_from_private(private).public_key_b64 == public


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "!" * 44,
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
    ],
)
def test_invalid_keys_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        public_key_from_private(bad)
    with pytest.raises(InvalidKeyError):
        fingerprint(bad)


def test_load_or_create_creates_0600_then_reloads(tmp_path: Path) -> None:
    keydir = tmp_path / "state" / "keys"
    first = load_or_create_keypair(keydir)
    path = keydir / "wireguard.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == first.private_key_b64 + "\n"
    assert load_or_create_keypair(keydir) == first
    assert [p.name for p in keydir.iterdir()] == ["wireguard.key"]  # no temp files left


def test_load_tightens_loose_permissions(tmp_path: Path) -> None:
    pair = generate_keypair()
    path = tmp_path / "k"
    path.write_text(pair.private_key_b64 + "\n")
    os.chmod(path, 0o644)
    assert load_or_create_keypair(tmp_path, "k") == pair
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("not a key\n")
    os.chmod(tmp_path / "k", 0o600)
    with pytest.raises(KeyFileError):
        load_or_create_keypair(tmp_path, "k")


def test_seal_unseal_round_trip() -> None:
    pair = generate_keypair()
    message = b"secret \x00 bytes" * 10
    sealed = seal(message, pair.public_key_b64)
    assert message not in sealed
    assert unseal(sealed, pair) == message
    assert unseal(sealed, pair.private_key_b64) == message
    assert seal(message, pair.public_key_b64) != sealed  # ephemeral key each time


@pytest.mark.parametrize("garbage", [b"", b"short", b"\x00" * 48, b"\xff" * 200])
def test_unseal_garbage_raises(garbage: bytes) -> None:
    with pytest.raises(UnsealError):
        unseal(garbage, generate_keypair())


def test_unseal_with_wrong_key_raises() -> None:
    sealed = seal(b"hello", generate_keypair().public_key_b64)
    with pytest.raises(UnsealError) as info:
        unseal(sealed, generate_keypair())
    assert isinstance(info.value, NetmeshError)


def test_unseal_tampered_raises() -> None:
    pair = generate_keypair()
    sealed = bytearray(seal(b"hello", pair.public_key_b64))
    sealed[-1] ^= 1
    with pytest.raises(UnsealError):
        unseal(bytes(sealed), pair)


def test_fingerprint_is_short_stable_and_distinct() -> None:
    a, b = generate_keypair(), generate_keypair()
    fa = fingerprint(a.public_key_b64)
    assert len(fa) == 32 and int(fa, 16) >= 0
    assert fingerprint(a.public_key_b64) == fa
    assert fingerprint(b.public_key_b64) != fa
