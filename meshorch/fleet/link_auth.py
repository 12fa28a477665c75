"""How a site signs its requests to the hub, and how the hub checks them (pure).

The string signed (format 2) is::

    v2\\nMETHOD\\nHOST\\nPATH?QUERY\\nTIME\\nNONCE\\nSHA256HEX(BODY)

``HOST`` is the hub's address as the site knows it (its hub URL's ``host[:port]``, sent as
the request's ``Host`` header); ``NONCE`` is 16 random bytes (hex) the hub remembers for
the validity window, so a captured request cannot be replayed (``central_hub.replay``).
The headers carry the site id, the time, the nonce and the signature
(docs/fleet-link.md).

Format 1 (agents before format 2: ``METHOD\\nPATH?QUERY\\nTIME\\nSHA256HEX(BODY)``, no
nonce header) is replayable within the window: the hub accepts it only on the link's
read-only GET routes, and only while it allows legacy signatures (``central_hub.api``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshorch.fleet.delta import is_hex

SITE_HEADER = "X-Meshorch-Site"
TIME_HEADER = "X-Meshorch-Time"
NONCE_HEADER = "X-Meshorch-Nonce"
SIGNATURE_HEADER = "X-Meshorch-Signature"
MAX_CLOCK_SKEW_S = 300.0
NONCE_BYTES = 16


class LinkAuthError(Exception):
    """A site request that must be refused (answered 401 ``bad_site_signature``)."""


def _message_v1(method: str, path_qs: str, time_text: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path_qs}\n{time_text}\n{digest}".encode()


def _message(
    method: str, host: str, path_qs: str, time_text: str, nonce: str, body: bytes
) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return (
        f"v2\n{method.upper()}\n{host.lower()}\n{path_qs}\n{time_text}\n{nonce}\n{digest}".encode()
    )


def sign_request(
    key: SigningKey,
    site_id: str,
    method: str,
    path_qs: str,
    body: bytes,
    now: float,
    *,
    host: str,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers to add to a request from ``site_id`` to the hub at ``host`` (``Host``
    included: the hub checks the signature against the ``Host`` it receives)."""
    time_text = f"{now:.3f}"
    nonce = nonce if nonce is not None else secrets.token_hex(NONCE_BYTES)
    message = _message(method, host, path_qs, time_text, nonce, body)
    return {
        "Host": host,
        SITE_HEADER: site_id,
        TIME_HEADER: time_text,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: key.sign(message).signature.hex(),
    }


def url_host(url: str) -> str:
    """The ``host[:port]`` of a hub URL, as signed and sent in ``Host``."""
    return urlsplit(url).netloc.rpartition("@")[2].lower()


def sign_request_v1(
    key: SigningKey, site_id: str, method: str, path_qs: str, body: bytes, now: float
) -> dict[str, str]:
    """Format 1 headers, as agents before format 2 sent them (tests of mixed versions)."""
    time_text = f"{now:.3f}"
    signature = key.sign(_message_v1(method, path_qs, time_text, body)).signature.hex()
    return {SITE_HEADER: site_id, TIME_HEADER: time_text, SIGNATURE_HEADER: signature}


def claimed_site(headers: Mapping[str, str]) -> str:
    site = headers.get(SITE_HEADER, "")
    if not site:
        raise LinkAuthError(f"missing {SITE_HEADER}")
    return site


def is_legacy(headers: Mapping[str, str]) -> bool:
    """Whether the request is signed in format 1 (no nonce)."""
    return NONCE_HEADER not in headers


def verify_request(
    public_key_hex: str,
    headers: Mapping[str, str],
    method: str,
    host: str,
    path_qs: str,
    body: bytes,
    now: float,
) -> tuple[float, str]:
    """Raise LinkAuthError unless the headers prove the request comes from that key and
    was signed for ``host`` (the ``Host`` the hub received); returns the signed time and
    nonce ("" for format 1), for the replay check. Format 1 is checked only when
    ``is_legacy(headers)``: the caller decides whether to accept it."""
    time_text = headers.get(TIME_HEADER, "")
    signature_hex = headers.get(SIGNATURE_HEADER, "")
    nonce = headers.get(NONCE_HEADER)
    try:
        sent_at = float(time_text)
        signature = bytes.fromhex(signature_hex)
        key = VerifyKey(bytes.fromhex(public_key_hex))
    except ValueError:
        raise LinkAuthError("malformed time, signature or key") from None
    if not abs(now - sent_at) <= MAX_CLOCK_SKEW_S:  # also refuses NaN
        raise LinkAuthError(f"request time is {now - sent_at:+.0f} s away from the hub's clock")
    if nonce is None:
        message = _message_v1(method, path_qs, time_text, body)
    elif len(nonce) != 2 * NONCE_BYTES or not is_hex(nonce):
        raise LinkAuthError(f"malformed {NONCE_HEADER}: {2 * NONCE_BYTES} hex digits")
    else:
        message = _message(method, host, path_qs, time_text, nonce, body)
    try:
        key.verify(message, signature)
    except (BadSignatureError, ValueError):
        raise LinkAuthError(
            "the signature does not match the site's key (or the request was signed for "
            f"another hub address than {host[:100]!r})"
        ) from None
    return sent_at, nonce or ""
