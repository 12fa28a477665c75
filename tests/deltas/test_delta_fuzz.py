"""Fuzz: 100,000 randomly mutated deltas are all rejected and none crashes the verifier."""

from __future__ import annotations

import random

from nacl.signing import SigningKey

from meshorch.fleet import delta as d

NOW = 1_800_000_000.0
MUTATIONS = 100_000


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    kind = rng.randrange(6)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite with random bytes
        i = rng.randrange(len(data))
        data[i : i + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))
    elif kind == 2:  # truncate
        del data[rng.randrange(len(data)) :]
    elif kind == 3:  # insert
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.choice([b"0", b"\\", b'"', b"{", b"]", b",", rng.randbytes(3)])
    elif kind == 4:  # delete a span
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 16)]
    else:  # swap two characters
        i, j = rng.randrange(len(data)), rng.randrange(len(data))
        data[i], data[j] = data[j], data[i]
    return bytes(data)


def test_mutated_deltas_are_all_rejected() -> None:
    root = SigningKey(b"f" * 32)
    state = d.TrustState("acme", frozenset({d.key_id(root)}))
    body = d.next_delta(
        "acme", 0, d.GENESIS_HASH,
        [{"op": "app.delete", "name": "web"}, {"op": "app.put", "spec": {"name": "db", "n": 1}}],
        d.Target(sites=frozenset({"shop-1", "shop-2"})), NOW, 3600,
    )  # fmt: skip
    original, _ = d.sign(body, [root])
    d.verify(original, state, NOW)  # the unmutated delta is good

    rng = random.Random(20261128)
    reasons: dict[str, int] = {}
    accepted = 0
    for _ in range(MUTATIONS):
        mutated = _mutate(original, rng)
        if mutated == original:
            continue
        try:
            delta, _ = d.verify(mutated, state, NOW)
        except d.DeltaRejected as exc:
            assert exc.reason in d.REASONS
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            continue
        # A mutation may only pass if it left the signed body intact (e.g. JSON
        # whitespace or an escape outside the body): then it is the same delta.
        assert delta.digest == d.digest_of(d.encode_body(body)), mutated
        accepted += 1
    assert reasons.get("malformed", 0) > MUTATIONS // 4
    assert reasons.get("bad_signature", 0) > 0
    assert accepted < MUTATIONS // 1000
