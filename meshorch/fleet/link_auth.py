"""How a site signs its requests to the hub, and how the hub checks them (pure).

The string signed is ``METHOD\\nPATH?QUERY\\nTIME\\nSHA256HEX(BODY)``; the headers carry
the site id, the time and the signature (see docs/fleet-link.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

SITE_HEADER = "X-Meshorch-Site"
TIME_HEADER = "X-Meshorch-Time"
SIGNATURE_HEADER = "X-Meshorch-Signature"
MAX_CLOCK_SKEW_S = 300.0


class LinkAuthError(Exception):
    """A site request that must be refused (answered 401 ``bad_site_signature``)."""


def _message(method: str, path_qs: str, time_text: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path_qs}\n{time_text}\n{digest}".encode()


def sign_request(
    key: SigningKey, site_id: str, method: str, path_qs: str, body: bytes, now: float
) -> dict[str, str]:
    """Headers to add to a request from ``site_id``."""
    time_text = f"{now:.3f}"
    signature = key.sign(_message(method, path_qs, time_text, body)).signature.hex()
    return {SITE_HEADER: site_id, TIME_HEADER: time_text, SIGNATURE_HEADER: signature}


def claimed_site(headers: Mapping[str, str]) -> str:
    site = headers.get(SITE_HEADER, "")
    if not site:
        raise LinkAuthError(f"missing {SITE_HEADER}")
    return site


def verify_request(
    public_key_hex: str,
    headers: Mapping[str, str],
    method: str,
    path_qs: str,
    body: bytes,
    now: float,
) -> None:
    """Raise LinkAuthError unless the headers prove the request comes from that key."""
    time_text = headers.get(TIME_HEADER, "")
    signature_hex = headers.get(SIGNATURE_HEADER, "")
    try:
        sent_at = float(time_text)
        signature = bytes.fromhex(signature_hex)
        key = VerifyKey(bytes.fromhex(public_key_hex))
    except ValueError:
        raise LinkAuthError("malformed time, signature or key") from None
    if not abs(now - sent_at) <= MAX_CLOCK_SKEW_S:  # also refuses NaN
        raise LinkAuthError(f"request time is {now - sent_at:+.0f} s away from the hub's clock")
    try:
        key.verify(_message(method, path_qs, time_text, body), signature)
    except (BadSignatureError, ValueError):
        raise LinkAuthError("the signature does not match the site's key") from None
