"""OCI and Docker v2 manifests, indexes, platforms and auth challenges (pure).

What a registry sends is untrusted: every document is size-bounded, parsed strictly
(digests ``sha256:<hex>``, sizes non-negative and bounded, a known media type) and
refused with :class:`BadManifest` otherwise. An index (Docker: manifest list) names one
manifest per platform; :func:`select_platform` picks this host's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from meshorch.errors import RemoteInputError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Sent as Accept: every form this client reads, none it does not (schema 1 is refused).
ACCEPTED_TYPES = (*MANIFEST_TYPES, *INDEX_TYPES)

MAX_MANIFEST_BYTES = 4 << 20  # the distribution registry's own limit
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 256
MAX_BLOB_BYTES = 8 << 30
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")


class BadManifest(RemoteInputError):
    """A manifest or index from a registry that this client will not use."""

    def __init__(self, why: str) -> None:
        super().__init__("bad_manifest", why)


class NoMatchingPlatform(RemoteInputError):
    """An index that has no manifest for this host's platform."""

    def __init__(self, wanted: Platform, offered: list[Platform]) -> None:
        listed = ", ".join(str(p) for p in offered) or "none"
        super().__init__("no_matching_platform", f"no image for {wanted} (offered: {listed})")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


# uname's machine names in the architectures and variants of the OCI image spec.
_MACHINES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def platform_of_machine(machine: str, os: str = "linux") -> Platform:
    """The platform of a host whose ``uname -m`` is ``machine``."""
    architecture, variant = _MACHINES.get(machine, (machine, None))
    return Platform(os, architecture, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


@dataclass(frozen=True)
class Manifest:
    """One image: its config blob and its layers, in order."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)


@dataclass(frozen=True)
class Index:
    """A manifest per platform (OCI image index, Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_document(raw: bytes, content_type: str) -> Manifest | Index:
    """A manifest or an index; its media type from the body, else the Content-Type."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadManifest(f"manifest of {len(raw)} B is over {MAX_MANIFEST_BYTES} B")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadManifest(f"manifest is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadManifest("manifest is not a JSON object")
    media_type = data.get("mediaType") or content_type.split(";")[0].strip()
    if data.get("schemaVersion") != 2:
        raise BadManifest(f"schemaVersion {data.get('schemaVersion')!r} is not 2")
    if media_type in INDEX_TYPES or (not media_type and "manifests" in data):
        entries = _list(data, "manifests", MAX_INDEX_ENTRIES)
        return Index(media_type or OCI_INDEX, tuple(_descriptor(e, True) for e in entries))
    if media_type in MANIFEST_TYPES or (not media_type and "layers" in data):
        layers = _list(data, "layers", MAX_LAYERS)
        return Manifest(
            media_type or OCI_MANIFEST,
            _descriptor(data.get("config"), False),
            tuple(_descriptor(layer, False) for layer in layers),
        )
    raise BadManifest(f"media type {media_type[:100]!r} is neither a manifest nor an index")


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The index's manifest for ``wanted``; a missing variant matches any (the first listed)."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.media_type in MANIFEST_TYPES
        and d.platform.os == wanted.os
        and d.platform.architecture == wanted.architecture
    ]
    exact = [d for d in candidates if d.platform and d.platform.variant == wanted.variant]
    loose = [d for d in candidates if d.platform and d.platform.variant is None]
    for group in (exact, loose, candidates if wanted.variant is None else []):
        if group:
            return group[0]
    raise NoMatchingPlatform(wanted, [d.platform for d in index.manifests if d.platform])


def _list(data: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise BadManifest(f"{key} is not a list")
    if len(value) > limit:
        raise BadManifest(f"{len(value)} {key}, more than {limit}")
    return value


def _descriptor(value: object, with_platform: bool) -> Descriptor:
    if not isinstance(value, dict):
        raise BadManifest("a descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or len(media_type) > 255:
        raise BadManifest("a descriptor has no media type")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise BadManifest(f"descriptor digest {str(digest)[:80]!r} is not sha256:<64 hex>")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
        raise BadManifest(f"descriptor size {size!r} is not within 0..{MAX_BLOB_BYTES}")
    platform = None
    if with_platform and isinstance(value.get("platform"), dict):
        p = value["platform"]
        os, architecture, variant = p.get("os"), p.get("architecture"), p.get("variant")
        if isinstance(os, str) and isinstance(architecture, str):
            if not (_NAME_RE.match(os) and _NAME_RE.match(architecture)):
                raise BadManifest("a platform's os or architecture is malformed")
            if variant is not None and not (isinstance(variant, str) and _NAME_RE.match(variant)):
                raise BadManifest("a platform's variant is malformed")
            platform = Platform(os, architecture, variant)
    return Descriptor(media_type, digest, size, platform)


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate`` challenge: ``Basic realm=...`` or ``Bearer realm=..,service=..``."""

    scheme: str
    params: dict[str, str]


_CHALLENGE_PARAM_RE = re.compile(
    r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)


def parse_challenge(header: str) -> Challenge:
    """Parse one challenge (RFC 7235); unknown schemes are returned for the caller to refuse."""
    header = header[:4096]
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _CHALLENGE_PARAM_RE.match(rest, position)
        if match is None or match.end() == position:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
        position = match.end()
    return Challenge(scheme.lower(), params)
