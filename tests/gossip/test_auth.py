"""Member certificates and per-datagram sealing/opening, with real Ed25519."""

import random

import pytest
from nacl.signing import SigningKey, VerifyKey

from gossip.auth import (
    CERT_FIXED_BYTES,
    OVERHEAD_FIXED_BYTES,
    AuthError,
    BadCertError,
    BadSignatureError,
    DatagramOpener,
    DatagramSealer,
    MalformedError,
    ReplayedError,
    StaleError,
    issue_cert,
    overhead,
    parse_cert,
    verify_cert,
)
from gossip.errors import LocalProtocolError, RemoteProtocolError

NOW = 1_700_000_000.0
ANCHOR = SigningKey(bytes(range(32)))
ANCHOR_HEX = bytes(ANCHOR.verify_key).hex()
OTHER_ANCHOR = SigningKey(bytes(range(1, 33)))


def member(member_id: str, anchor: SigningKey = ANCHOR, ttl_s: float = 3600) -> DatagramSealer:
    key = SigningKey(member_id.encode().ljust(32, b"."))
    cert = issue_cert(anchor, member_id, bytes(key.verify_key), NOW + ttl_s)
    return DatagramSealer(member_id, key, cert)


def opener(recipient: str = "bob", **kw: object) -> DatagramOpener:
    return DatagramOpener(lambda: [ANCHOR_HEX], recipient=recipient, **kw)  # type: ignore[arg-type]


# -- certificates ----------------------------------------------------------------


def test_cert_round_trip() -> None:
    key = SigningKey.generate()
    cert = issue_cert(ANCHOR, "site-7", bytes(key.verify_key), NOW + 60)
    assert len(cert) == CERT_FIXED_BYTES + len("site-7")
    c = verify_cert(cert, [ANCHOR_HEX], NOW)
    assert (c.member_id, c.public_key, c.expires_at) == ("site-7", bytes(key.verify_key), NOW + 60)
    assert c.anchor_key == bytes(ANCHOR.verify_key)
    # Anchors as raw bytes or hex (any case); the public key as hex too.
    assert verify_cert(cert, [bytes(ANCHOR.verify_key)], NOW) == c
    assert verify_cert(cert, [ANCHOR_HEX.upper()], NOW) == c
    assert issue_cert(ANCHOR, "site-7", key.verify_key.encode().hex(), NOW + 60) == cert
    assert parse_cert(cert) == c


def test_cert_expired() -> None:
    cert = issue_cert(ANCHOR, "a", bytes(32), NOW + 10)
    verify_cert(cert, [ANCHOR_HEX], NOW + 9.99)
    with pytest.raises(BadCertError, match="expired"):
        verify_cert(cert, [ANCHOR_HEX], NOW + 10)


def test_cert_unknown_anchor() -> None:
    cert = issue_cert(OTHER_ANCHOR, "a", bytes(32), NOW + 10)
    with pytest.raises(BadCertError, match="untrusted"):
        verify_cert(cert, [ANCHOR_HEX], NOW)
    with pytest.raises(BadCertError):
        verify_cert(cert, [], NOW)
    # A junk entry in the trusted list trusts nothing, and does not crash.
    with pytest.raises(BadCertError):
        verify_cert(cert, ["zz", "00" * 31], NOW)


def test_cert_forgeries() -> None:
    key = SigningKey.generate()
    cert = issue_cert(ANCHOR, "alice", bytes(key.verify_key), NOW + 60)
    # Another member id, key or expiry under the anchor's signature.
    for forged in (
        cert.replace(b"alice", b"alicf"),
        cert[:7] + bytes([cert[7] ^ 1]) + cert[8:],  # public key
        cert[: -64 - 32 - 1] + bytes([cert[-64 - 32 - 1] ^ 1]) + cert[-64 - 32 :],  # expiry
        cert[:-1] + bytes([cert[-1] ^ 0x80]),  # signature
    ):
        with pytest.raises(BadCertError):
            verify_cert(forged, [ANCHOR_HEX], NOW)
    # Self-signed, claiming the trusted anchor's key.
    mallory = SigningKey.generate()
    body = cert[:-64]
    with pytest.raises(BadCertError):
        verify_cert(body + mallory.sign(body).signature, [ANCHOR_HEX], NOW)
    # The anchor's signature over the same bytes without the context string
    # (what it would sign for another kind of document) is not a certificate.
    with pytest.raises(BadCertError):
        verify_cert(body + ANCHOR.sign(body).signature, [ANCHOR_HEX], NOW)


def test_cert_malformed() -> None:
    cert = issue_cert(ANCHOR, "alice", bytes(32), NOW + 60)
    for bad in (b"", cert[:1], cert[:-1], cert + b"\0", b"\x02" + cert[1:], cert[:1] + b"\0"):
        with pytest.raises(MalformedError):
            parse_cert(bad)
    bad_utf8 = issue_cert(ANCHOR, "alice", bytes(32), NOW + 60).replace(b"alice", b"al\xffce")
    with pytest.raises(MalformedError, match="UTF-8"):
        parse_cert(bad_utf8)
    assert issubclass(MalformedError, RemoteProtocolError)


def test_issue_cert_refuses_bad_arguments() -> None:
    for kwargs in (
        {"member_id": ""},
        {"member_id": "x" * 256},
        {"public_key": bytes(31)},
        {"public_key": "nothex"},
        {"expires_at": -1},
    ):
        args: dict[str, object] = {"member_id": "a", "public_key": bytes(32), "expires_at": NOW}
        args.update(kwargs)
        with pytest.raises(ValueError):
            issue_cert(ANCHOR, **args)  # type: ignore[arg-type]


# -- sealing and opening ------------------------------------------------------------


def test_seal_open_round_trip_and_overhead() -> None:
    alice = member("alice")
    bob = opener("bob")
    data = alice.seal(b"hello", NOW, "bob")
    assert len(data) == len(b"hello") + overhead("alice") == 5 + OVERHEAD_FIXED_BYTES + 5
    assert alice.overhead == overhead("alice")
    sender, payload = bob.open(data, NOW + 1)
    assert (sender, payload) == ("alice", b"hello")
    # Empty payloads are fine; so are large ones.
    assert bob.open(alice.seal(b"", NOW, "bob"), NOW).payload == b""
    assert bob.open(alice.seal(b"x" * 60_000, NOW, "bob"), NOW).payload == b"x" * 60_000


def test_bound_datagram_only_opens_at_its_recipient() -> None:
    alice = member("alice")
    to_bob = alice.seal(b"for bob", NOW, "bob")
    with pytest.raises(BadSignatureError):
        opener("carol").open(to_bob, NOW)
    with pytest.raises(BadSignatureError):
        opener("").open(to_bob, NOW)
    # Unbound (to a placeholder): any recipient opens it.
    unbound = alice.seal(b"join", NOW)
    assert opener("carol").open(unbound, NOW).payload == b"join"
    assert opener("bob").open(unbound, NOW).payload == b"join"


def test_counter_strictly_increases() -> None:
    alice = member("alice")
    counters = [alice.next_counter(NOW) for _ in range(5)]
    counters.append(alice.next_counter(NOW - 100))  # the clock stepped back
    assert counters == sorted(set(counters))
    assert counters[0] == int(NOW * 1_000_000)
    # Every datagram sealed in the same microsecond opens (no false replay).
    bob = opener()
    for _ in range(100):
        bob.open(alice.seal(b"x", NOW, "bob"), NOW)


def test_sealer_refuses_a_certificate_that_is_not_its_own() -> None:
    key = SigningKey.generate()
    cert = issue_cert(ANCHOR, "alice", bytes(key.verify_key), NOW + 60)
    with pytest.raises(LocalProtocolError, match="not 'bob'"):
        DatagramSealer("bob", key, cert)
    with pytest.raises(LocalProtocolError, match="signing key"):
        DatagramSealer("alice", SigningKey.generate(), cert)
    with pytest.raises(LocalProtocolError):
        DatagramSealer("alice", key, cert[:-1])
    sealer = DatagramSealer("alice", bytes(key), cert)  # a 32-byte seed works as the key
    renewed = issue_cert(ANCHOR, "alice", bytes(key.verify_key), NOW + 7200)
    sealer.replace_cert(renewed)
    assert sealer.cert.expires_at == NOW + 7200
    with pytest.raises(LocalProtocolError):
        sealer.replace_cert(issue_cert(ANCHOR, "bob", bytes(key.verify_key), NOW + 60))


def _expected_reasons(i: int, cert_len: int) -> set[str]:
    """Drop reasons a change at byte ``i`` of a datagram may legitimately give."""
    counter_start = 4 + cert_len
    if i < 3:
        return {"malformed"}  # magic, version
    if i == 3:
        # Flags: unknown bits, or "unbound", which changes what was signed.
        return {"malformed", "bad_signature"}
    if i < counter_start:
        # The certificate: framing (version, id length), the id (UTF-8), its fields.
        return {"malformed", "bad_cert"}
    if i < counter_start + 8:
        return {"stale", "bad_signature"}
    return {"bad_signature"}  # payload, signature


def test_every_tampered_byte_is_refused_with_its_reason() -> None:
    rng = random.Random(7)
    alice = member("alice")
    data = alice.seal(b"some gossip payload", NOW, "bob")
    cert_len = len(alice.cert.raw)
    bob = opener()
    seen: dict[str, int] = {}
    for round_ in range(3000):
        i = round_ % len(data) if round_ < len(data) else rng.randrange(len(data))
        flip = rng.randrange(1, 256)
        tampered = bytearray(data)
        tampered[i] ^= flip
        with pytest.raises(AuthError) as info:
            bob.open(bytes(tampered), NOW)
        assert info.value.reason in _expected_reasons(i, cert_len), (i, info.value)
        seen[info.value.reason] = seen.get(info.value.reason, 0) + 1
    assert {"malformed", "bad_cert", "bad_signature", "stale"} <= set(seen)
    # Truncations and extensions.
    for n in range(len(data)):
        with pytest.raises(AuthError):
            bob.open(data[:n], NOW)
    with pytest.raises(BadSignatureError):
        bob.open(data + b"\0", NOW)
    # Nothing above changed the opener's state: the genuine datagram still opens, once.
    assert bob.senders() == 0
    assert bob.open(data, NOW) == ("alice", b"some gossip payload")
    with pytest.raises(ReplayedError):
        bob.open(data, NOW)


def test_random_garbage_is_malformed_never_a_crash() -> None:
    rng = random.Random(11)
    bob = opener()
    alice = member("alice")
    prefix = alice.seal(b"", NOW, "bob")[:5]
    for _ in range(2000):
        n = rng.randrange(0, 600)
        junk = rng.randbytes(n)
        if rng.random() < 0.5:
            junk = prefix + junk  # past the magic, into the certificate parser
        with pytest.raises(AuthError):
            bob.open(junk, NOW)
    assert bob.senders() == 0 and bob.cached_certs() == 0


def test_replayed_datagrams_are_refused() -> None:
    alice = member("alice")
    bob = opener()
    first = alice.seal(b"1", NOW, "bob")
    second = alice.seal(b"2", NOW, "bob")
    bob.open(first, NOW)
    bob.open(second, NOW)
    for d in (first, second):
        with pytest.raises(ReplayedError) as info:
            bob.open(d, NOW)
        assert info.value.reason == "replayed"


def test_reordered_within_the_window_accepted_older_refused() -> None:
    alice = member("alice")
    bob = opener(window=64)
    datagrams = [alice.seal(str(k).encode(), NOW + k / 1000, "bob") for k in range(100)]
    # The newest 64 arrive in random order: all accepted, each once.
    late = datagrams[36:]
    random.Random(3).shuffle(late)
    for d in late:
        bob.open(d, NOW)
    for d in late:
        with pytest.raises(ReplayedError):
            bob.open(d, NOW)
    # Older than every counter in a full window: refused (cannot be told from a replay).
    for d in datagrams[:36]:
        with pytest.raises(ReplayedError, match="window"):
            bob.open(d, NOW)
    # Reordering inside the window, before it is full.
    carol = opener("bob", window=64)
    some = datagrams[:10]
    for d in [some[5], some[2], some[9], some[0], some[7]]:
        carol.open(d, NOW)
    for d in [some[1], some[3]]:
        carol.open(d, NOW)


def test_stale_counters_are_refused() -> None:
    alice = member("alice")
    bob = opener(max_skew_s=60)
    with pytest.raises(StaleError):
        bob.open(alice.seal(b"", NOW - 61, "bob"), NOW)
    alice2 = member("alice")
    with pytest.raises(StaleError):
        bob.open(alice2.seal(b"", NOW + 61, "bob"), NOW)
    alice3 = member("alice")
    bob.open(alice3.seal(b"", NOW - 59, "bob"), NOW)


def test_forged_sender_with_another_members_valid_cert() -> None:
    alice = member("alice")
    # Mallory holds a valid certificate of its own, and copies Alice's from the wire.
    mallory_key = SigningKey.generate()
    mallory = DatagramSealer(
        "mallory",
        mallory_key,
        issue_cert(ANCHOR, "mallory", bytes(mallory_key.verify_key), NOW + 60),
    )
    bob = opener()
    forged = bytearray(mallory.seal(b"I am alice", NOW, "bob"))
    # Splice Alice's certificate in place of Mallory's and re-sign with Mallory's key.
    head = b"\x9bG\x01\x01" + alice.cert.raw + bytes(forged[4 + len(mallory.cert.raw) : -64])
    signature = mallory_key.sign(b"gossip datagram v1\x00bob\x00" + head).signature
    with pytest.raises(BadSignatureError):
        bob.open(head + signature, NOW)
    assert bob.senders() == 0
    # Mallory's own datagrams are fine, and say they come from Mallory.
    assert bob.open(mallory.seal(b"hi", NOW, "bob"), NOW).sender_id == "mallory"


def test_untrusted_anchor_and_expired_cert_datagrams() -> None:
    eve = member("eve", anchor=OTHER_ANCHOR)
    bob = opener()
    with pytest.raises(BadCertError):
        bob.open(eve.seal(b"", NOW, "bob"), NOW)
    old = member("old", ttl_s=10)
    bob.open(old.seal(b"", NOW, "bob"), NOW)  # cached now
    with pytest.raises(BadCertError, match="expired"):
        bob.open(old.seal(b"", NOW + 11, "bob"), NOW + 11)
    assert bob.senders() == 1


def test_anchor_removed_revokes_cached_certificates() -> None:
    trusted = {ANCHOR_HEX}
    bob = DatagramOpener(lambda: trusted, recipient="bob")
    alice = member("alice")
    bob.open(alice.seal(b"", NOW, "bob"), NOW)
    assert bob.cached_certs() == 1
    trusted.clear()
    with pytest.raises(BadCertError):
        bob.open(alice.seal(b"", NOW, "bob"), NOW)
    trusted.add(ANCHOR_HEX)
    bob.open(alice.seal(b"", NOW, "bob"), NOW)


def test_one_signature_verification_per_datagram(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = VerifyKey.verify

    def counting(self: VerifyKey, *args: object, **kwargs: object) -> bytes:
        nonlocal calls
        calls += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(VerifyKey, "verify", counting)
    alice = member("alice")
    bob = opener()
    bob.open(alice.seal(b"", NOW, "bob"), NOW)
    assert calls == 2  # the certificate, then the datagram
    for _ in range(10):
        bob.open(alice.seal(b"", NOW, "bob"), NOW)
    assert calls == 12


def test_tables_are_bounded() -> None:
    bob = opener(max_senders=4, max_certs=4)
    sealers = [member(f"m{k}") for k in range(10)]
    # One new sender a second: the least recently heard are evicted.
    first = [s.seal(b"", NOW + k, "bob") for k, s in enumerate(sealers)]
    for k, d in enumerate(first):
        bob.open(d, NOW + k)
    assert bob.senders() == 4 and bob.cached_certs() == 4
    # A member whose replay window was evicted cannot be replayed either: an
    # unknown sender's counter must be above the newest evicted counter.
    with pytest.raises(ReplayedError, match="floor"):
        bob.open(first[0], NOW + 10)
    # It goes on normally with new datagrams.
    bob.open(sealers[0].seal(b"", NOW + 10, "bob"), NOW + 10)
    # Forged datagrams under many ids store nothing.
    bob2 = opener()
    for k in range(500):
        forged = member(f"forged-{k}", anchor=OTHER_ANCHOR).seal(b"", NOW, "bob")
        with pytest.raises(BadCertError):
            bob2.open(forged, NOW)
    assert bob2.senders() == 0 and bob2.cached_certs() == 0


def test_opener_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        DatagramOpener(lambda: [], max_skew_s=0)
    with pytest.raises(ValueError):
        DatagramOpener(lambda: [], window=0)
