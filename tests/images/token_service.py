"""A token service for the registry's Bearer auth (the distribution token spec), for tests.

Real enough for a real registry to trust: an ES256 JWT whose header carries the
signing certificate (``x5c``), a self-signed CA the registry is configured with.
It grants ``pull`` on the scope asked for to one user (Basic credentials) and
refuses everyone else, anonymous callers included. It records what it was asked.
"""

from __future__ import annotations

import base64
import datetime
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

SERVICE = "meshorch-lab-registry"
ISSUER = "meshorch-lab-tokens"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    user: str
    password: str
    lifetime_s: int = 300
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    requests: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def token(self, scope: str) -> str:
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        access = []
        if scope.startswith("repository:") and scope.endswith(":pull"):
            access.append({"type": "repository", "name": scope.split(":")[1], "actions": ["pull"]})
        now = int(time.time())
        claims = {
            "iss": ISSUER, "sub": self.user, "aud": SERVICE, "exp": now + self.lifetime_s,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(orjson.dumps(header))}.{_b64url(orjson.dumps(claims))}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {"scope": request.query.get("scope", ""), "service": request.query.get("service", ""),
             "authorization": request.headers.get("Authorization", "")[:6]}
        )  # fmt: skip
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"details": "bad credentials"}, status=401)
        if request.query.get("service") != SERVICE:
            return web.json_response({"details": "unknown service"}, status=400)
        token = self.token(request.query.get("scope", ""))
        return web.json_response({"token": token, "expires_in": self.lifetime_s})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        return app
