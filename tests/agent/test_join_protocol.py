"""The join protocol's pure parts: tokens, proofs, decisions, signed answers."""

import secrets

import orjson
import pytest

from meshorch.join.mesh import Membership, MeshSettings, desired_interface
from meshorch.join.protocol import (
    JoinRefused,
    JoinRequest,
    JoinToken,
    SiteIdentity,
    TokenRecord,
    check_join,
    check_revocation_notice,
    revocation_notice,
    token_verifier,
    unwrap_answer,
    wrap_answer,
)
from meshorch.state.tables import MemberRecord
from netmesh import generate_keypair, seal, unseal

NOW = 1_800_000_000.0
IDENTITY = SiteIdentity.generate(bytes(range(32)))


def record(**changes: object) -> TokenRecord:
    base = {
        "token_id": "t1",
        "verifier": token_verifier(b"s" * 24),
        "expires_at": NOW + 60,
        "single_use": True,
    }
    return TokenRecord(**{**base, **changes})  # type: ignore[arg-type]


def request(secret: bytes = b"s" * 24, **changes: object) -> JoinRequest:
    base = {
        "site": "shop",
        "token_id": "t1",
        "host_id": "h4",
        "wg_public_key": generate_keypair().public_key_b64,
        "wg_endpoint": "10.0.0.14:51820",
        "api": "10.0.0.14:7700",
        "timestamp": NOW,
        "nonce": "n1",
    }
    return JoinRequest(**{**base, **changes}).with_proof(secret)  # type: ignore[arg-type]


def test_token_round_trip_and_damage() -> None:
    token = JoinToken("shop", "abcd", secrets.token_bytes(24), IDENTITY.fingerprint)
    assert JoinToken.parse(token.encode()) == token
    for bad in ("", "hello", "mojt1.", "mojt1.!!!", token.encode()[:-5], "mojt1.e30"):
        with pytest.raises(JoinRefused) as caught:
            JoinToken.parse(bad)
        assert caught.value.code == "bad_token"


def test_a_valid_request_spends_a_single_use_token() -> None:
    spent = check_join(request(), "shop", record(), NOW)
    assert spent.used_by == ("h4",)
    with pytest.raises(JoinRefused, match="already used"):
        check_join(request(host_id="h5"), "shop", spent, NOW)


def test_a_reusable_token_admits_several_hosts() -> None:
    spent = check_join(request(), "shop", record(single_use=False), NOW)
    again = check_join(request(host_id="h5"), "shop", spent, NOW)
    assert again.used_by == ("h4", "h5")


@pytest.mark.parametrize(
    "req, rec, code",
    [
        (request(site="other"), record(), "wrong_site"),
        (request(), None, "unknown_token"),
        (request(secret=b"x" * 24), record(), "bad_proof"),
        (request(timestamp=NOW - 3600), record(), "stale_request"),
        (request(), record(revoked=True), "revoked_token"),
        (request(), record(expires_at=NOW - 1), "expired_token"),
        (request(), record(used_by=("h1",)), "used_token"),
    ],
)
def test_refusals_name_their_reason(req: JoinRequest, rec: TokenRecord | None, code: str) -> None:
    with pytest.raises(JoinRefused) as caught:
        check_join(req, "shop", rec, NOW)
    assert caught.value.code == code


def test_a_tampered_request_fails_its_proof() -> None:
    good = request()
    tampered = JoinRequest(**{**good.to_json(), "wg_endpoint": "6.6.6.6:51820"})
    with pytest.raises(JoinRefused, match="not signed"):
        check_join(tampered, "shop", record(), NOW)


def test_parse_lists_missing_fields_and_rejects_garbage() -> None:
    with pytest.raises(JoinRefused) as caught:
        JoinRequest.parse(b'{"site": 3}')
    assert "token_id: required string" in str(caught.value)
    assert "site: required string" in str(caught.value)
    with pytest.raises(JoinRefused):
        JoinRequest.parse(b"\xff\xfe")
    assert JoinRequest.parse(__import__("orjson").dumps(request().to_json())) is not None


def test_answer_is_sealed_to_the_joiner_and_pinned_to_the_site_key() -> None:
    joiner = generate_keypair()
    body = wrap_answer(seal(b"secret membership", joiner.public_key_b64), IDENTITY)
    sealed = unwrap_answer(body, IDENTITY.fingerprint)
    assert unseal(sealed, joiner) == b"secret membership"

    impostor = SiteIdentity.generate(secrets.token_bytes(32))
    forged = wrap_answer(seal(b"evil", joiner.public_key_b64), impostor)
    with pytest.raises(JoinRefused) as caught:
        unwrap_answer(forged, IDENTITY.fingerprint)
    assert caught.value.code == "wrong_site_key"

    swapped = dict(body, signature=forged["signature"])
    with pytest.raises(JoinRefused) as caught:
        unwrap_answer(swapped, IDENTITY.fingerprint)
    assert caught.value.code == "bad_signature"


def test_revocation_notice_only_from_the_site_for_this_host() -> None:
    notice = revocation_notice(IDENTITY, "shop", "h4", NOW)
    check_revocation_notice(notice, IDENTITY.public_key, "shop", "h4", NOW)
    for site, host, now in (("shop", "h5", NOW), ("mall", "h4", NOW), ("shop", "h4", NOW + 900)):
        with pytest.raises(JoinRefused):
            check_revocation_notice(notice, IDENTITY.public_key, site, host, now)
    impostor = SiteIdentity.generate(secrets.token_bytes(32))
    with pytest.raises(JoinRefused):
        check_revocation_notice(
            revocation_notice(impostor, "shop", "h4", NOW), IDENTITY.public_key, "shop", "h4", NOW
        )


def test_desired_interface_has_every_other_member_as_a_peer() -> None:
    me, other, third = generate_keypair(), generate_keypair(), generate_keypair()
    membership = Membership("shop", "h1", "10.99.0.2", "10.99.0.0/16", 7800, (), ())
    members = [
        MemberRecord(
            "h1", "10.99.0.2:7800", None, me.public_key_b64, "10.99.0.2", "10.0.0.1:51820"
        ),
        MemberRecord(
            "h2", "10.99.0.3:7800", None, other.public_key_b64, "10.99.0.3", "10.0.0.2:51820"
        ),
        MemberRecord(
            "h3", "10.99.0.4:7800", None, third.public_key_b64, "10.99.0.4", "10.0.0.3:51820"
        ),
        MemberRecord("static", "127.0.0.1:1", None),  # no WireGuard key: not a peer
    ]
    spec = desired_interface(MeshSettings(lan_ip="10.0.0.1"), me, membership, members)
    assert spec.address_cidr == "10.99.0.2/16"
    assert {p.public_key for p in spec.peers} == {other.public_key_b64, third.public_key_b64}
    assert {p.allowed_ips for p in spec.peers} == {("10.99.0.3/32",), ("10.99.0.4/32",)}
    # Removing a member from the state removes the peer.
    smaller = desired_interface(MeshSettings(lan_ip="10.0.0.1"), me, membership, members[:2])
    assert [p.public_key for p in smaller.peers] == [other.public_key_b64]


def test_the_site_stores_a_verifier_that_cannot_sign_a_join() -> None:
    secret = secrets.token_bytes(24)
    stored = TokenRecord("t1", token_verifier(secret), NOW + 60, single_use=False)
    raw = stored.encode()
    assert secret not in raw and b"secret" not in raw  # what every member's view holds
    # Whoever reads the record (a stolen host) has the verifier, not a key: using it as the
    # secret signs with another key, and the site refuses the request.
    with pytest.raises(JoinRefused, match="not signed"):
        check_join(request(secret=stored.verifier, token_id="t1"), "shop", stored, NOW)
    assert check_join(request(secret=secret), "shop", TokenRecord.decode(raw), NOW).used_by == (
        "h4",
    )


def test_a_first_release_record_with_its_secret_still_verifies_and_is_rewritten() -> None:
    import base64

    secret = b"s" * 24
    legacy = orjson.dumps(
        {
            "v": 1,
            "id": "t1",
            "secret": base64.urlsafe_b64encode(secret).decode().rstrip("="),
            "expires_at": NOW + 60,
            "single_use": True,
            "used_by": [],
            "revoked": False,
        }
    )
    spent = check_join(request(secret=secret), "shop", TokenRecord.decode(legacy), NOW)
    assert b"secret" not in spent.encode() and spent.verifier == token_verifier(secret)
