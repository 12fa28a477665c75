"""The hub's TLS: the operator's certificate, or one it makes itself at the first start.

With ``--tls-cert``/``--tls-key`` the hub serves that certificate (a CA-signed one: sites
give ``--hub-ca`` or trust the system's CAs). Without them it serves a self-signed
certificate kept in the data dir (``tls.crt``, ``tls.key`` 0600), made at the first start
and kept across restarts; its SHA-256 fingerprint, printed at every start, is what sites
pin at enrollment (``--hub-fingerprint``) and what the CLI pins on first use
(``meshorch.cli.known_hubs``). Plain HTTP only with ``--insecure-http``.

The self-signed certificate's key is a key file like the others (``central_hub.keyfiles``):
sealed with the KEK when there is one, so a copy of the data dir cannot impersonate the
hub to the sites pinned on it. It is opened into memory (a memfd) for OpenSSL, which
loads keys only from files. An operator's ``--tls-key`` is read as given.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from central_hub import keyfiles
from central_hub.errors import HubConfigError
from central_hub.keyfiles import Kek
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


def load(
    data_dir: Path, cert: Path | None, key: Path | None, host: str, kek: Kek | None = None
) -> HubTLS:
    """The server context: the operator's files, or the data dir's self-signed pair
    (made now if absent; its key sealed with ``kek``). Raises HubConfigError saying what
    is wrong."""
    if (cert is None) != (key is None):
        raise HubConfigError("give both --tls-cert and --tls-key, or neither")
    self_signed = cert is None
    if cert is None or key is None:
        cert, key = data_dir / CERT_FILE, data_dir / KEY_FILE
        if not cert.exists() or not key.exists():
            _make_self_signed(cert, key, host, kek)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if self_signed:
            _load_sealed_chain(context, cert, key, kek)
        else:
            context.load_cert_chain(cert, key)
        pem = cert.read_text()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise HubConfigError(
            f"cannot load the TLS certificate {cert} and key {key}: {exc}"
        ) from None
    der = ssl.PEM_cert_to_DER_cert(pem)
    return HubTLS(context, cert, hashlib.sha256(der).hexdigest(), self_signed)


def _load_sealed_chain(context: ssl.SSLContext, cert: Path, key: Path, kek: Kek | None) -> None:
    """Load the data dir's pair, the key opened with ``kek`` (a plain key is sealed now
    when there is one: a data dir of an older hub)."""
    text = keyfiles.read_key_text(key, kek, "TLS key") + "\n"
    if kek is not None and keyfiles.sealed_by(key.read_text()) is None:
        keyfiles.write_key_text(key, text, kek)
    memory = os.memfd_create("meshorch-tls-key", os.MFD_CLOEXEC)
    try:
        os.write(memory, text.encode())
        context.load_cert_chain(cert, f"/proc/self/fd/{memory}")
    finally:
        os.close(memory)


def _make_self_signed(cert_path: Path, key_path: Path, host: str, kek: Kek | None) -> None:
    make_self_signed(cert_path, key_path, [host], kek)


def make_self_signed(
    cert_path: Path, key_path: Path, hosts: Sequence[str], kek: Kek | None = None
) -> None:
    """A self-signed certificate for ``hosts`` (names or addresses; localhost and this
    machine's name always), and its key (0600; sealed with ``kek`` when given)."""
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
    keyfiles.write_key_text(key_path, key_pem.decode(), kek)
    write_durably(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
