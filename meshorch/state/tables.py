"""Pure rules of a site's replicated state: key validation and member records.

The Raft layer stores bytes in tables; this module decides which keys are
valid in the site's public key-value store and how host records are encoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from meshorch.errors import RemoteInputError

KV_TABLE = "kv"
SYSTEM_TABLE = "sys"
APPS_TABLE = "apps"  # applications, placements, instance status, images
SECRETS_TABLE = (
    "secrets"  # keys (wrapped), secrets (encrypted), lock-down: meshorch.secrets.keyring
)
STREAMS_TABLE = "streams"  # event streams: meshorch.streams.site
SITE_TABLES = (KV_TABLE, SYSTEM_TABLE, APPS_TABLE, SECRETS_TABLE, STREAMS_TABLE)
MEMBER_PREFIX = b"member/"
IPAM_PREFIX = b"ipam/"
REVOKED_PREFIX = b"revoked/"
DRAIN_PREFIX = b"drain/"  # drain/<host>: the scheduler moves work off it, keeps it a member
SITE_IDENTITY_KEY = b"site/identity"
SITE_NETWORK_KEY = b"site/network"

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 512 * 1024
MAX_HOST_ID = 63


def validate_kv_key(key: str) -> bytes:
    """Return the stored form of a client key, or raise RemoteInputError('bad_key')."""
    raw = key.encode("utf-8", errors="surrogatepass")
    if not key:
        raise RemoteInputError("bad_key", "the key is empty")
    if len(raw) > MAX_KEY_BYTES:
        raise RemoteInputError(
            "bad_key", f"the key is {len(raw)} bytes, the limit is {MAX_KEY_BYTES}"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in key):
        raise RemoteInputError("bad_key", "the key contains control or surrogate characters")
    if key.startswith("/") or "//" in key:
        raise RemoteInputError("bad_key", "the key must not start with '/' or contain '//'")
    return raw


def validate_host_id(host_id: str) -> str:
    """Host ids are DNS-label-like: 1..63 of [a-z0-9-], not starting or ending with '-'."""
    ok = (
        0 < len(host_id) <= MAX_HOST_ID
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in host_id)
        and not host_id.startswith("-")
        and not host_id.endswith("-")
    )
    if not ok:
        raise RemoteInputError(
            "bad_host_id",
            f"host id {host_id!r} must be 1-{MAX_HOST_ID} characters of a-z, 0-9 and '-'",
        )
    return host_id


def validate_address(field: str, address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteInputError("bad_address", f"{field}: {address!r} is not HOST:PORT")
    return address


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A host of the site as the replicated state knows it.

    The mesh fields are set for hosts that joined over the WireGuard mesh.
    """

    host_id: str
    raft: str
    api: str | None
    wg_public_key: str | None = None
    overlay_ip: str | None = None
    wg_endpoint: str | None = None
    peer_key: str | None = None  # hex Ed25519: signs the host's peer requests

    def key(self) -> bytes:
        return MEMBER_PREFIX + self.host_id.encode()

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, **self.to_json()})

    @staticmethod
    def decode(raw: bytes) -> MemberRecord:
        data = orjson.loads(raw)
        return MemberRecord(
            str(data["host_id"]),
            str(data["raft"]),
            data.get("api"),
            data.get("wg_public_key"),
            data.get("overlay_ip"),
            data.get("wg_endpoint"),
            data.get("peer_key"),
        )

    def to_json(self) -> dict[str, str | None]:
        data = {"host_id": self.host_id, "raft": self.raft, "api": self.api}
        if self.wg_public_key is not None:
            data["wg_public_key"] = self.wg_public_key
            data["overlay_ip"] = self.overlay_ip
            data["wg_endpoint"] = self.wg_endpoint
        if self.peer_key is not None:
            data["peer_key"] = self.peer_key
        return data


def parse_member_request(body: bytes) -> MemberRecord:
    """Parse ``POST /v1/members``: {"host_id", "raft", "api"?}; every problem is listed."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteInputError("bad_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RemoteInputError("bad_request", "the body must be a JSON object")
    problems: list[str] = []
    unknown = set(data) - {"host_id", "raft", "api"}
    if unknown:
        problems.append(f"unknown fields: {', '.join(sorted(unknown))}")
    host_id, raft, api = data.get("host_id"), data.get("raft"), data.get("api")
    for name, value, required in (
        ("host_id", host_id, True),
        ("raft", raft, True),
        ("api", api, False),
    ):
        if value is None and required:
            problems.append(f"{name}: required")
        elif value is not None and not isinstance(value, str):
            problems.append(f"{name}: must be a string")
    if isinstance(host_id, str):
        _collect(problems, validate_host_id, host_id)
    if isinstance(raft, str):
        _collect(problems, validate_address, "raft", raft)
    if isinstance(api, str):
        _collect(problems, validate_address, "api", api)
    if problems:
        raise RemoteInputError("bad_request", "; ".join(problems))
    assert isinstance(host_id, str) and isinstance(raft, str)
    return MemberRecord(host_id, raft, api if isinstance(api, str) else None)


def _collect(problems: list[str], check: Callable[..., object], *args: str) -> None:
    try:
        check(*args)
    except RemoteInputError as exc:
        problems.append(str(exc))
