"""The hub's TLS: the operator's certificate, or one it makes itself at the first start.

With ``--tls-cert``/``--tls-key`` the hub serves that certificate (a CA-signed one: sites
give ``--hub-ca`` or trust the system's CAs). Without them it serves a self-signed
certificate kept in the data dir (``tls.crt``, ``tls.key`` 0600), made at the first start
and kept across restarts; its SHA-256 fingerprint, printed at every start, is what sites
pin at enrollment (``--hub-fingerprint``) and what the CLI pins on first use
(``meshorch.cli.known_hubs``). Plain HTTP only with ``--insecure-http``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from central_hub.errors import HubConfigError
from raft.durable import write_durably

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
SELF_SIGNED_DAYS = 3650


@dataclass(frozen=True)
class HubTLS:
    context: ssl.SSLContext
    cert_path: Path
    fingerprint: str  # SHA-256 of the certificate (DER), hex
    self_signed: bool


def load(data_dir: Path, cert: Path | None, key: Path | None, host: str) -> HubTLS:
    """The server context: the operator's files, or the data dir's self-signed pair
    (made now if absent). Raises HubConfigError saying what is wrong."""
    if (cert is None) != (key is None):
        raise HubConfigError("give both --tls-cert and --tls-key, or neither")
    self_signed = cert is None
    if cert is None or key is None:
        cert, key = data_dir / CERT_FILE, data_dir / KEY_FILE
        if not cert.exists() or not key.exists():
            _make_self_signed(cert, key, host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        pem = cert.read_text()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise HubConfigError(
            f"cannot load the TLS certificate {cert} and key {key}: {exc}"
        ) from None
    der = ssl.PEM_cert_to_DER_cert(pem)
    return HubTLS(context, cert, hashlib.sha256(der).hexdigest(), self_signed)


def _make_self_signed(cert_path: Path, key_path: Path, host: str) -> None:
    make_self_signed(cert_path, key_path, [host])


def make_self_signed(cert_path: Path, key_path: Path, hosts: Sequence[str]) -> None:
    """A self-signed certificate for ``hosts`` (names or addresses; localhost and this
    machine's name always), and its key (0600)."""
    # cryptography is the hub's only: the agent never imports this module.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshorch hub")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    ips = {"127.0.0.1", "::1"}
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
        else:
            if not address.is_unspecified:
                ips.add(host)
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_durably(key_path, key_pem, 0o600)
    write_durably(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
