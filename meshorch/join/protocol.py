"""The join protocol, pure: tokens, join requests, sealed and signed answers.

A join token (``meshorch token create``) carries the site name, a token id, a
secret and the fingerprint of the site's identity key. A joining host never
sends the secret: it signs its request (host id, WireGuard public key, endpoint,
time, nonce) with an Ed25519 key derived from the secret. The site keeps only
the matching public key, the token's verifier: what any member (or a stolen
host) reads from the replicated state cannot make a join request. The site answers with the
membership (overlay address, peers, Raft members, cluster password) sealed to
the joiner's WireGuard key and signed with the site identity key, whose
fingerprint the joiner checks against its token, as a k3s token pins its CA.

Everything here is pure: time and randomness are arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import orjson
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshorch.errors import RemoteInputError
from meshorch.state.tables import validate_address, validate_host_id

TOKEN_PREFIX = "mojt1."
TOKEN_TABLE_PREFIX = b"token/"
MAX_CLOCK_SKEW_S = 300.0
PROTOCOL_VERSION = 1


class JoinRefused(RemoteInputError):
    """The site refuses a join; ``code`` says why (a stable tag)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def identity_fingerprint(public_key: bytes) -> str:
    """What a join token pins: the first 16 bytes of sha256 of the site's identity key."""
    return hashlib.sha256(public_key).hexdigest()[:32]


# -- site identity -----------------------------------------------------------------


@dataclass(frozen=True)
class SiteIdentity:
    """The site's Ed25519 identity; every member holds it (replicated, Raft-encrypted)."""

    seed: bytes

    @staticmethod
    def generate(random_bytes: bytes) -> SiteIdentity:
        return SiteIdentity(random_bytes[:32])

    @property
    def public_key(self) -> bytes:
        return bytes(SigningKey(self.seed).verify_key)

    @property
    def fingerprint(self) -> str:
        return identity_fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(SigningKey(self.seed).sign(message).signature)

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "seed": _b64(self.seed)})

    @staticmethod
    def decode(raw: bytes) -> SiteIdentity:
        return SiteIdentity(_unb64(orjson.loads(raw)["seed"]))


# -- tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    site: str
    token_id: str
    secret: bytes
    fingerprint: str

    def encode(self) -> str:
        body = orjson.dumps(
            {"s": self.site, "i": self.token_id, "k": _b64(self.secret), "f": self.fingerprint}
        )
        return TOKEN_PREFIX + _b64(body)

    @staticmethod
    def parse(text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise JoinRefused("bad_token", "not a meshorch join token (expected 'mojt1.…')")
        try:
            data = orjson.loads(_unb64(text[len(TOKEN_PREFIX) :]))
            token = JoinToken(str(data["s"]), str(data["i"]), _unb64(data["k"]), str(data["f"]))
        except (binascii.Error, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise JoinRefused("bad_token", f"the join token is damaged: {exc}") from exc
        if len(token.secret) < 16:
            raise JoinRefused("bad_token", "the join token's secret is too short")
        return token


def token_signing_key(secret: bytes) -> SigningKey:
    """The key a joiner signs its request with, derived from the token's secret."""
    return SigningKey(hashlib.sha256(b"meshorch join token v1\0" + secret).digest())


def token_verifier(secret: bytes) -> bytes:
    """What the site stores of a token: the public half of ``token_signing_key``."""
    return bytes(token_signing_key(secret).verify_key)


@dataclass(frozen=True)
class TokenRecord:
    """A token as the site's replicated state keeps it: its verifier, never its secret."""

    token_id: str
    verifier: bytes
    expires_at: float
    single_use: bool
    used_by: tuple[str, ...] = ()
    revoked: bool = False

    def key(self) -> bytes:
        return TOKEN_TABLE_PREFIX + self.token_id.encode()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": 2,
                "id": self.token_id,
                "verifier": _b64(self.verifier),
                "expires_at": self.expires_at,
                "single_use": self.single_use,
                "used_by": list(self.used_by),
                "revoked": self.revoked,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> TokenRecord:
        data = orjson.loads(raw)
        # Records of the first release stored the secret itself; its verifier follows from
        # it, and the record is stored again without it when next written.
        verifier = (
            _unb64(data["verifier"])
            if "verifier" in data
            else token_verifier(_unb64(data["secret"]))
        )
        return TokenRecord(
            str(data["id"]),
            verifier,
            float(data["expires_at"]),
            bool(data["single_use"]),
            tuple(data.get("used_by", ())),
            bool(data.get("revoked", False)),
        )

    def spent_by(self, host_id: str) -> TokenRecord:
        return TokenRecord(
            self.token_id,
            self.verifier,
            self.expires_at,
            self.single_use,
            (*self.used_by, host_id),
            self.revoked,
        )


# -- join request ------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinRequest:
    site: str
    token_id: str
    host_id: str
    wg_public_key: str
    wg_endpoint: str
    api: str
    timestamp: float
    nonce: str
    proof: str = ""

    def _signed_fields(self) -> bytes:
        return orjson.dumps(
            [
                PROTOCOL_VERSION,
                self.site,
                self.token_id,
                self.host_id,
                self.wg_public_key,
                self.wg_endpoint,
                self.api,
                self.timestamp,
                self.nonce,
            ]
        )

    def with_proof(self, secret: bytes) -> JoinRequest:
        signed = token_signing_key(secret).sign(self._signed_fields())
        return JoinRequest(**{**self.to_json(), "proof": signed.signature.hex()})

    def proof_valid(self, verifier: bytes) -> bool:
        try:
            VerifyKey(verifier).verify(self._signed_fields(), bytes.fromhex(self.proof))
        except (BadSignatureError, ValueError):
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "token_id": self.token_id,
            "host_id": self.host_id,
            "wg_public_key": self.wg_public_key,
            "wg_endpoint": self.wg_endpoint,
            "api": self.api,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
            "proof": self.proof,
        }

    @staticmethod
    def parse(body: bytes) -> JoinRequest:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise JoinRefused("bad_json", f"the join request is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise JoinRefused("bad_request", "the join request must be a JSON object")
        strings = ("site", "token_id", "host_id", "wg_public_key", "wg_endpoint", "api", "nonce")
        problems = [f"{n}: required string" for n in strings if not isinstance(data.get(n), str)]
        if not isinstance(data.get("timestamp"), int | float):
            problems.append("timestamp: required number")
        if not isinstance(data.get("proof"), str):
            problems.append("proof: required string")
        if problems:
            raise JoinRefused("bad_request", "; ".join(problems))
        request = JoinRequest(**{k: data[k] for k in (*strings, "timestamp", "proof")})
        validate_host_id(request.host_id)
        validate_address("wg_endpoint", request.wg_endpoint)
        validate_address("api", request.api)
        if len(request.wg_public_key) != 44:
            raise JoinRefused("bad_request", "wg_public_key: not a WireGuard key")
        return request


def check_join(
    request: JoinRequest, site: str, record: TokenRecord | None, now: float
) -> TokenRecord:
    """Decide whether ``request`` may join; return the token record to store after it.

    The order matters: nothing about a token is revealed before the proof
    checks out, so a guesser learns only 'unknown_token' or 'bad_proof'.
    """
    if request.site != site:
        raise JoinRefused("wrong_site", f"this is site {site!r}, not {request.site!r}")
    if record is None:
        raise JoinRefused("unknown_token", "no such join token at this site")
    if not request.proof_valid(record.verifier):
        raise JoinRefused("bad_proof", "the request is not signed with the token's secret")
    if abs(now - request.timestamp) > MAX_CLOCK_SKEW_S:
        raise JoinRefused("stale_request", "the request's time is too far from the site's clock")
    if record.revoked:
        raise JoinRefused("revoked_token", "the join token was revoked")
    if now > record.expires_at:
        raise JoinRefused("expired_token", "the join token has expired")
    if record.single_use and record.used_by:
        raise JoinRefused("used_token", "the single-use join token was already used")
    return record.spent_by(request.host_id)


# -- answer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinAnswer:
    """What the joiner needs, sealed to its WireGuard key and signed by the site."""

    site: str
    host_id: str
    overlay_ip: str
    overlay_network: str
    raft_port: int
    raft_members: tuple[str, ...]
    peers: tuple[dict[str, Any], ...]
    cluster_password: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": PROTOCOL_VERSION,
                "site": self.site,
                "host_id": self.host_id,
                "overlay_ip": self.overlay_ip,
                "overlay_network": self.overlay_network,
                "raft_port": self.raft_port,
                "raft_members": list(self.raft_members),
                "peers": list(self.peers),
                "cluster_password": self.cluster_password,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> JoinAnswer:
        data = orjson.loads(raw)
        return JoinAnswer(
            str(data["site"]),
            str(data["host_id"]),
            str(data["overlay_ip"]),
            str(data["overlay_network"]),
            int(data["raft_port"]),
            tuple(data["raft_members"]),
            tuple(data["peers"]),
            str(data["cluster_password"]),
        )


def wrap_answer(sealed: bytes, identity: SiteIdentity) -> dict[str, str]:
    """The HTTP body of a successful join: sealed answer, signature, site key."""
    return {
        "sealed": _b64(sealed),
        "signature": _b64(identity.sign(sealed)),
        "site_key": _b64(identity.public_key),
    }


def unwrap_answer(body: dict[str, Any], pinned_fingerprint: str) -> bytes:
    """Check the site key against the token's pin and the signature; return the sealed bytes."""
    try:
        sealed = _unb64(body["sealed"])
        signature = _unb64(body["signature"])
        site_key = _unb64(body["site_key"])
    except (KeyError, TypeError, binascii.Error, ValueError) as exc:
        raise JoinRefused("bad_answer", f"malformed join answer: {exc}") from exc
    if not hmac.compare_digest(identity_fingerprint(site_key), pinned_fingerprint):
        raise JoinRefused("wrong_site_key", "the answering site's key does not match the token")
    try:
        VerifyKey(site_key).verify(sealed, signature)
    except (BadSignatureError, ValueError) as exc:
        raise JoinRefused("bad_signature", "the join answer's signature is invalid") from exc
    return sealed


# -- revocation notice ------------------------------------------------------------------


def revocation_notice(identity: SiteIdentity, site: str, host_id: str, now: float) -> bytes:
    """Told to a revoked host so it stops at once; signed, so nobody else can forge it."""
    body = orjson.dumps({"v": 1, "site": site, "host_id": host_id, "at": now})
    return orjson.dumps({"body": _b64(body), "signature": _b64(identity.sign(body))})


def check_revocation_notice(
    raw: bytes, site_public_key: bytes, site: str, host_id: str, now: float
) -> None:
    """Raise JoinRefused unless ``raw`` is a fresh notice revoking ``host_id`` of ``site``."""
    try:
        envelope = orjson.loads(raw)
        body = _unb64(envelope["body"])
        VerifyKey(site_public_key).verify(body, _unb64(envelope["signature"]))
        data = orjson.loads(body)
    except (BadSignatureError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise JoinRefused("bad_notice", "not a revocation notice signed by this site") from exc
    if data.get("site") != site or data.get("host_id") != host_id:
        raise JoinRefused("bad_notice", "the notice is for another host")
    if abs(now - float(data.get("at", 0))) > MAX_CLOCK_SKEW_S:
        raise JoinRefused("bad_notice", "the notice is stale")
