"""pysyncobj's encryption (Fernet tokens, a PBKDF2 key) without loading ``cryptography``.

pysyncobj encrypts every Raft message as a Fernet token (https://github.com/fernet/spec):
``0x80 | timestamp (8 bytes, big-endian) | IV (16) | AES-128-CBC ciphertext (PKCS7) |
HMAC-SHA256 of all that``, base64url; the key is a PBKDF2-HMAC-SHA256 of the cluster
password (100,000 rounds, pysyncobj's fixed salt). The tokens here are those, byte for byte
the format of ``cryptography.fernet``: hosts running either talk to each other.

Only the AES block cipher is not in the standard library: it is taken from the OpenSSL
libcrypto that ``hashlib`` has already loaded into the process (through ``ctypes``), not
from ``cryptography``, whose extension (15 MB on disk) made an agent's resident memory
8.7 MiB larger (VmRSS 59.7 MiB, 51.0 MiB without; measured 2026-12-06). Where that libcrypto
cannot be found (an interpreter linked statically, no ``/proc``), or does not give AES's
known answer, ``cryptography``'s AES is used instead.

Importing this module also puts :mod:`raft.fernet` in place of ``pysyncobj.encryptor``
(unless pysyncobj's own was imported first): pysyncobj imports that module, and with it
``cryptography``, when it is imported, although Raft here gets its encryptor from
:mod:`raft.password` and never from pysyncobj. ``HAS_CRYPTO`` and ``getEncryptor`` are
what pysyncobj takes from it.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import hmac
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

# pysyncobj.encryptor's salt and rounds: a different key would be a different password.
SALT = b"\x15%q\xe6\xbb\x02\xa6\xf8\x13q\x90\xcf6+\x1e\xeb"
PBKDF2_ROUNDS = 100_000
HAS_CRYPTO = True  # what pysyncobj checks before it encrypts

_BLOCK = 16
_HMAC_SIZE = 32
_HEADER = 1 + 8 + _BLOCK  # version, timestamp, IV
_VERSION = 0x80

# A cipher: (key, IV, data) -> data, whole blocks in and out (the padding is done here).
Cipher = Callable[[bytes, bytes, bytes], bytes]


class InvalidToken(Exception):  # cryptography.fernet's name
    """A token that is not Fernet, not signed with this key, or not decipherable."""


def derive_key(password: str | bytes) -> bytes:
    """pysyncobj's Fernet key for ``password`` (base64url of 32 bytes)."""
    secret = password.encode() if isinstance(password, str) else password
    raw = hashlib.pbkdf2_hmac("sha256", secret, SALT, PBKDF2_ROUNDS, dklen=32)
    return base64.urlsafe_b64encode(raw)


def getEncryptor(password: str | bytes) -> Fernet:  # pysyncobj's name
    """pysyncobj.encryptor.getEncryptor: the Fernet of ``password`` (a PBKDF2: slow)."""
    return Fernet(derive_key(password))


class Fernet:
    """cryptography.fernet.Fernet's tokens and the methods pysyncobj calls."""

    def __init__(self, key: bytes | str) -> None:
        try:
            raw = base64.urlsafe_b64decode(key)
        except binascii.Error as exc:
            raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes.") from exc
        if len(raw) != 32:
            raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes.")
        self._signing_key, self._encryption_key = raw[:16], raw[16:]

    def encrypt(self, data: bytes) -> bytes:
        return self.encrypt_at_time(data, int(time.time()))

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        iv = os.urandom(_BLOCK)
        padding = _BLOCK - len(data) % _BLOCK
        padded = bytes(data) + bytes((padding,)) * padding
        ciphertext = _ciphers()[0](self._encryption_key, iv, padded)
        body = bytes((_VERSION,)) + current_time.to_bytes(8, "big") + iv + ciphertext
        return base64.urlsafe_b64encode(body + self._sign(body))

    def extract_timestamp(self, token: bytes | str) -> int:
        timestamp, data = _unverified(token)
        self._verify(data)
        return timestamp

    def decrypt(self, token: bytes | str) -> bytes:
        _, data = _unverified(token)
        self._verify(data)
        ciphertext = data[_HEADER:-_HMAC_SIZE]
        if not ciphertext or len(ciphertext) % _BLOCK:
            raise InvalidToken
        padded = _ciphers()[1](self._encryption_key, data[9:_HEADER], ciphertext)
        padding = padded[-1]
        if not 1 <= padding <= _BLOCK or padded[-padding:] != bytes((padding,)) * padding:
            raise InvalidToken
        return padded[:-padding]

    def _sign(self, body: bytes) -> bytes:
        return hmac.digest(self._signing_key, body, "sha256")

    def _verify(self, data: bytes) -> None:
        if len(data) < _HEADER + _HMAC_SIZE:
            raise InvalidToken
        if not hmac.compare_digest(self._sign(data[:-_HMAC_SIZE]), data[-_HMAC_SIZE:]):
            raise InvalidToken


class MultiFernet:
    """cryptography.fernet.MultiFernet: encrypts with the first key, accepts any."""

    def __init__(self, fernets: Sequence[Fernet]) -> None:
        if not fernets:
            raise ValueError("MultiFernet requires at least one Fernet instance")
        self._fernets = tuple(fernets)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._fernets[0].encrypt_at_time(data, current_time)

    def extract_timestamp(self, token: bytes | str) -> int:
        for fernet in self._fernets:
            try:
                return fernet.extract_timestamp(token)
            except InvalidToken:
                pass
        raise InvalidToken

    def decrypt(self, token: bytes | str) -> bytes:
        for fernet in self._fernets:
            try:
                return fernet.decrypt(token)
            except InvalidToken:
                pass
        raise InvalidToken


def _unverified(token: bytes | str) -> tuple[int, bytes]:
    """The timestamp and the bytes of ``token``, its signature not yet checked."""
    if not isinstance(token, bytes | str):
        raise TypeError("token must be bytes or str")
    try:
        data = base64.urlsafe_b64decode(token)
    except (TypeError, ValueError):  # binascii.Error, or a str not ASCII
        raise InvalidToken from None
    if len(data) < 9 or data[0] != _VERSION:
        raise InvalidToken
    return int.from_bytes(data[1:9], "big"), data


# -- AES-128-CBC ------------------------------------------------------------------------

# FIPS-197 appendix C.1: AES-128 of this block under this key (one CBC block, zero IV).
_KNOWN_KEY = bytes(range(16))
_KNOWN_PLAIN = bytes.fromhex("00112233445566778899aabbccddeeff")
_KNOWN_CIPHER = bytes.fromhex("69c4e0d86a7b0430d8cdb78070b4c55a")


@cache
def _ciphers() -> tuple[Cipher, Cipher]:
    """AES-128-CBC (encrypt, decrypt): hashlib's libcrypto's, else cryptography's."""
    ciphers = _libcrypto_ciphers()
    if ciphers is None or not _known_answer(*ciphers):
        ciphers = _cryptography_ciphers()
    return ciphers


def _known_answer(encrypt: Cipher, decrypt: Cipher) -> bool:
    zero = bytes(_BLOCK)
    try:
        return (
            encrypt(_KNOWN_KEY, zero, _KNOWN_PLAIN) == _KNOWN_CIPHER
            and decrypt(_KNOWN_KEY, zero, _KNOWN_CIPHER) == _KNOWN_PLAIN
        )
    except (OSError, ValueError):
        return False


def _libcrypto_path() -> str | None:
    """The libcrypto shared library this process has loaded (hashlib's), if any."""
    try:
        import _hashlib  # noqa: F401 - what maps libcrypto in

        maps = Path("/proc/self/maps").read_text()
    except (ImportError, OSError):
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith("/") and Path(path).name.startswith("libcrypto.so"):
            return path
    return None


def _libcrypto_ciphers() -> tuple[Cipher, Cipher] | None:
    path = _libcrypto_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)  # the library already loaded: no second copy
        new_ctx, free_ctx = lib.EVP_CIPHER_CTX_new, lib.EVP_CIPHER_CTX_free
        aes_128_cbc = lib.EVP_aes_128_cbc
        functions = (
            (lib.EVP_EncryptInit_ex, lib.EVP_EncryptUpdate, lib.EVP_EncryptFinal_ex),
            (lib.EVP_DecryptInit_ex, lib.EVP_DecryptUpdate, lib.EVP_DecryptFinal_ex),
        )
        set_padding = lib.EVP_CIPHER_CTX_set_padding
    except (OSError, AttributeError):
        return None
    new_ctx.restype = ctypes.c_void_p
    new_ctx.argtypes = []
    free_ctx.restype = None
    free_ctx.argtypes = [ctypes.c_void_p]
    aes_128_cbc.restype = ctypes.c_void_p
    aes_128_cbc.argtypes = []
    set_padding.restype = ctypes.c_int
    set_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
    for init, update, final in functions:
        init.restype = update.restype = final.restype = ctypes.c_int
        init.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_char_p] * 2
        update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        update.argtypes += [ctypes.c_char_p, ctypes.c_int]
        final.argtypes = [ctypes.c_void_p] * 3
    cipher = aes_128_cbc()

    def run(index: int, key: bytes, iv: bytes, data: bytes) -> bytes:
        if len(key) != 16 or len(iv) != _BLOCK or len(data) % _BLOCK:
            raise ValueError("AES-128-CBC: a 16-byte key and IV, whole blocks")
        init, update, final = functions[index]
        out = ctypes.create_string_buffer(len(data) + _BLOCK)
        written, last = ctypes.c_int(0), ctypes.c_int(0)
        ctx = new_ctx()
        if not ctx:
            raise OSError("EVP_CIPHER_CTX_new failed")
        try:
            ok = (
                init(ctx, cipher, None, key, iv) == 1
                and set_padding(ctx, 0) == 1
                and update(ctx, out, ctypes.byref(written), data, len(data)) == 1
                and final(ctx, ctypes.addressof(out) + written.value, ctypes.byref(last)) == 1
            )
        finally:
            free_ctx(ctx)
        if not ok or written.value + last.value != len(data):
            raise OSError("libcrypto AES-128-CBC failed")
        return out.raw[: len(data)]

    def encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
        return run(0, key, iv, data)

    def decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
        return run(1, key, iv, data)

    return encrypt, decrypt


def _cryptography_ciphers() -> tuple[Cipher, Cipher]:
    from cryptography.hazmat.primitives.ciphers import Cipher as AesCipher
    from cryptography.hazmat.primitives.ciphers import algorithms, modes

    def encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
        encryptor = AesCipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return encryptor.update(data) + encryptor.finalize()

    def decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
        decryptor = AesCipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        return decryptor.update(data) + decryptor.finalize()

    return encrypt, decrypt


# pysyncobj imports pysyncobj.encryptor (and cryptography with it) when it is imported: this
# module stands in for it, unless pysyncobj's own came first.
sys.modules.setdefault("pysyncobj.encryptor", sys.modules[__name__])
