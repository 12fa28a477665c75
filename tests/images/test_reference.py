"""Image references as users write them (meshorch.images.reference)."""

from __future__ import annotations

import pytest

from meshorch.images.reference import BadReference, ImageReference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("grafana/grafana", "docker.io", "grafana/grafana", "latest", None),
        ("index.docker.io/nginx:1", "docker.io", "library/nginx", "1", None),
        ("localhost/pos/web", "localhost", "pos/web", "latest", None),
        ("localhost:5000/web:2", "localhost:5000", "web", "2", None),
        ("127.0.0.1:5000/a/b/c:v1.2_3", "127.0.0.1:5000", "a/b/c", "v1.2_3", None),
        (
            f"registry.example.com:5000/pos/web:1.4@{DIGEST}",
            "registry.example.com:5000",
            "pos/web",
            "1.4",
            DIGEST,
        ),
        (f"Quay.IO/team/app@{DIGEST}", "quay.io", "team/app", None, DIGEST),
        ("my-reg.local/a__b/c.d-e", "my-reg.local", "a__b/c.d-e", "latest", None),
    ],
)
def test_parses_references_as_users_write_them(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert parse_reference(text) == ImageReference(registry, repository, tag, digest)


def test_canonical_form_parses_to_itself() -> None:
    for text in ("busybox", f"localhost:5000/web:2@{DIGEST}", "quay.io/a/b"):
        ref = parse_reference(text)
        assert parse_reference(ref.canonical()) == ref


def test_docker_hub_api_host_and_selector() -> None:
    ref = parse_reference("busybox:1")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.manifest_selector() == "1"
    pinned = ref.by_digest(DIGEST)
    assert pinned.manifest_selector() == DIGEST
    assert pinned.pinned() == f"docker.io/library/busybox@{DIGEST}"
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "web:",
        "web:-tag",
        "web@sha256:abc",
        f"web@sha512:{'ab' * 64}",
        f"web@{DIGEST.upper()}",
        "reg.io:99999/web",
        "reg.io:/web",
        "web//x",
        "web/",
        "-web",
        "a" * 600,
        "reg.io/" + "a" * 260,
        "web:" + "t" * 129,
        "we b",
        "web\n",
    ],
)
def test_refuses_malformed_references_with_a_reason(text: str) -> None:
    with pytest.raises(BadReference) as caught:
        parse_reference(text)
    assert caught.value.code == "bad_image_reference"


def test_pinned_needs_a_digest() -> None:
    with pytest.raises(BadReference):
        parse_reference("web:1").pinned()
    with pytest.raises(BadReference):
        parse_reference("web:1").by_digest("sha256:xyz")
