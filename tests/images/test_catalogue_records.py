"""Catalogue records of images (meshorch.images.store.ImageManifest)."""

from __future__ import annotations

import dataclasses

import orjson

from meshorch.images.store import OCI, ImageManifest, PullInProgress, pulling_key

DIGEST = "sha256:" + "ab" * 32
MANIFEST = "sha256:" + "cd" * 32


def pulled(tenant: str = "") -> ImageManifest:
    blobs = ((MANIFEST, 500), ("sha256:" + "ef" * 32, 1000))
    source = f"reg.example:5000/pos/web@{DIGEST}"
    return ImageManifest(
        "reg.example:5000/pos/web:1", DIGEST, 1500, "h1", 1.0, OCI, source, MANIFEST, blobs, tenant
    )


def test_a_pulled_image_round_trips_and_names_its_digest() -> None:
    for image in (pulled(), pulled("acme")):
        assert ImageManifest.decode(image.encode()) == image
    assert pulled().runtime_name() == f"reg.example:5000/pos/web:{DIGEST.replace(':', '-')}"
    assert pulled().blob_sizes() == pulled().blobs


def test_an_archive_record_of_version_1_still_reads() -> None:
    raw = orjson.dumps({"v": 1, "ref": "shop/web:1", "digest": DIGEST, "size": 9,
                        "added_by": "h1", "added_at": 2.0})  # fmt: skip
    archive = ImageManifest.decode(raw)
    assert archive.kind == "archive" and archive.runtime_name() == "shop/web:1"
    assert archive.blob_sizes() == ((DIGEST, 9),) and archive.usable_by("anyone")


def test_an_image_pulled_with_a_tenants_secret_is_that_tenants() -> None:
    assert pulled("acme").usable_by("acme")
    assert not pulled("acme").usable_by("other")
    assert pulled().usable_by("other")
    assert "tenant" not in pulled().to_json() and pulled("acme").to_json()["tenant"] == "acme"


def test_a_pin_round_trips_and_an_older_record_is_not_pinned() -> None:
    pinned = dataclasses.replace(pulled(), pinned=True)
    assert ImageManifest.decode(pinned.encode()) == pinned
    assert pinned.to_json()["pinned"] is True and "pinned" not in pulled().to_json()
    assert not ImageManifest.decode(pulled().encode()).pinned


def test_a_pull_under_way_round_trips() -> None:
    source = f"reg.example:5000/pos/web@{DIGEST}"
    record = PullInProgress("reg.example:5000/pos/web:1", "h2", source, ((MANIFEST, 500),),
                            "acme", True)  # fmt: skip
    assert PullInProgress.decode(record.encode()) == record
    assert record.key() == pulling_key(record.ref) == b"imagepull/reg.example:5000/pos/web:1"
