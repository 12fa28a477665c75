"""The cluster password as pysyncobj's encryptor, changeable while the cluster runs.

pysyncobj encrypts every message with one Fernet key derived from the cluster
password (``pysyncobj.encryptor.getEncryptor``: PBKDF2, fixed salt) and checks it
on every message it reads. A password that has to change (a host that knew it was
revoked) cannot change everywhere at once, so a rolling change needs, for a while,
hosts that send with one password and accept two:

1. every host accepts the new password as well as the old one, still sending with
   the old;
2. every host sends with the new one, still accepting the old (a host that has not
   switched yet keeps being heard);
3. every host accepts the new one only.

``PasswordRing`` is that encryptor: the object pysyncobj's connections hold, whose
keys :meth:`PasswordRing.use` replaces in place, so established connections follow
without being dropped. The order of the steps is kept above it
(``meshorch.site.raft_password``): here only what the keys are.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from raft.fernet import Fernet, MultiFernet, getEncryptor


@lru_cache(maxsize=8)
def _fernet(password: str) -> Fernet:
    """pysyncobj's key for ``password`` (a PBKDF2 of 100,000 rounds: derive it off the loop)."""
    fernet: Fernet = getEncryptor(password)
    return fernet


def derive(passwords: Sequence[str]) -> None:
    """Derive (and keep) the keys of ``passwords``; call it in a worker thread."""
    for password in passwords:
        _fernet(password)


class PasswordRing:
    """pysyncobj's encryptor: sends with one password, accepts any of a few."""

    def __init__(self, password: str) -> None:
        self.sending = password
        self.accepting: tuple[str, ...] = (password,)
        self._keys = MultiFernet([_fernet(password)])

    def use(self, send: str, also_accept: Sequence[str] = ()) -> None:
        """Send with ``send``; accept it and ``also_accept``. Keys not yet derived are
        derived here: call :func:`derive` in a thread first to keep the loop free."""
        accepting = (send, *(p for p in dict.fromkeys(also_accept) if p != send))
        self._keys = MultiFernet([_fernet(p) for p in accepting])
        self.sending, self.accepting = send, accepting

    # -- what pysyncobj's TcpConnection calls ----------------------------

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._keys.encrypt_at_time(data, current_time)

    def extract_timestamp(self, token: bytes) -> int:
        return self._keys.extract_timestamp(token)

    def decrypt(self, token: bytes) -> bytes:
        return self._keys.decrypt(token)
