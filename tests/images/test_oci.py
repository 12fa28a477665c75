"""Manifests, indexes, platforms and auth challenges (meshorch.images.oci, pure)."""

from __future__ import annotations

import orjson
import pytest

from meshorch.images.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_BYTES,
    OCI_MANIFEST,
    BadManifest,
    Challenge,
    Index,
    Manifest,
    NoMatchingPlatform,
    Platform,
    parse_challenge,
    parse_document,
    platform_of_machine,
    select_platform,
)

D1, D2, D3 = (f"sha256:{c * 64}" for c in "123")


def blob(digest: str, size: int = 10, **extra: object) -> dict[str, object]:
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
            "size": size, **extra}  # fmt: skip


def manifest(**changes: object) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": blob(D1), "layers": [blob(D2)]}
    return orjson.dumps({**doc, **changes})


def entry(digest: str, arch: str, variant: str | None = None) -> dict[str, object]:
    platform = {"os": "linux", "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"mediaType": DOCKER_MANIFEST, "digest": digest, "size": 5, "platform": platform}


def index(*entries: dict[str, object]) -> Index:
    raw = orjson.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": list(entries)}
    )
    document = parse_document(raw, "")
    assert isinstance(document, Index)
    return document


def test_parses_an_oci_manifest_and_a_docker_one_by_content_type() -> None:
    document = parse_document(manifest(), "")
    assert isinstance(document, Manifest)
    assert [b.digest for b in document.blobs()] == [D1, D2]
    docker = orjson.loads(manifest())
    del docker["mediaType"]
    document = parse_document(orjson.dumps(docker), f"{DOCKER_MANIFEST}; charset=utf-8")
    assert isinstance(document, Manifest) and document.media_type == DOCKER_MANIFEST


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        manifest(schemaVersion=1),
        manifest(mediaType="application/vnd.docker.distribution.manifest.v1+json"),
        manifest(layers=[blob("sha256:abc")]),
        manifest(layers=[blob(D2, size=-1)]),
        manifest(layers=[blob(D2, size=True)]),
        manifest(layers=[blob(D2, size=1 << 40)]),
        manifest(layers="nope"),
        manifest(layers=[blob(D2)] * 300),
        manifest(config=None),
        b" " * (MAX_MANIFEST_BYTES + 1),
    ],
)
def test_refuses_manifests_it_will_not_use(raw: bytes) -> None:
    with pytest.raises(BadManifest):
        parse_document(raw, "")


def test_select_platform_exact_variant_then_any() -> None:
    choices = index(entry(D1, "amd64"), entry(D2, "arm", "v6"), entry(D3, "arm", "v7"))
    assert select_platform(choices, Platform("linux", "amd64")).digest == D1
    assert select_platform(choices, Platform("linux", "arm", "v7")).digest == D3
    loose = index(entry(D1, "arm64"))
    assert select_platform(loose, platform_of_machine("aarch64")).digest == D1
    with pytest.raises(NoMatchingPlatform, match="linux/s390x"):
        select_platform(choices, Platform("linux", "s390x"))
    with pytest.raises(NoMatchingPlatform):  # arm/v5 is not v6 or v7
        select_platform(choices, Platform("linux", "arm", "v5"))


def test_platform_of_machine() -> None:
    assert platform_of_machine("x86_64") == Platform("linux", "amd64")
    assert platform_of_machine("armv7l") == Platform("linux", "arm", "v7")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        (
            'Bearer realm="https://auth.example/token",service="reg.example",'
            'scope="repository:a/b:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.example/token",
                    "service": "reg.example",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        (
            'Bearer realm="a\\"b", error=invalid_token',
            Challenge("bearer", {"realm": 'a"b', "error": "invalid_token"}),
        ),
        ("", Challenge("", {})),
        ("Negotiate", Challenge("negotiate", {})),
    ],
)
def test_parses_challenges(header: str, expected: Challenge) -> None:
    assert parse_challenge(header) == expected


def test_challenge_parsing_is_bounded() -> None:
    parse_challenge("Bearer " + 'x="' * 100_000)  # garbage: returns, quickly
