"""Pages of the hub's list routes: ``limit``, an opaque ``cursor``, label selectors (pure).

A listing walks its LMDB database in key order (keyset pagination, ``Store.page``): a page
is the records after the last key the previous page read, so a walk started before
records were inserted or deleted returns every record present throughout exactly once,
and never one twice. A page holds at most ``limit`` records (default ``DEFAULT_LIMIT``,
at most ``MAX_LIMIT``); a filtered page (a selector, a tenant's view) reads at most
``scan_bound(limit)`` records, so it may hold fewer than ``limit`` records while more
follow: follow ``next_cursor`` until it is null.

The cursor names the listing, the caller's tenant and the last key read, and carries a
MAC under the hub's key (``cursor_key``): it cannot be forged or moved to another
listing or tenant (400 ``bad_cursor``), so a tenant's cursor positions only that tenant's
walk. A selector is ``key=value``, ``key!=value``, ``key`` (has the label) or ``!key``
(has not), joined by commas, all of which must hold (400 ``bad_selector``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from central_hub.errors import ApiError
from central_hub.model import LABEL_KEY_PATTERN

# What the API documents and checks before parsing (central_hub.contract): a selector's
# keys and values are label keys and non-empty label values, optionally spaced.
_LABEL_VALUE = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_TERM = rf" *(!? *{LABEL_KEY_PATTERN}|{LABEL_KEY_PATTERN} *(!=|==|=) *{_LABEL_VALUE}) *"
SELECTOR_PATTERN = rf"({_TERM}(,{_TERM})*)?"
CURSOR_PATTERN = r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MIN_SCAN = 1000
SCAN_PER_ITEM = 20
MAX_CURSOR_CHARS = 2048
MAX_SELECTOR_CHARS = 2048
_MAC_BYTES = 16
_MAX_LABEL_CHARS = 253


def cursor_key(secret: bytes) -> bytes:
    """The key cursors are signed with, derived from a secret of the hub."""
    return hmac.new(secret, b"meshorch-hub/list-cursor/v1", hashlib.sha256).digest()


def scan_bound(limit: int) -> int:
    """How many records a filtered page reads at most."""
    return max(MIN_SCAN, SCAN_PER_ITEM * limit)


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def make_cursor(key: bytes, listing: str, tenant: str, after: str) -> str:
    """The cursor of the page after key ``after`` of ``listing`` for ``tenant``'s caller."""
    payload = orjson.dumps({"l": listing, "t": tenant, "a": after})
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def read_cursor(key: bytes, raw: str | None, listing: str, tenant: str) -> str | None:
    """The key a cursor continues after (None: no cursor, the first page); 400
    ``bad_cursor`` when it is malformed, forged, or of another listing or tenant."""
    if raw is None:
        return None
    bad = ApiError(400, "bad_cursor", "cursor: not a cursor this hub gave for this listing")
    if not raw or len(raw) > MAX_CURSOR_CHARS or not raw.isascii() or raw.count(".") != 1:
        raise bad
    body, mac = raw.split(".")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        raise bad from None
    if not hmac.compare_digest(given, _mac(key, payload)):
        raise bad
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise bad from None
    if not isinstance(data, dict) or data.get("l") != listing or data.get("t") != tenant:
        raise bad
    after = data.get("a")
    if not isinstance(after, str):
        raise bad
    return after


@dataclass(frozen=True, slots=True)
class Term:
    key: str
    value: str | None  # None: only whether the label is there
    equal: bool

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.value is None:
            return (self.key in labels) == self.equal
        return (labels.get(self.key) == self.value) == self.equal


@dataclass(frozen=True, slots=True)
class Selector:
    terms: tuple[Term, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(term.holds(labels) for term in self.terms)

    def __bool__(self) -> bool:
        return bool(self.terms)


def _label_text(text: str, what: str) -> str:
    text = text.strip()
    if not text or len(text) > _MAX_LABEL_CHARS or any(c in text for c in "=!,"):
        raise ApiError(
            400,
            "bad_selector",
            f"selector: {what} {text[:64]!r} must be 1-{_MAX_LABEL_CHARS} characters "
            "without '=', '!' or ','",
        )
    return text


def parse_selector(raw: str | None) -> Selector:
    """``key=value,key!=value,key,!key`` (see the module docstring); None or empty: all."""
    if raw is None or not raw.strip():
        return Selector()
    if len(raw) > MAX_SELECTOR_CHARS:
        raise ApiError(400, "bad_selector", f"selector: at most {MAX_SELECTOR_CHARS} characters")
    terms = []
    for part in raw.split(","):
        if "!=" in part:
            key, value = part.split("!=", 1)
            terms.append(Term(_label_text(key, "key"), _label_text(value, "value"), False))
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            terms.append(Term(_label_text(key, "key"), _label_text(value, "value"), True))
        elif part.strip().startswith("!"):
            terms.append(Term(_label_text(part.strip()[1:], "key"), None, False))
        else:
            terms.append(Term(_label_text(part, "key"), None, True))
    return Selector(tuple(terms))
