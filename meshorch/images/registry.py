"""An async client of the OCI distribution API (pulls only), on aiohttp.

Auth follows the registry's ``WWW-Authenticate`` challenge: ``Basic`` sends the
credentials to the registry itself; ``Bearer`` asks the named token service for a
token of scope ``repository:NAME:pull`` (with the credentials if there are some,
anonymously otherwise), caches it per scope until it expires, and sends it. Answers
are bounded: manifests and error bodies are read up to a limit, blobs up to the
size their manifest declares, and nothing is kept whose sha256 is not its digest.

Exceptions (all :class:`meshorch.errors.RemoteInputError`, with a stable ``code``)::

    RegistryError               registry_error: any other refusal, with the registry's code
    ├── RegistryAuthError       registry_auth: no or wrong credentials, no token
    ├── NotFound                image_not_found: no such repository, tag, manifest or blob
    ├── DigestMismatch          digest_mismatch: content is not the digest asked for
    └── RegistryUnavailable     registry_unavailable: cannot connect, timed out, 5xx
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson

from meshorch.errors import RemoteInputError
from meshorch.http_body import read_limited
from meshorch.images.oci import (
    ACCEPTED_TYPES,
    MAX_MANIFEST_BYTES,
    BadManifest,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_challenge,
    parse_document,
    select_platform,
)
from meshorch.images.reference import ImageReference
from meshorch.images.store import BlobStore, ImageTransferError

logger = logging.getLogger(__name__)

MAX_ERROR_BYTES = 64 << 10
MAX_TOKEN_BYTES = 64 << 10
DEFAULT_TOKEN_LIFETIME_S = 60.0  # the distribution token spec's default for expires_in


class RegistryError(RemoteInputError):
    """A registry refused or failed a request."""

    def __init__(self, message: str, code: str = "registry_error") -> None:
        super().__init__(code, message)


class RegistryAuthError(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "registry_auth")


class NotFound(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "image_not_found")


class DigestMismatch(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "digest_mismatch")


class RegistryUnavailable(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "registry_unavailable")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class BadRegistrySecret(RemoteInputError):
    """A secret that is not a registry's credentials, or another registry's."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_registry_secret", message)


MAX_REGISTRY_SECRET_BYTES = 16 << 10


def credentials_from_secret(value: bytes, registry_host: str) -> Credentials:
    """Credentials from a secret ``{"registry": HOST[:PORT], "username", "password"}``,
    for ``registry_host`` only: a pull of an image elsewhere does not get them, so whoever
    names the image cannot send a tenant's password to a registry of their choosing."""
    try:
        data = orjson.loads(value[: MAX_REGISTRY_SECRET_BYTES + 1])
    except orjson.JSONDecodeError:
        data = None
    if len(value) > MAX_REGISTRY_SECRET_BYTES or not isinstance(data, dict):
        raise BadRegistrySecret(
            'the secret is not {"registry": HOST, "username": ..., "password": ...}'
        )
    registry, username, password = data.get("registry"), data.get("username"), data.get("password")
    if not (isinstance(username, str) and username and isinstance(password, str)):
        raise BadRegistrySecret("the secret has no username and password")
    if not isinstance(registry, str) or registry.lower() != registry_host.lower():
        raise BadRegistrySecret(
            f"the secret's credentials are for another registry, not {registry_host}"
        )
    return Credentials(username, password)


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved: the digest it names now and this platform's manifest.

    ``reference.digest`` is what the tag pointed to (an index's digest for a multi-platform
    image, so every host of any platform pins the same digest); ``manifest_digest`` is the
    manifest this host runs.
    """

    reference: ImageReference
    documents: tuple[tuple[str, bytes], ...]  # (digest, raw) of the index and the manifest
    manifest_digest: str
    manifest: Manifest


@dataclass
class _Token:
    header: str
    expires_at: float


class RegistryClient:
    """Pulls from one registry. ``plain_http`` for a registry without TLS (a lab, a LAN)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        registry_host: str,
        credentials: Credentials | None = None,
        *,
        plain_http: bool = False,
    ) -> None:
        self.session = session
        self.registry_host = registry_host
        self.credentials = credentials
        self.plain_http = plain_http
        self.base_url = f"{'http' if plain_http else 'https'}://{registry_host}"
        self._tokens: dict[str, _Token] = {}

    async def ping(self) -> None:
        """``GET /v2/``: the registry answers and accepts these credentials (any scope)."""
        async with await self._get("/v2/", scope=None, headers={}) as response:
            await self._check(response, "the registry's API")

    async def resolve(self, ref: ImageReference, platform: Platform) -> ResolvedImage:
        """Fetch ``ref``'s manifest (by digest, else by tag), down to ``platform``'s."""
        raw, digest = await self._manifest(ref, ref.manifest_selector())
        document = parse_document(raw[0], raw[1])
        documents = [(digest, raw[0])]
        manifest_digest = digest
        if isinstance(document, Index):
            chosen = select_platform(document, platform)
            (body, content_type), manifest_digest = await self._manifest(ref, chosen.digest)
            document = parse_document(body, content_type)
            documents.append((manifest_digest, body))
            if isinstance(document, Index):
                raise RegistryError(f"{ref.canonical()}: an index names another index")
        return ResolvedImage(ref.by_digest(digest), tuple(documents), manifest_digest, document)

    async def _manifest(self, ref: ImageReference, selector: str) -> tuple[tuple[bytes, str], str]:
        path = f"/v2/{ref.repository}/manifests/{selector}"
        headers = {"Accept": ", ".join(ACCEPTED_TYPES)}
        separator = "@" if selector.startswith("sha256:") else ":"
        what = f"manifest {ref.name}{separator}{selector}"
        async with await self._get(path, scope=ref.repository, headers=headers) as response:
            await self._check(response, what)
            body = await read_limited(response.content, MAX_MANIFEST_BYTES)
            content_type = response.headers.get("Content-Type", "")
            announced = response.headers.get("Docker-Content-Digest")
        if len(body) > MAX_MANIFEST_BYTES:
            raise BadManifest(f"{what}: larger than {MAX_MANIFEST_BYTES} B")
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if selector.startswith("sha256:") and digest != selector:
            raise DigestMismatch(f"{what}: the registry sent content of {digest}")
        if announced and announced.startswith("sha256:") and announced != digest:
            raise DigestMismatch(f"{what}: announced as {announced}, content is {digest}")
        return (body, content_type), digest

    async def fetch_blob(self, repository: str, blob: Descriptor, store: BlobStore) -> int:
        """Have ``blob`` in ``store``; return the bytes downloaded (0 if it was there).

        A transfer that breaks off leaves its partial file, and the next pull asks the
        registry for the rest only (HTTP Range), as the site's own copies do."""
        if store.has(blob.digest):
            return 0
        path = f"/v2/{repository}/blobs/{blob.digest}"
        what = f"blob {blob.digest} of {repository}"
        # HEAD first: the auth challenge answered, and 404 or a refusal told apart.
        async with await self._get(path, scope=repository, headers={}, method="HEAD") as head:
            await self._check(head, what)
        authorization = self._authorization(repository)
        try:
            size = await store.fetch(
                self.session,
                [self.base_url + path],
                blob.digest,
                blob.size,
                lambda _method, _path: authorization,
            )
        except ImageTransferError as exc:
            if exc.corrupt:
                raise DigestMismatch(f"{what}: the registry sent other content ({exc})") from exc
            raise RegistryUnavailable(f"{what}: {exc}") from exc
        logger.info("fetched %s (%d B)", what, size)
        return size

    async def _get(
        self, path: str, scope: str | None, headers: Mapping[str, str], method: str = "GET"
    ) -> aiohttp.ClientResponse:
        """GET (or HEAD) with this scope's authorization, answering one challenge if the
        registry asks."""
        url = self.base_url + path
        auth = self._authorization(scope)
        response = await self._send(method, url, {**headers, **auth})
        if response.status != 401:
            return response
        challenge_header = response.headers.get("WWW-Authenticate", "")
        response.release()
        # No authorization yet, or an expired or revoked token: answer the challenge once.
        self._tokens.pop(scope or "", None)
        await self._answer_challenge(challenge_header, scope)
        response = await self._send(method, url, {**headers, **self._authorization(scope)})
        if response.status == 401:
            response.release()
            raise RegistryAuthError(
                f"{self.registry_host} refused the credentials"
                + ("" if self.credentials else " (none were given)")
            )
        return response

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        try:
            return await self.session.request(method, url, headers=dict(headers))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RegistryUnavailable(f"cannot reach {self.registry_host}: {exc}") from exc

    def _authorization(self, scope: str | None) -> dict[str, str]:
        token = self._tokens.get(scope or "")
        if token is None or token.expires_at <= time.monotonic():
            return {}
        return {"Authorization": token.header}

    async def _answer_challenge(self, header: str, scope: str | None) -> None:
        challenge = parse_challenge(header)
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise RegistryAuthError(f"{self.registry_host} needs credentials (Basic auth)")
            # Basic credentials do not expire; kept for every scope of this registry.
            header_value = self.credentials.basic()
            self._tokens[scope or ""] = _Token(header_value, float("inf"))
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryAuthError(
                f"{self.registry_host} asks for auth this client does not speak: {header[:100]!r}"
            )
        await self._fetch_token(challenge.params, scope)

    async def _fetch_token(self, params: Mapping[str, str], scope: str | None) -> None:
        realm = urlsplit(params["realm"])
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise RegistryAuthError(f"{self.registry_host}: bad token realm {params['realm']!r}")
        if realm.scheme == "http" and not self.plain_http:
            raise RegistryAuthError(f"{self.registry_host}: refusing a token service over HTTP")
        query = {"service": params["service"]} if "service" in params else {}
        if scope is not None:
            query["scope"] = f"repository:{scope}:pull"
        url = params["realm"] + ("&" if realm.query else "?") + urlencode(query)
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        try:
            async with self.session.get(url, headers=headers) as response:
                body = await read_limited(response.content, MAX_TOKEN_BYTES)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RegistryUnavailable(
                f"cannot reach the token service {realm.netloc}: {exc}"
            ) from exc
        if status in (401, 403):
            raise RegistryAuthError(
                f"the token service of {self.registry_host} refused the credentials"
            )
        if status != 200 or len(body) > MAX_TOKEN_BYTES:
            raise RegistryAuthError(f"the token service of {self.registry_host} answered {status}")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RegistryAuthError(f"the token service answered no JSON: {exc}") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise RegistryAuthError("the token service answered no token")
        lifetime = data.get("expires_in", DEFAULT_TOKEN_LIFETIME_S)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        # Renewed a little early so a token does not expire between check and use.
        expires_at = time.monotonic() + max(1.0, float(lifetime) - 5.0)
        self._tokens[scope or ""] = _Token(f"Bearer {token}", expires_at)

    async def _check(self, response: aiohttp.ClientResponse, what: str) -> None:
        if response.status == 200:
            return
        body = await read_limited(response.content, MAX_ERROR_BYTES)
        detail = _error_detail(body)
        message = f"{what}: HTTP {response.status}{detail}"
        if response.status == 404:
            raise NotFound(message)
        if response.status in (401, 403):
            raise RegistryAuthError(message)
        if response.status >= 500 or response.status == 429:
            raise RegistryUnavailable(message)
        raise RegistryError(message)


def _error_detail(body: bytes) -> str:
    """The registry's error codes (``MANIFEST_UNKNOWN``, ...) for the message, if any."""
    try:
        errors = orjson.loads(body[:MAX_ERROR_BYTES]).get("errors")
        codes = [str(e.get("code"))[:40] for e in errors[:3] if isinstance(e, dict)]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return ""
    return f" ({', '.join(codes)})" if codes else ""
