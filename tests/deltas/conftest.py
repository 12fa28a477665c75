"""A hub's chain built in the tests with real keys, for the delta verifier's tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from nacl.signing import SigningKey

from meshorch.fleet import delta as d

NOW = 1_800_000_000.0
TTL = 3600.0
FLEET = "acme"


class Log:
    """A hub's chain, built in the test with real keys; deltas of format ``form``."""

    def __init__(self, key: SigningKey, form: int = d.DELTA_V1) -> None:
        self.key = key
        self.form = form
        self.envelopes: list[bytes] = []
        self.head = d.GENESIS_HASH

    def append(
        self,
        ops: Sequence[dict[str, Any]] = (),
        target: d.Target = d.ALL_SITES,
        now: float = NOW,
        keys: Sequence[SigningKey] | None = None,
        form: int | None = None,
    ) -> bytes:
        body = d.next_delta(
            FLEET, len(self.envelopes), self.head, ops, target, now, TTL, form or self.form
        )
        envelope, signed = d.sign(body, keys or [self.key])
        self.envelopes.append(envelope)
        self.head = signed.digest
        return envelope


def fresh_state(root: SigningKey) -> d.TrustState:
    return d.TrustState(FLEET, frozenset({d.key_id(root)}))


@pytest.fixture
def root() -> SigningKey:
    return SigningKey(b"r" * 32)
