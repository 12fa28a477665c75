"""The hub's side of secrets: records, rules and keys of the vault (docs/secrets.md).

Pure parts (request parsing, records, the distribution plan, what a report says about a
site's secrets, the escrow key's signed message, the access check) are plain functions;
``HubKeys`` is the I/O: the two key files of the data directory. The service that keeps
secrets in the store and sends them to sites is ``central_hub.vault_service``.

Keys (both hex, mode 0600, created on the hub's first start):

- ``DATA_DIR/secrets.key``: the hub master key (32 bytes). Secret values and escrowed
  unseal keys rest in LMDB as SecretBoxes under it, each bound to its record by a context
  (``meshorch-hub/secret/{tenant}/{name}/{version}``, ``meshorch-hub/escrow/{site}``).
- ``DATA_DIR/escrow.key``: the hub's X25519 escrow key. Sites seal their unseal key (KEK)
  to its public half, which the hub serves signed by the fleet root key.

Records live in the store's ``meta`` database under ``vault/`` keys::

    vault/secret/{tenant}/{name}  {"tenant", "name", "version", "placement", "ciphertext",
                                   "issued": {site: {"version", "key", "delta"}},
                                   "created_at", "updated_at"}
    vault/lock/{site}             {"locked_down": bool, "delta", "at"} (the last request)
    vault/escrow/{site}           {"wrapped": b64, "ssk_public": hex, "at"}
    vault/unseal/{site}           {"approved_at", "expires_at", "by"} (an operator's approval)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from central_hub import tokens
from central_hub.errors import ApiError, HubConfigError
from central_hub.keyfiles import Kek, read_key_text, write_key_text
from central_hub.placement import Policy, parse_policy
from central_hub.tokens import TokenRecord
from meshorch.fleet.delta import is_hex
from meshorch.fleet.escrow import escrow_message
from meshorch.secrets.keyring import (
    KEY_BYTES,
    MAX_SECRET_BYTES,
    SEAL_OVERHEAD,
    SECRET_NAME_RULE,
    TENANT_RULE,
    Tampered,
    is_secret_name,
    is_tenant,
    open_sealed,
    seal,
    unwrap,
    wrap,
)

logger = logging.getLogger(__name__)

MASTER_KEY_FILE = "secrets.key"
ESCROW_KEY_FILE = "escrow.key"
UNSEAL_APPROVAL_S = 600.0
SECRET_PREFIX = "vault/secret/"
LOCK_PREFIX = "vault/lock/"
ESCROW_PREFIX = "vault/escrow/"
UNSEAL_PREFIX = "vault/unseal/"
SEALED_KEK_BYTES = KEY_BYTES + SEAL_OVERHEAD
SITE_SECRET_STATES = ("sealed", "ready", "failed")
MAX_REPORTED_SECRETS = 10_000


# -- keys on disk (I/O) -------------------------------------------------------------------


def _load_or_create(path: Path, what: str, kek: Kek | None) -> bytes:
    if path.exists():
        try:
            raw = bytes.fromhex(read_key_text(path, kek, what))
        except ValueError as exc:
            raise HubConfigError(f"cannot read the {what} {path}: {exc}") from None
        if len(raw) != KEY_BYTES:
            raise HubConfigError(f"{path}: not a {what} (hex of {KEY_BYTES} bytes)")
        return raw
    raw = os.urandom(KEY_BYTES)
    write_key_text(path, raw.hex() + "\n", kek)
    return raw


@dataclass(frozen=True)
class HubKeys:
    """The hub master key and the escrow key, read from (or created in) the data dir."""

    master: bytes
    escrow: PrivateKey

    @staticmethod
    def load_or_create(data_dir: Path, kek: Kek | None = None) -> HubKeys:
        master = _load_or_create(data_dir / MASTER_KEY_FILE, "hub secrets key", kek)
        escrow = _load_or_create(data_dir / ESCROW_KEY_FILE, "hub escrow key", kek)
        return HubKeys(master, PrivateKey(escrow))

    @property
    def escrow_public_hex(self) -> str:
        return bytes(self.escrow.public_key).hex()


# -- secrets: requests and records (pure) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretRequest:
    name: str
    value: bytes
    tenant: str | None
    placement: Policy


_REQUEST_FIELDS = {"name", "value", "value_b64", "tenant", "placement"}


def bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def check_name(name: object) -> str:
    if not is_secret_name(name):
        raise bad("bad_name", f"name: {SECRET_NAME_RULE}")
    assert isinstance(name, str)
    return name


def check_tenant(tenant: object) -> str:
    if not is_tenant(tenant):
        raise bad("bad_tenant", f"tenant: {TENANT_RULE}")
    assert isinstance(tenant, str)
    return tenant


def parse_secret_request(data: object) -> SecretRequest:
    """``{"name", "value" | "value_b64", "tenant"?, "placement"?}`` of POST /v1/secrets."""
    if not isinstance(data, dict):
        raise bad("bad_request", "the body must be a JSON object")
    unknown = sorted(set(data) - _REQUEST_FIELDS)
    if unknown:
        raise bad("bad_request", f"unknown fields {unknown}; known: {sorted(_REQUEST_FIELDS)}")
    name = check_name(data.get("name"))
    if ("value" in data) == ("value_b64" in data):
        raise bad("bad_value", "give exactly one of value (UTF-8 text) and value_b64")
    if "value" in data:
        text = data["value"]
        if not isinstance(text, str):
            raise bad("bad_value", "value: a string (UTF-8 text); use value_b64 for bytes")
        try:
            value = text.encode()
        except UnicodeEncodeError:
            raise bad("bad_value", "value: not valid UTF-8 text") from None
    else:
        raw = data["value_b64"]
        if not isinstance(raw, str) or len(raw) > (MAX_SECRET_BYTES + 2) // 3 * 4:
            raise bad("bad_value", f"value_b64: base64 of at most {MAX_SECRET_BYTES} bytes")
        try:
            value = base64.b64decode(raw.encode(), validate=True)
        except (binascii.Error, ValueError):
            raise bad("bad_value", "value_b64: not valid base64") from None
    if not 0 < len(value) <= MAX_SECRET_BYTES:
        raise bad("bad_value", f"the value must be 1 to {MAX_SECRET_BYTES} bytes")
    tenant = data.get("tenant")
    chosen = None if tenant is None else check_tenant(tenant)
    return SecretRequest(name, value, chosen, parse_policy(data.get("placement")))


def secret_record_key(tenant: str, name: str) -> str:
    return f"{SECRET_PREFIX}{tenant}/{name}"


def value_context(tenant: str, name: str, version: int) -> str:
    return f"meshorch-hub/secret/{tenant}/{name}/{version}"


def escrow_context(site: str) -> str:
    return f"meshorch-hub/escrow/{site}"


def new_version(
    previous: Mapping[str, Any] | None,
    master: bytes,
    request: SecretRequest,
    tenant: str,
    now: float,
) -> dict[str, Any]:
    """The record of a new version of a secret (version 1, or the stored one + 1)."""
    version = 1 if previous is None else int(previous["version"]) + 1
    return {
        "tenant": tenant,
        "name": request.name,
        "version": version,
        "placement": request.placement.to_json(),
        "ciphertext": b64(
            wrap(master, value_context(tenant, request.name, version), request.value)
        ),
        "issued": {} if previous is None else dict(previous["issued"]),
        "created_at": now if previous is None else previous["created_at"],
        "updated_at": now,
    }


def secret_value(master: bytes, record: Mapping[str, Any]) -> bytes:
    context = value_context(record["tenant"], record["name"], int(record["version"]))
    return unwrap(master, context, base64.b64decode(record["ciphertext"]))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- distribution (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Distribution:
    """What to send for one secret: a ``secret.put`` sealed to each of ``put`` (site ->
    its secrets public key, hex) and a ``secret.delete`` to each of ``delete``."""

    put: Mapping[str, str]
    delete: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.put or self.delete)


def plan_distribution(
    record: Mapping[str, Any],
    targets: Iterable[str],
    site_keys: Mapping[str, str | None],
    only: Collection[str] | None = None,
) -> Distribution:
    """Sites that should get the record's version sealed to their current key and have
    not yet, and sites that were sent it but are no longer targets. ``only``: consider
    these sites alone (``targets`` is then among them); None: every site."""
    wanted = set(targets)
    issued: Mapping[str, Mapping[str, Any]] = record["issued"]
    put = {}
    for site in sorted(wanted):
        key = site_keys.get(site)
        if key is None:
            continue  # no report with its key yet: the driver comes back to it
        sent = issued.get(site)
        if sent is None or (sent["version"], sent["key"]) != (record["version"], key):
            put[site] = key
    gone = set(issued) - wanted
    delete = tuple(sorted(gone if only is None else gone.intersection(only)))
    return Distribution(put, delete)


def put_op(record: Mapping[str, Any], value: bytes, keys: Mapping[str, str]) -> dict[str, Any]:
    """The ``secret.put`` op with the value sealed to each site's key."""
    return {
        "op": "secret.put",
        "tenant": record["tenant"],
        "name": record["name"],
        "version": record["version"],
        "sealed": {site: b64(seal(bytes.fromhex(key), value)) for site, key in keys.items()},
    }


def delete_op(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"op": "secret.delete", "tenant": record["tenant"], "name": record["name"]}


# -- reports (pure) --------------------------------------------------------------------


def parse_report_secrets(data: object) -> dict[str, Any]:
    """What a site report says about its secrets: ``secrets_public_key`` and
    ``secrets_state`` (docs/secrets.md), normalised; malformed parts are left out (the
    rest of the report stays valid)."""
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    key = data.get("secrets_public_key")
    if isinstance(key, str) and len(key) == 64:
        try:
            bytes.fromhex(key)
            out["secrets_public_key"] = key.lower()
        except ValueError:
            pass
    state = data.get("secrets_state")
    if isinstance(state, dict):
        items = state.get("secrets")
        secrets = []
        if isinstance(items, list):
            for item in items[:MAX_REPORTED_SECRETS]:
                if (
                    isinstance(item, dict)
                    and is_tenant(item.get("tenant"))
                    and is_secret_name(item.get("name"))
                    and type(item.get("version")) is int
                    and item.get("state") in SITE_SECRET_STATES
                ):
                    secrets.append({k: item[k] for k in ("tenant", "name", "version", "state")})
        out["secrets_state"] = {
            "sealed": state.get("sealed") is True,
            "locked_down": state.get("locked_down") is True,
            "initialized": state.get("initialized") is True,
            "secrets": secrets,
        }
    return out


def site_secret_status(
    record: Mapping[str, Any], site: str, report: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One site's delivery state of a secret: what was sent, what the site reports."""
    sent = record["issued"].get(site)
    reported = None
    if report is not None:
        for item in (report.get("secrets_state") or {}).get("secrets", []):
            if (item["tenant"], item["name"]) == (record["tenant"], record["name"]):
                reported = item
    at_site = None if reported is None else reported["version"]
    if sent is None:
        state = "waiting_for_site_key"
    elif at_site == record["version"]:
        state = str(reported["state"]) if reported is not None else "sent"
    else:
        state = "sent"
    return {
        "sent_version": None if sent is None else sent["version"],
        "delta": None if sent is None else sent["delta"],
        "site_version": at_site,
        "state": state,
    }


def public_secret(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record without its ciphertext."""
    return {
        "tenant": record["tenant"],
        "name": record["name"],
        "version": record["version"],
        "placement": record["placement"],
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }


# -- escrow (pure) ---------------------------------------------------------------------


def sign_escrow_key(root: SigningKey, public_hex: str) -> str:
    return bytes(root.sign(escrow_message(public_hex)).signature).hex()


def parse_escrow_upload(data: object, escrow: PrivateKey) -> tuple[bytes, str]:
    """``{"sealed": b64, "ssk_public": hex}`` -> (sealed blob, ssk hex); the blob must
    open with the escrow key to 32 bytes (the hub cannot check it is the site's KEK:
    the site's leader checks what it gets back)."""
    if not isinstance(data, dict):
        raise bad("bad_request", "the body must be a JSON object")
    unknown = sorted(set(data) - {"sealed", "ssk_public"})
    if unknown:
        raise bad("bad_request", f"unknown fields {unknown}")
    raw = data.get("sealed")
    if not isinstance(raw, str) or len(raw) > 4 * SEALED_KEK_BYTES:
        raise bad("bad_escrow", f"sealed: base64 of a {SEALED_KEK_BYTES}-byte sealed box")
    try:
        blob = base64.b64decode(raw.encode(), validate=True)
        kek = open_sealed(escrow, blob)
    except (binascii.Error, ValueError, Tampered):
        raise bad("bad_escrow", "sealed: does not open with the hub's escrow key") from None
    if len(kek) != KEY_BYTES:
        raise bad("bad_escrow", f"sealed: must hold {KEY_BYTES} bytes")
    ssk = data.get("ssk_public")
    if not isinstance(ssk, str) or len(ssk) != 64 or not is_hex(ssk):
        raise bad("bad_public_key", "ssk_public: the site's secrets public key, 64 hex")
    return blob, ssk.lower()


def parse_ephemeral_key(data: object) -> bytes:
    if not isinstance(data, dict):
        raise bad("bad_request", "the body must be a JSON object")
    unknown = sorted(set(data) - {"public_key"})
    if unknown:
        raise bad("bad_request", f"unknown fields {unknown}")
    key = data.get("public_key")
    if not isinstance(key, str) or len(key) != 64 or not is_hex(key):
        raise bad("bad_public_key", "public_key: an X25519 public key, 64 hex characters")
    return bytes.fromhex(key)


def approval_valid(approval: Mapping[str, Any] | None, now: float) -> bool:
    return approval is not None and now < float(approval["expires_at"])


def locked_down(lock: Mapping[str, Any] | None, report: Mapping[str, Any] | None) -> bool:
    """Locked down as the hub asked (the last lock-down/unlock request) or as the site
    reports it (a lock-down through an agent)."""
    if lock is not None and lock.get("locked_down"):
        return True
    state = None if report is None else report.get("secrets_state")
    if lock is not None and state is not None and lock.get("at", 0) > report_time(report):
        return False  # the site has not reported since the hub's unlock
    return bool(state and state["locked_down"])


def report_time(report: Mapping[str, Any] | None) -> float:
    return 0.0 if report is None else float(report.get("time", 0.0))


def targets_of(policy_json: Mapping[str, Any], sites: Mapping[str, Mapping[str, str]]) -> list[str]:
    policy = parse_policy(dict(policy_json))
    return sorted(site for site, labels in sites.items() if policy.matches(site, labels))


def names_in(keys: Sequence[str], prefix: str) -> list[str]:
    return sorted(k for k in keys if k.startswith(prefix))


# -- access -------------------------------------------------------------------------------


def fleet_wide(token: TokenRecord) -> bool:
    return token.tenant == tokens.ALL_TENANTS


def check_access(
    token: TokenRecord, action: str, tenant: str | None = None, *, what: str = "secret"
) -> None:
    """The access decision of every vault route (``tokens.authorize``): ``secrets.read``
    and ``secrets.write`` on a secret of ``tenant`` (another tenant's secret answers 404),
    ``fleet.lockdown`` for a site's lock-down, unlock, unseal approval and rotation."""
    tokens.authorize(token, action, tenant, what=what)
