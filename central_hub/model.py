"""Validation of the names the hub keeps: site ids, labels, tenants (pure)."""

from __future__ import annotations

import re

from meshorch.errors import RemoteInputError
from meshorch.fleet.delta import parse_key_id

MAX_ID = 63
MAX_LABELS = 64
# The patterns are also the API's (central_hub.openapi): one statement of each rule.
ID_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
LABEL_KEY_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?"
LABEL_VALUE_PATTERN = r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?"
_ID_RE = re.compile(ID_PATTERN)
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)
DEFAULT_TENANT = "default"


def is_id(text: object) -> bool:
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None


def plain_key(text: str) -> bool:
    """Whether ``text`` can be a stored id (short ASCII letters, digits and '-')."""
    return 0 < len(text) <= 128 and text.isascii() and text.replace("-", "").isalnum()


def id_problem(field: str, text: object) -> str | None:
    if is_id(text):
        return None
    return (
        f"{field}: {text!r} must be 1-{MAX_ID} characters of a-z, 0-9 and '-', "
        "not starting or ending with '-'"
    )


def validate_site_id(text: object) -> str:
    if not isinstance(text, str) or not is_id(text):
        raise RemoteInputError("bad_site_id", str(id_problem("site id", text)))
    return text


def validate_tenant(text: object) -> str:
    if not isinstance(text, str) or not is_id(text):
        raise RemoteInputError("bad_tenant", str(id_problem("tenant", text)))
    return text


def label_problems(field: str, labels: object) -> list[str]:
    """Everything wrong with a ``{key: value}`` label map (empty list when it is fine)."""
    if not isinstance(labels, dict):
        return [f"{field}: must be an object of label keys to string values"]
    problems: list[str] = []
    if len(labels) > MAX_LABELS:
        problems.append(f"{field}: at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not _LABEL_KEY_RE.fullmatch(key):
            problems.append(
                f"{field}: key {key!r} must be 1-63 characters of A-Z, a-z, 0-9, '.', '_', "
                "'/', '-', starting and ending with a letter or digit"
            )
        if not isinstance(value, str) or not _LABEL_VALUE_RE.fullmatch(value):
            problems.append(
                f"{field}.{key}: value {value!r} must be a string of at most 63 characters "
                "of A-Z, a-z, 0-9, '.', '_', '-'"
            )
    return problems


def validate_labels(labels: object) -> dict[str, str]:
    problems = label_problems("labels", labels)
    if problems or not isinstance(labels, dict):
        raise RemoteInputError("bad_labels", "; ".join(problems))
    return {str(k): str(v) for k, v in sorted(labels.items())}


def validate_public_key(text: object) -> str:
    """An Ed25519 public key as 64 hex characters (returned lower-cased)."""
    if not isinstance(text, str):
        raise RemoteInputError("bad_public_key", "public_key is 64 hex characters")
    try:
        return parse_key_id(text)
    except ValueError as exc:
        raise RemoteInputError("bad_public_key", f"public_key: {exc}") from None
