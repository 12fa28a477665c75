"""The CLI's hub connections: TLS pinned on first use, like SSH's known_hosts.

The first time the CLI talks to a hub over ``https://`` it records the SHA-256 fingerprint
of the hub's certificate in the known-hubs file (``$MESHORCH_KNOWN_HUBS``, else
``$XDG_CONFIG_HOME/meshorch/known_hubs``, else ``~/.config/meshorch/known_hubs``; one
``HOST:PORT FINGERPRINT`` line per hub) and says so on stderr; every later connection
must present the same certificate, checked before any request (and its token) is sent.
``$MESHORCH_HUB_FINGERPRINT`` pins it explicitly (CI: compare with what ``meshorch hub``
printed, no first-use trust). A changed certificate is refused with what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

from meshorch.errors import ConfigurationError

KNOWN_HUBS_ENV = "MESHORCH_KNOWN_HUBS"
FINGERPRINT_ENV = "MESHORCH_HUB_FINGERPRINT"


class HubNotTrusted(ConfigurationError):
    """The hub's certificate is not the pinned one: nothing was sent."""


def known_hubs_path() -> Path:
    given = os.environ.get(KNOWN_HUBS_ENV)
    if given:
        return Path(given)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "meshorch" / "known_hubs"


def _read(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    known = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            known[parts[0]] = parts[1].lower()
    return known


def _normalize(text: str) -> str:
    return text.strip().lower().removeprefix("sha256:").replace(":", "")


def check_pin(address: str, fingerprint: str, path: Path | None = None) -> None:
    """Raise HubNotTrusted unless ``fingerprint`` is the one pinned for ``address``;
    pin it when the address is new."""
    explicit = os.environ.get(FINGERPRINT_ENV)
    if explicit:
        if _normalize(explicit) != fingerprint:
            raise HubNotTrusted(
                f"the hub at {address} presents a TLS certificate with SHA-256 fingerprint "
                f"{fingerprint}, not ${FINGERPRINT_ENV} ({_normalize(explicit)}): nothing "
                "was sent"
            )
        return
    path = path or known_hubs_path()
    pinned = _read(path).get(address)
    if pinned == fingerprint:
        return
    if pinned is not None:
        raise HubNotTrusted(
            f"THE HUB'S CERTIFICATE CHANGED: {address} presents SHA-256 fingerprint "
            f"{fingerprint}, but {path} pins {pinned}. Nothing was sent. Someone may be "
            "intercepting the connection; if the hub's certificate was replaced on purpose, "
            "compare the new fingerprint with the one `meshorch hub` prints at start, then "
            f"remove the line for {address} from {path} and run the command again"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as file:
        file.write(f"{address} {fingerprint}\n")
    print(
        f"meshorch: pinned the hub at {address}: TLS certificate SHA-256 {fingerprint} "
        f"(in {path}; compare it with the one `meshorch hub` printed at start)",
        file=sys.stderr,
    )


def request(
    base: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One request to the hub at ``base`` (``http://`` or ``https://``): (status, body).
    Over https the certificate is checked against the pin before anything is sent.
    Raises OSError (unreachable) or HubNotTrusted."""
    url = urlsplit(base)
    prefix = url.path.rstrip("/")
    host = url.hostname or ""
    connection: http.client.HTTPConnection
    if url.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False  # the pin is the identity
        context.verify_mode = ssl.CERT_NONE
        port = url.port or 443
        connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    elif url.scheme == "http":
        port = url.port or 80
        connection = http.client.HTTPConnection(host, port, timeout=30)
    else:
        raise ConfigurationError(f"the hub's URL {base!r} is not http:// or https://")
    try:
        connection.connect()
        if isinstance(connection.sock, ssl.SSLSocket):
            der = connection.sock.getpeercert(binary_form=True) or b""
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            check_pin(address.lower(), hashlib.sha256(der).hexdigest())
        connection.request(method, prefix + path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
