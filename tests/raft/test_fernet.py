"""raft.fernet makes and reads the tokens cryptography.fernet does, byte for byte the same
format: hosts on either side of the change talk to each other during a rolling upgrade."""

import base64
import hmac
import os
import sys

import pytest
from cryptography import fernet as reference
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from raft import fernet
from raft.fernet import Fernet, InvalidToken, MultiFernet, derive_key

SIZES = [0, 1, 15, 16, 17, 32, 1000, 65_536]


def reference_key(password: bytes) -> bytes:
    """pysyncobj.encryptor.getEncryptor's key, computed with cryptography's PBKDF2."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=fernet.SALT, iterations=100_000)
    return base64.urlsafe_b64encode(kdf.derive(password))


KEY = derive_key("the-cluster-password")


def test_the_key_is_pysyncobjs() -> None:
    assert reference_key(b"the-cluster-password") == KEY
    assert derive_key(b"the-cluster-password") == KEY


@pytest.mark.parametrize("size", SIZES)
def test_tokens_cross_both_ways(size: int) -> None:
    data = os.urandom(size)
    ours, theirs = Fernet(KEY), reference.Fernet(KEY)
    token = ours.encrypt_at_time(data, 1_234_567)
    assert theirs.decrypt(token) == data
    assert theirs.extract_timestamp(token) == 1_234_567
    token = theirs.encrypt_at_time(data, 7_654_321)
    assert ours.decrypt(token) == data
    assert ours.extract_timestamp(token) == 7_654_321
    assert ours.decrypt(token.decode()) == data


def test_a_changed_byte_or_junk_is_refused() -> None:
    raw = base64.urlsafe_b64decode(Fernet(KEY).encrypt(b"a raft message"))
    for index in range(len(raw)):
        changed = bytearray(raw)
        changed[index] ^= 0x01
        with pytest.raises(InvalidToken):
            Fernet(KEY).decrypt(base64.urlsafe_b64encode(bytes(changed)))
    junk = [b"", b"!!!!", b"gAAAAA", base64.urlsafe_b64encode(b"\x80" + bytes(56))]
    for token in junk:
        with pytest.raises(InvalidToken):
            Fernet(KEY).decrypt(token)
        with pytest.raises(InvalidToken):
            Fernet(KEY).extract_timestamp(token)


def test_a_token_signed_right_but_badly_padded_is_refused() -> None:
    """Not a token cryptography would make: the padding is checked after the signature."""
    raw = bytearray(base64.urlsafe_b64decode(Fernet(KEY).encrypt_at_time(b"x" * 16, 1)))
    body = bytes(raw[:-32])
    key = base64.urlsafe_b64decode(KEY)
    encrypt, _ = fernet._ciphers()
    ciphertext = encrypt(key[16:], body[9:25], b"\x02" * 16)  # padding that says 2, then 2s
    body = body[:25] + ciphertext
    ok = body + hmac.digest(key[:16], body, "sha256")
    assert Fernet(KEY).decrypt(base64.urlsafe_b64encode(ok)) == b"\x02" * 14
    body = body[:25] + encrypt(key[16:], body[9:25], b"\x03" * 15 + b"\x00")
    bad = body + hmac.digest(key[:16], body, "sha256")
    with pytest.raises(InvalidToken):
        Fernet(KEY).decrypt(base64.urlsafe_b64encode(bad))
    with pytest.raises(reference.InvalidToken):
        reference.Fernet(KEY).decrypt(base64.urlsafe_b64encode(bad))


def test_multifernet_sends_with_the_first_and_accepts_any() -> None:
    old, new = Fernet(derive_key("old")), Fernet(KEY)
    ring = MultiFernet([new, old])
    token = ring.encrypt_at_time(b"m", 5)
    assert new.decrypt(token) == b"m"
    assert ring.decrypt(old.encrypt_at_time(b"n", 6)) == b"n"
    assert ring.extract_timestamp(old.encrypt_at_time(b"n", 6)) == 6
    with pytest.raises(InvalidToken):
        MultiFernet([old]).decrypt(token)
    with pytest.raises(InvalidToken):
        MultiFernet([old]).extract_timestamp(token)


def test_both_ciphers_give_aes_known_answer() -> None:
    assert fernet._libcrypto_ciphers() is not None  # Linux, CPython with a shared libcrypto
    assert fernet._known_answer(*fernet._ciphers())
    assert fernet._known_answer(*fernet._cryptography_ciphers())


def test_raft_does_not_import_cryptography() -> None:
    code = "import raft, sys; sys.exit('cryptography' in sys.modules)"
    assert os.spawnv(os.P_WAIT, sys.executable, [sys.executable, "-c", code]) == 0


def test_without_hashlibs_libcrypto_cryptographys_aes_makes_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fernet, "_libcrypto_ciphers", lambda: None)
    fernet._ciphers.cache_clear()
    try:
        assert fernet._ciphers()[0].__module__ == fernet.__name__
        assert "_cryptography_ciphers" in fernet._ciphers()[0].__qualname__
        data = os.urandom(100)
        token = Fernet(KEY).encrypt_at_time(data, 42)
        assert reference.Fernet(KEY).decrypt(token) == data
        assert Fernet(KEY).decrypt(reference.Fernet(KEY).encrypt(data)) == data
    finally:
        fernet._ciphers.cache_clear()
