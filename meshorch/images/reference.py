"""Image references as users write them, parsed into registry, repository, tag, digest (pure).

The grammar is the distribution project's (``docker/distribution/reference``): an
optional registry host (a first component with a ``.`` or a ``:`` port, or
``localhost``), path components of lowercase letters and digits joined by ``.``,
``_``, ``__`` or dashes, an optional ``:tag`` and an optional ``@sha256:<hex>``.
Docker Hub's defaults apply: no registry means ``docker.io``, a one-component name
there means ``library/NAME``, and neither tag nor digest means ``:latest``.

    >>> parse_reference("registry.example.com:5000/pos/web:1.4").canonical()
    'registry.example.com:5000/pos/web:1.4'
    >>> parse_reference("busybox").canonical()
    'docker.io/library/busybox:latest'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshorch.errors import RemoteInputError

DOCKER_HUB = "docker.io"
# Docker Hub's names for itself that mean docker.io, and where its API is served.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"

MAX_REFERENCE_CHARS = 512
MAX_NAME_CHARS = 255  # the repository with its registry, as distribution limits it

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?")
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class BadReference(RemoteInputError):
    """An image reference that does not follow the grammar."""

    def __init__(self, reference: str, why: str) -> None:
        super().__init__("bad_image_reference", f"image reference {reference[:80]!r}: {why}")


@dataclass(frozen=True)
class ImageReference:
    """One image name: ``registry/repository[:tag][@digest]`` with the defaults filled in."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """Where the registry's HTTP API answers (``host[:port]``)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def canonical(self) -> str:
        """The full reference, every default written out."""
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def by_digest(self, digest: str) -> ImageReference:
        """This image pinned to ``digest``, the tag kept for people to read."""
        if not _DIGEST_RE.fullmatch(digest):
            raise BadReference(digest, "a digest is sha256:<64 lowercase hex>")
        return ImageReference(self.registry, self.repository, self.tag, digest)

    def pinned(self) -> str:
        """``registry/repository@digest``: what the runtime is asked to run (no tag to drift)."""
        if self.digest is None:
            raise BadReference(self.canonical(), "not pinned to a digest")
        return f"{self.name}@{self.digest}"

    def manifest_selector(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` as written by a user; raises :class:`BadReference` with the reason."""
    if not text or len(text) > MAX_REFERENCE_CHARS:
        raise BadReference(text, f"must be 1 to {MAX_REFERENCE_CHARS} characters")
    remainder, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.fullmatch(digest):
        raise BadReference(text, "the digest after @ must be sha256:<64 lowercase hex>")
    registry, repository = _split_registry(remainder, text)
    # A tag's colon comes after the last slash (a registry port's colon is before it).
    tag: str | None = None
    slash = repository.rfind("/")
    colon = repository.rfind(":")
    if colon > slash:
        repository, tag = repository[:colon], repository[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise BadReference(text, "a tag is 1 to 128 of A-Z a-z 0-9 _ . - (not starting . -)")
    if not _PATH_RE.fullmatch(repository):
        raise BadReference(
            text, "the repository is lowercase components (a-z 0-9 joined by . _ __ -) and /"
        )
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(registry) + 1 + len(repository) > MAX_NAME_CHARS:
        raise BadReference(text, f"the name is longer than {MAX_NAME_CHARS} characters")
    if tag is None and not digest:
        tag = "latest"
    return ImageReference(registry, repository, tag, digest or None)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    is_host = slash and ("." in first or ":" in first or first == "localhost")
    if not is_host:
        return DOCKER_HUB, name
    if not _DOMAIN_RE.fullmatch(first):
        raise BadReference(text, f"{first!r} is not a registry host[:port]")
    port = first.rpartition(":")[2] if ":" in first else None
    if port is not None and not 0 < int(port) < 65536:
        raise BadReference(text, f"port {port} is out of range")
    host = first.lower()
    return (DOCKER_HUB if host in _HUB_ALIASES else host), rest
